"""pt-serve with its prefixes in an object store: moto's S3-compatible server on loopback (the
same boto3 code as against a real service), two pt-serve processes sharing one bucket, and what
goes wrong with a store: a corrupt object, wrong credentials, an unreachable service."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import time

import boto3
import httpx
import pytest

from serving import BIN, Server, complete, write_prefix

RECHECK = 0.5  # --prefix-recheck of the servers: the bound on seeing another server's write


@pytest.fixture(scope="module")
def export(tiny_export, tmp_path_factory):
    """The export, and two versions of a prefix for it."""
    tiny, backbone = tiny_export
    root = tmp_path_factory.mktemp("object-store")
    versions = [write_prefix(backbone, words, root / f"v{i}.npz").read_bytes()
                for i, words in enumerate(["the first words", "other words entirely, and more of them"])]
    return tiny, versions


@pytest.fixture(scope="module")
def two(export, s3_endpoint):
    """Two servers on one bucket."""
    tiny, _ = export
    a = Server(tiny, "--prefix-dir", "s3://prefixes/shared", "--prefix-recheck", str(RECHECK))
    b = Server(tiny, "--prefix-dir", "s3://prefixes/shared", "--prefix-recheck", str(RECHECK))
    yield a, b
    a.stop()
    b.stop()


def upload(server: Server, name: str, data: bytes) -> int:
    return httpx.post(server.url + "/v1/prefixes", params={"name": name}, content=data, timeout=60).status_code


def answer(server: Server, name: str) -> str | int:
    """The greedy text for a fixed prompt, or the status when it is not 200."""
    got = complete(server.url, model=name, prompt="name : Aromi", max_tokens=6, temperature=0)
    return got.json()["choices"][0]["text"] if got.status_code == 200 else got.status_code


def within(bound: float, check) -> float:
    """Seconds until `check()` holds; fails past the bound (plus a second for the request itself)."""
    started = time.perf_counter()
    while not check():
        assert time.perf_counter() - started < bound + 1.0, f"not within {bound} s"
        time.sleep(0.05)
    return time.perf_counter() - started


def test_an_upload_through_one_server_is_served_by_the_other_and_a_delete_reaches_it(two, export):
    a, b = two
    _, versions = export
    assert answer(b, "u1") == 404
    assert upload(a, "u1", versions[0]) == 200
    first = answer(a, "u1")
    assert answer(b, "u1") == first  # a name B has not held is read on its first request
    assert upload(a, "u1", versions[1]) == 200
    second = answer(a, "u1")
    assert second != first
    within(RECHECK, lambda: answer(b, "u1") == second)  # B held the old version: replaced within the bound
    assert httpx.delete(a.url + "/v1/prefixes/u1").status_code == 200
    within(RECHECK, lambda: answer(b, "u1") == 404)
    assert "u1" not in {m["id"] for m in httpx.get(b.url + "/v1/models").json()["data"]}


def test_twenty_writers_on_one_name_leave_one_whole_version_both_servers_serve(two, export):
    a, b = two
    _, versions = export
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda i: upload((a, b)[i % 2], "w", versions[i // 2 % 2]), range(20)))
    assert statuses == [200] * 20
    stored = boto3.client("s3").get_object(Bucket="prefixes", Key="shared/w.npz")["Body"].read()
    assert stored in versions
    assert upload(a, "probe", stored) == 200  # that version's own answer
    expected = answer(a, "probe")
    within(RECHECK, lambda: answer(a, "w") == expected and answer(b, "w") == expected)


def test_a_corrupt_object_is_a_4xx_naming_it_and_the_others_go_on(two, export):
    a, _ = two
    _, versions = export
    boto3.client("s3").put_object(Bucket="prefixes", Key="shared/broken.npz", Body=versions[0][:300])
    got = complete(a.url, model="broken", prompt="x", max_tokens=3)
    assert got.status_code == 422 and "'broken'" in got.json()["error"]["message"]
    assert upload(a, "fine", versions[0]) == 200 and isinstance(answer(a, "fine"), str)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_store_is_a_503_and_prefixes_in_memory_go_on(export, s3_endpoint):
    from moto.server import ThreadedMotoServer

    tiny, versions = export
    port = _port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="soon-gone")
    server = Server(tiny, "--prefix-dir", "s3://soon-gone", "--prefix-recheck", "0", env=env)
    try:
        assert upload(server, "kept", versions[0]) == 200
        kept = answer(server, "kept")
        moto.stop()
        assert answer(server, "kept") == kept
        got = complete(server.url, model="other", prompt="x", max_tokens=3)
        message = got.json()["error"]["message"]
        assert got.status_code == 503 and "cannot be reached" in message and "\n" not in message
        assert httpx.get(server.url + "/v1/models").status_code == 503
        assert upload(server, "new", versions[0]) == 503
    finally:
        server.stop()


def test_wrong_credentials_stop_the_start_with_one_sentence(export, tmp_path):
    tiny, _ = export
    port = _port()
    # moto checking every request's credentials (it knows none, so every key is wrong)
    moto = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        run = subprocess.run([str(BIN / "pt-serve"), "--export", str(tiny), "--prefix-dir", "s3://prefixes",
                              "--port", str(_port())], env=env, capture_output=True, text=True, timeout=120)
    finally:
        moto.terminate()
        moto.wait(30)
    assert run.returncode != 0
    assert "access denied" in run.stderr and "credentials" in run.stderr and "Traceback" not in run.stderr
