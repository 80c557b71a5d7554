"""`make demo`: the whole path on the default backbone, two users through one model.

1. fetch smollm2-135m (once) and export it with `pt-export` (once);
2. start `pt-serve` with the two shipped prefixes, examples/prefixes/e2e.npz (restaurant tables)
   and examples/prefixes/webnlg.npz (DBpedia triples), each a user;
3. send both users' requests at the same time through the official OpenAI client;
4. print inputs, outputs and timings, and how many forward passes carried both users' rows
   (from the server's /metrics), then stop the server with SIGTERM and wait for it.

It fails (exit status 1) if no forward pass carried both users, or the server does not stop.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
USERS = {  # model name (the prefix's file name) -> test data the inputs come from
    "e2e": ROOT / "examples" / "data" / "e2e" / "test.csv",
    "webnlg": ROOT / "examples" / "data" / "webnlg" / "test.xml",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def inputs_for(path: Path, n: int) -> list[str]:
    """The first n distinct inputs of a test file, written the way the prefix was trained on them."""
    from prefixkit.training.data import load_examples, tables

    return [group[0].input for group in list(tables(load_examples(path)).values())[:n]]


def passes(url: str) -> dict[str, float]:
    """Forward passes so far: all of them, and those that carried rows of one prefix only."""
    values = {"all": 0.0, "single": 0.0}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("prefixkit_batch_prefixes_count"):
            values["all"] = float(line.split()[-1])
        elif line.startswith('prefixkit_batch_prefixes_bucket{le="1.0"}'):
            values["single"] = float(line.split()[-1])
    return values


@click.command()
@click.option("--backbone", default="smollm2-135m", show_default=True, help="Registry name to fetch and export.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Export folder, made with pt-export if missing [default: exports/ and the backbone's name].")
@click.option("--requests", "per_user", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Requests per user.")
@click.option("--max-tokens", type=click.IntRange(1, 256), default=60, show_default=True)
def main(backbone: str, export_dir: Path, per_user: int, max_tokens: int) -> None:
    """Two users, two prefixes, one model: train once, export once, serve both in one batch."""
    from openai import OpenAI

    started = time.perf_counter()
    export_dir = export_dir or ROOT / "exports" / Path(backbone).name.removesuffix(".gguf")
    step("export the backbone (once)")
    if (export_dir / "manifest.json").exists():
        click.echo(f"{export_dir} is there already")
    else:
        t = time.perf_counter()
        if subprocess.run([str(BIN / "pt-export"), backbone, "--output", str(export_dir)]).returncode:
            raise click.ClickException(f"pt-export could not export {backbone} (its message is above).")
        click.echo(f"exported in {time.perf_counter() - t:.0f} s (fetching {backbone} first if it was not cached)")

    step("start pt-serve with two users' prefixes")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "pt-serve"), "--export", str(export_dir), "--port", str(port),
               *(f"--prefix={ROOT / 'examples' / 'prefixes' / (name + '.npz')}" for name in USERS)]
    click.echo("$ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(str(ROOT)) else c for c in command))
    t = time.perf_counter()
    log = tempfile.TemporaryFile("w+")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise click.ClickException(f"pt-serve exited with status {server.returncode}:\n{log.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t > 120:
                raise click.ClickException("pt-serve did not answer /health within 120 s")
            time.sleep(0.2)
        click.echo(f"ready in {time.perf_counter() - t:.1f} s at {url}")
        client = OpenAI(base_url=url + "/v1", api_key="not-needed-without---keys")
        models = [m.id for m in client.models.list().data]
        click.echo(f"models: {', '.join(models)}")

        step(f"{per_user} requests from each user, sent at the same time (greedy, up to {max_tokens} tokens)")
        texts = {user: inputs_for(path, per_user) for user, path in USERS.items()}
        jobs = [(user, texts[user][i]) for i in range(per_user) for user in USERS]

        def ask(job):
            user, text = job
            t0 = time.perf_counter()
            answer = client.completions.create(model=user, prompt=text, max_tokens=max_tokens, temperature=0)
            return answer, time.perf_counter() - t0

        before = passes(url)
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(ask, jobs))
        wall = time.perf_counter() - t
        after = passes(url)
        tokens = 0
        for (user, text), (answer, seconds) in zip(jobs, answers):
            choice = answer.choices[0]
            tokens += answer.usage.completion_tokens
            click.echo(f"\n[{user}] {seconds:.2f} s, {answer.usage.completion_tokens} tokens, {choice.finish_reason}")
            click.echo(f"  in : {text}")
            click.echo(f"  out: {choice.text.strip()}")
        total = after["all"] - before["all"]
        mixed = total - (after["single"] - before["single"])
        click.echo(f"\n{len(jobs)} requests, {tokens} tokens in {wall:.2f} s ({tokens / wall:.1f} tokens/s together)")
        click.echo(f"forward passes: {total:.0f} (prefills included, one per request), of which {mixed:.0f} carried "
                   "both users' rows in one batch")
    finally:
        step("stop the server (SIGTERM: it finishes what it has, then exits)")
        t = time.perf_counter()
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise click.ClickException("pt-serve did not stop within 60 s of SIGTERM") from None
        click.echo(f"stopped in {time.perf_counter() - t:.1f} s (status {code}: uvicorn re-raises SIGTERM "
                   "after its graceful shutdown)" if code == -signal.SIGTERM else f"stopped, status {code}")
    if mixed < 1:
        raise click.ClickException("no forward pass carried both users' rows")
    click.echo(f"\ndemo done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
