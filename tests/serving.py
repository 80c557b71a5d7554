"""A real pt-serve on a loopback port for the server tests, and the small helpers they share."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from prefixkit.exporter.reference import kv_of_text
from prefixkit.runtime import make_meta, save_prefix
from prefixkit.runtime.prefix import Prefix

BIN = Path(sys.executable).parent
TEMPLATE = "{input}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, backbone: Path, *args: str, env=None, start_s: float = 60.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Output goes to a file, not a pipe: nobody reads a pipe while the test runs, and a full
        # one would block the server's logging, and with it the server.
        self._log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(
            [str(BIN / "pt-serve"), "--export", str(backbone), "--port", str(self.port), "--threads", "1", *args],
            stdout=self._log, stderr=subprocess.STDOUT, text=True, env=env,
        )
        deadline = time.time() + start_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pt-serve exited: {self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"pt-serve did not come up in {start_s:g} s: {self.output()[-3000:]}")

    def output(self) -> str:
        """What the server has printed so far."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> int:
        """SIGTERM, then the exit status: uvicorn shuts down gracefully and then re-raises the
        signal, so a clean stop reads as -15 (or 0)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def write_prefix(backbone, text: str, path: Path, **meta) -> Path:
    ids = backbone.tokenizer(text, return_tensors="pt").input_ids
    key, value = kv_of_text(backbone.model, ids)
    fields = {"template": TEMPLATE, "method": "prefix", "steps": 0, **meta}
    save_prefix(path, Prefix(key, value, make_meta(backbone.fingerprint, key.shape[2], **fields)))
    return path


def complete(url: str, key: str | None = None, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=120)


def eventually(check, timeout: float = 10.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def counter(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@contextlib.contextmanager
def arriving_together(server: Server, settle_s: float = 1.0):
    """Requests sent inside the block reach the server at one moment: the process is stopped
    (SIGSTOP) while the clients connect and send, which the kernel's listen backlog holds, and
    continued afterwards. Without this, a loaded machine can finish each 0.1 s request before
    the next one arrives, and nothing ever waits in the queue."""
    server.process.send_signal(signal.SIGSTOP)
    try:
        yield
        time.sleep(settle_s)
    finally:
        server.process.send_signal(signal.SIGCONT)
