"""No request, file or typo takes pt-serve down: each case a careless user or an attacker can
send, against a real server on loopback, followed by a check that the server still serves."""

from __future__ import annotations

import concurrent.futures
import io
import json
import socket
import subprocess
import time
import zipfile

import httpx
import numpy as np
import pytest

from serving import BIN, Server, complete, counter, eventually, write_prefix
from prefixkit.exporter.backbones import load_backbone
from prefixkit.runtime import make_meta

NORMAL = {"model": "alice", "prompt": "name : Aromi | Type : pub", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def export(tiny_llama_dir, tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("limits")
    (root / "tiny").symlink_to(tiny_export[0])  # the session's tiny export, read only
    backbone = load_backbone(tiny_llama_dir)
    write_prefix(backbone, "table-to-text:", root / "alice.npz")
    return root, backbone


@pytest.fixture(scope="module")
def server(export, tmp_path_factory):
    root, backbone = export
    prefix_dir = tmp_path_factory.mktemp("limits-prefixes")
    write_prefix(backbone, "Describe the restaurant", prefix_dir / "bob.npz")
    # Leftovers of uploads killed part-way: the server removes them at start.
    (prefix_dir / ".partial").mkdir()
    (prefix_dir / ".partial" / ".carol.npz.k3j2h1.tmp").write_bytes(b"half a file")
    served = Server(root / "tiny", f"--prefix={root / 'alice'}.npz", "--prefix-dir", str(prefix_dir),
                    "--prefix-recheck", "0.3", "--max-request-kb", "64", "--read-timeout", "1")
    served.prefix_dir = prefix_dir
    yield served
    served.stop()


def still_serves(url: str) -> None:
    """A normal request still gets its answer, and nothing is left waiting or running."""
    answer = complete(url, **NORMAL)
    assert answer.status_code == 200, answer.text
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert eventually(lambda: counter(url, "prefixkit_queue_depth") == 0 and counter(url, "prefixkit_active_rows") == 0)


def post_raw(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=60)


# -- one request stops no one -----------------------------------------------------------------------
@pytest.mark.parametrize("body, status", [
    (b'{"model": "alice", "prompt": "x", "max_tokens": 4, "temperature": 1e-50}', 200),
    (b'{"model": "alice", "prompt": "x", "max_tokens": 4, "temperature": 1e-300, "seed": 1}', 200),
    (b'{"model": "alice", "prompt": "x", "max_tokens": 4, "temperature": Infinity, "min_tokens": 2}', 400),
    (b'{"model": "alice", "prompt": "x", "max_tokens": 4, "temperature": NaN}', 400),
    (b'{"model": "alice", "prompt": "x", "max_tokens": 4, "num_beams": 2, "length_penalty": NaN}', 400),
    (b'{"model": "alice", "prompt": "x", "max_tokens": 4, "num_beams": 2, "length_penalty": -Infinity}', 400),
    (b'{"model": "alice", "prompt": "x", "max_tokens": 4, "temperature": 0.5, "seed": -1}', 400),
    (b'{"model": "alice", "prompt": "x", "max_tokens": 4, "temperature": 0.5, "seed": 99999999999999999999999}', 400),
])
def test_extreme_sampling_values_are_answered_or_refused_and_generation_goes_on(server, body, status):
    answer = post_raw(server.url, body)
    assert answer.status_code == status, answer.text
    if status == 400:
        assert answer.json()["error"]["type"] == "invalid_request_error"
    still_serves(server.url)


def test_a_tiny_temperature_samples_the_most_likely_token(server):
    greedy = complete(server.url, **NORMAL).json()["choices"][0]["text"]
    cold = complete(server.url, **{**NORMAL, "temperature": 1e-30, "seed": 5}).json()["choices"][0]["text"]
    assert cold == greedy


def test_three_refused_seeds_leave_the_queue_empty(server):
    for _ in range(3):
        assert complete(server.url, **{**NORMAL, "temperature": 0.7, "seed": -1}).status_code == 400
    assert counter(server.url, "prefixkit_queue_depth") == 0
    still_serves(server.url)


# -- files in the prefix directory ------------------------------------------------------------------
def deep_meta_prefix(path, backbone, depth: int = 200_000):
    write_prefix(backbone, "deep", path)
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in ("key", "value")}
    meta = json.loads(np.load(path)["meta"].tobytes())
    text = json.dumps(meta)[:-1] + ', "note": ' + "[" * depth + "]" * depth + "}"
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, meta=np.frombuffer(text.encode(), np.uint8))
    path.write_bytes(buffer.getvalue())
    return path


def test_a_bad_file_in_the_store_is_a_4xx_naming_it_and_changes_nothing_else(server, export, tmp_path):
    _, backbone = export
    deep_meta_prefix(server.prefix_dir / "deep.npz", backbone)
    for _ in range(2):  # the second answer comes from what the first remembered
        answer = complete(server.url, **{**NORMAL, "model": "deep"})
        assert answer.status_code == 422, answer.text
        message = answer.json()["error"]["message"]
        assert "'deep'" in message and "nested too deeply" in message
    # The store goes on: a file added after the bad one is served.
    write_prefix(backbone, "Someone new", server.prefix_dir / "erin.npz")
    assert complete(server.url, **{**NORMAL, "model": "erin"}).status_code == 200
    assert httpx.get(server.url + "/v1/models").status_code == 200
    (server.prefix_dir / "deep.npz").unlink()
    (server.prefix_dir / "erin.npz").unlink()
    still_serves(server.url)


def test_a_restart_with_a_bad_file_in_the_store_starts_and_serves_the_rest(export, tmp_path):
    root, backbone = export
    deep_meta_prefix(tmp_path / "deep.npz", backbone)
    write_prefix(backbone, "fine", tmp_path / "fine.npz")
    restarted = Server(root / "tiny", "--prefix-dir", str(tmp_path))
    try:
        assert {m["id"] for m in httpx.get(restarted.url + "/v1/models").json()["data"]} == {"tiny", "fine", "deep"}
        assert complete(restarted.url, **{**NORMAL, "model": "fine"}).status_code == 200
        assert complete(restarted.url, **{**NORMAL, "model": "deep"}).status_code == 422
    finally:
        restarted.stop()


def test_upload_leftovers_are_removed_at_start(server):
    assert sorted(p.name for p in (server.prefix_dir / ".partial").iterdir()) == []


def npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def prefix_bytes(backbone, tmp_path, **meta_fields) -> bytes:
    path = write_prefix(backbone, "uploaded", tmp_path / "u.npz")
    with np.load(path) as npz:
        key, value, meta = npz["key"], npz["value"], json.loads(npz["meta"].tobytes())
    meta.update(meta_fields)
    return npz_bytes(key=key, value=value, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))


@pytest.mark.parametrize("field, value, words", [
    ("losses", "oops", "'losses' is str"),
    ("stop", 5, "'stop' is int"),
    ("template", 5, "'template' is int"),
    ("template", "no input field", "{input}"),
    ("stop", ["x" * 300], "300 characters"),
    ("note", "x" * (5 << 20), "at most 4194304"),
])
def test_uploads_with_mistyped_or_oversized_meta_are_refused_and_everything_else_still_works(
        server, export, tmp_path, field, value, words):
    _, backbone = export
    answer = httpx.post(server.url + "/v1/prefixes", params={"name": "typo"}, timeout=60,
                        content=prefix_bytes(backbone, tmp_path, **{field: value}))
    assert answer.status_code == 400 and words in answer.json()["error"]["message"], answer.text
    assert httpx.get(server.url + "/v1/models").status_code == 200
    still_serves(server.url)


def test_a_zip_bomb_is_refused_from_its_header_without_being_inflated(server, export, tmp_path):
    _, backbone = export
    a = backbone.architecture
    P = 2_000_000  # 2 layers x 2 heads x 2M positions x 16 x 4 bytes: 512 MB of zeros, about 0.5 MB deflated
    meta = make_meta(backbone.fingerprint, P)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in ("key", "value"):
            with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (a.n_layers, a.n_kv_heads, P, a.head_dim)})
                zeros = bytes(1 << 24)
                for _ in range(a.n_layers * a.n_kv_heads * P * a.head_dim * 4 // len(zeros)):
                    f.write(zeros)
        archive.writestr("meta.npy", npz_member(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
    data = buffer.getvalue()
    assert len(data) < 4 << 20
    peak_before = peak_rss_kb(server.process.pid)
    answer = httpx.post(server.url + "/v1/prefixes", params={"name": "bomb"}, content=data, timeout=60)
    assert answer.status_code == 400 and "more than a prefix for this backbone can hold" in answer.text, answer.text
    assert peak_rss_kb(server.process.pid) - peak_before < 100_000  # nothing near 1 GB was inflated
    answer = httpx.post(server.url + "/v1/prefixes", params={"name": "huge"}, content=declared_only((2, 2, 10**17, 16)))
    assert answer.status_code == 400, answer.text
    still_serves(server.url)


def declared_only(shape: tuple[int, ...]) -> bytes:
    """An .npz whose key and value headers declare `shape` (20 PiB here) and hold no data."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("key", "value"):
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": shape})
            archive.writestr(f"{name}.npy", header.getvalue())
        archive.writestr("meta.npy", npz_member(np.frombuffer(b'{"format": 1}', np.uint8)))
    return buffer.getvalue()


def npz_member(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array)
    return buffer.getvalue()


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


# -- request sizes and the machine's time --------------------------------------------------------------
@pytest.mark.parametrize("body, status, words", [
    ({**NORMAL, "prompt": "x" * (70 << 10)}, 413, "at most 65536 bytes"),
    ({**NORMAL, "stop": ["a"] * 17}, 400, "at most 16"),
    ({**NORMAL, "stop": ["a" * 2000]}, 400, "at most 256 characters"),
    ({**NORMAL, "prompt": ["x"] * 65}, 400, "1 to 64 prompts"),
    ({**NORMAL, "prompt": "\ud800"}, 400, "lone surrogate"),
    ({**NORMAL, "model": "tiny", "prompt": ""}, 400, "the input is empty"),
    ({**NORMAL, "prompt": []}, 400, "1 to 64 prompts"),
])
def test_requests_over_a_limit_get_a_4xx_naming_the_limit(server, body, status, words):
    answer = post_raw(server.url, json.dumps(body).encode())
    assert answer.status_code == status and words in answer.json()["error"]["message"], answer.text
    still_serves(server.url)


def requests_counted(url: str, route: str, status: int) -> float:
    line = f'prefixkit_requests_total{{route="{route}",status="{status}"}} '
    return sum(float(x.split()[-1]) for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(line))


def test_errors_come_in_the_api_shape_and_are_counted(server):
    before = requests_counted(server.url, "/v1/completions", 400)
    answer = post_raw(server.url, b'{"model": "alice", "prompt": "\xff\xfe"}')
    assert answer.status_code == 400 and set(answer.json()) == {"error"}, answer.text
    too_big = post_raw(server.url, b" " * (65 << 10))
    assert too_big.status_code == 413 and set(too_big.json()) == {"error"}
    assert requests_counted(server.url, "/v1/completions", 400) == before + 1
    assert requests_counted(server.url, "unmatched", 413) >= 1


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_go_on(export):
    """While a long prompt is prefilled, a row that is decoding keeps getting tokens: between
    the long row's arrival and its first token, the short row gains several. The long row's
    tokens equal the runtime's alone (chunked prefill is exact)."""
    from prefixkit.runtime.batching import Batcher, Row
    from prefixkit.runtime.generate import GenerationSettings, Generator
    from prefixkit.runtime.session import ExportedBackbone

    root, _ = export
    generator = Generator(ExportedBackbone(root / "tiny", threads=1))
    prefix = generator.add_prefix("alice", root / "alice.npz")
    batcher = Batcher(generator, window_s=0, prefill_chunk=8)
    try:
        short = Row(prefix, [5, 6, 7], GenerationSettings(max_new_tokens=60, min_new_tokens=60))
        long_ids = [int(i) for i in np.random.default_rng(0).integers(10, 400, 80)]
        long = Row(prefix, long_ids, GenerationSettings(max_new_tokens=8))
        seen = {}
        long.on_token = lambda r: seen.setdefault("short_at_first", len(short.token_ids))
        finished = concurrent.futures.Future(), concurrent.futures.Future()
        short.on_done, long.on_done = (lambda r: finished[0].set_result(r)), (lambda r: finished[1].set_result(r))

        def arrive(row):  # the long prompt arrives while the short row decodes (from the worker)
            if len(row.token_ids) == 2:
                batcher.submit([long])

        short.on_token = arrive
        batcher.submit([short])
        finished[0].result(60), finished[1].result(60)
    finally:
        batcher.close()
    assert seen["short_at_first"] - 2 >= 5  # 80 tokens in chunks of 8: the short row went on
    assert long.token_ids == generator.generate([(prefix, long_ids)], max_new_tokens=8)[0].token_ids
    assert short.token_ids == generator.generate([(prefix, [5, 6, 7])], max_new_tokens=60, min_new_tokens=60)[0].token_ids


def test_an_error_in_one_row_fails_that_row_alone_and_the_loop_goes_on(export):
    from prefixkit.runtime.batching import Batcher, Row
    from prefixkit.runtime.generate import GenerationSettings, Generator
    from prefixkit.runtime.session import ExportedBackbone

    root, _ = export
    generator = Generator(ExportedBackbone(root / "tiny", threads=1))
    batcher = Batcher(generator, window_s=0.05)
    try:
        broken = GenerationSettings(max_new_tokens=20, do_sample=True, temperature=float("nan"))  # never checked
        rows = [Row(None, [5, 6, 7], GenerationSettings(max_new_tokens=20, min_new_tokens=20)),
                Row(None, [8, 9], broken)]
        done = [concurrent.futures.Future() for _ in rows]
        for row, future in zip(rows, done):
            row.on_done = future.set_result
        batcher.submit(rows)
        good, bad = (f.result(60) for f in done)
        assert good.finish_reason == "length" and len(good.token_ids) == 20
        assert bad.finish_reason == "error" and "choosing a token failed" in bad.error
        assert batcher.alive and batcher.queue_depth == 0 and batcher.active_rows == 0
        with pytest.raises(ValueError):  # a bad seed is refused at submit, and takes nothing
            batcher.submit([Row(None, [5], GenerationSettings(do_sample=True, seed=-1))])
        assert batcher.queue_depth == 0
    finally:
        batcher.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_health_reports_a_decode_loop_that_stopped(export):
    from starlette.testclient import TestClient

    from prefixkit.runtime.app import create_app
    from prefixkit.runtime.service import ServeConfig

    class Fatal(BaseException):
        pass

    root, _ = export
    app = create_app(ServeConfig(backbone=root / "tiny", prefixes={"alice": root / "alice.npz"}))
    with TestClient(app) as client:
        assert client.get("/health").json()["status"] == "ok"
        service = app.state["service"]

        def fatal(*args, **kwargs):
            raise Fatal("the worker met something it cannot handle")

        service.generator.exported.run_alone = fatal
        answer = client.post("/v1/completions", json=NORMAL)
        assert answer.status_code == 500 and "Fatal" in answer.json()["error"]["message"]
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "decode loop stopped"
        assert client.post("/v1/completions", json=NORMAL).status_code == 503
        assert "prefixkit_decode_loop_up 0.0" in client.get("/metrics").text


# -- names, races, hang-ups and slow clients ---------------------------------------------------------------
def test_a_name_with_a_trailing_newline_is_refused(server, export, tmp_path):
    data = (export[0] / "alice.npz").read_bytes()
    answer = httpx.post(server.url + "/v1/prefixes?name=abc%0A", content=data)
    assert answer.status_code == 400 and "not a usable prefix name" in answer.json()["error"]["message"]
    assert not any("\n" in p.name for p in server.prefix_dir.iterdir())


def test_uploads_deletes_and_requests_racing_on_one_name_get_a_whole_version_and_no_5xx(server, export):
    """Threads upload one of two versions of a name, delete it and generate with it: every answer
    is what one of the versions gives alone, nothing is a 5xx, and the server ends agreeing with
    the store."""
    versions = [(export[0] / "alice.npz").read_bytes(), (server.prefix_dir / "bob.npz").read_bytes()]
    alone = []
    for data in versions:
        assert httpx.post(server.url + "/v1/prefixes", params={"name": "racer"}, content=data).status_code == 200
        alone.append(complete(server.url, **{**NORMAL, "model": "racer"}).json()["choices"][0]["text"])
    assert alone[0] != alone[1]

    def act(i: int) -> tuple[int, str | None]:
        if i % 4 == 0:
            return httpx.delete(server.url + "/v1/prefixes/racer", timeout=60).status_code, None
        if i % 4 == 1:
            answer = httpx.post(server.url + "/v1/prefixes", params={"name": "racer"}, content=versions[i % 8 // 4],
                                timeout=60)
            return answer.status_code, None
        answer = complete(server.url, **{**NORMAL, "model": "racer"})
        return answer.status_code, answer.json()["choices"][0]["text"] if answer.status_code == 200 else None

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(act, range(80)))
    statuses = [s for s, _ in results]
    assert all(s in (200, 404) for s in statuses) and 200 in statuses, statuses
    assert {text for _, text in results if text is not None} <= set(alone)
    kept = server.prefix_dir / "racer.npz"
    answer = complete(server.url, **{**NORMAL, "model": "racer"})
    if kept.exists():
        assert answer.json()["choices"][0]["text"] == alone[versions.index(kept.read_bytes())]
    else:
        assert answer.status_code == 404
    httpx.delete(server.url + "/v1/prefixes/racer")


def test_a_client_that_hangs_up_on_a_plain_request_stops_its_generation(export):
    """One row at a time: two other requests of 32 prompts each queue 64 rows of 110 tokens,
    ours comes behind at least 40 of them, and its client hangs up as soon as it has sent it.
    Its row must leave without generating: the server ends up with exactly the others'
    64 x 110 tokens (ours would add 110) and counts one 499.

    The client hangs up at once because the tiny model is fast (a row takes milliseconds): the
    server sees the hang-up as soon as it has queued the row, while 40 rows of work are still
    ahead of it."""
    root, _ = export
    served = Server(root / "tiny", f"--prefix={root / 'alice'}.npz", "--no-batching")
    try:
        fields = {**NORMAL, "prompt": "x", "max_tokens": 110, "min_tokens": 110}
        body = json.dumps(fields).encode()
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        before = counter(served.url, "prefixkit_tokens_generated_total")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            others = [pool.submit(complete, served.url, **{**fields, "prompt": ["x"] * 32}) for _ in range(2)]
            assert eventually(lambda: counter(served.url, "prefixkit_queue_depth") >= 40, timeout=20)
            with socket.create_connection(("127.0.0.1", served.port)) as s:
                s.sendall(request)
            assert all(f.result().status_code == 200 for f in others)
        assert eventually(lambda: counter(served.url, "prefixkit_active_rows") == 0
                          and counter(served.url, "prefixkit_queue_depth") == 0)
        assert eventually(lambda: requests_counted(served.url, "/v1/completions", 499) == 1)
        assert counter(served.url, "prefixkit_tokens_generated_total") - before == 64 * 110
    finally:
        served.stop()


def test_slow_headers_and_slow_bodies_are_cut_off(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        s.settimeout(5)
        started = time.time()
        assert s.recv(1024) == b"" and time.time() - started < 4  # closed after --read-timeout 1
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"model\": ")
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")
    still_serves(server.url)


# -- start-up and the command line ---------------------------------------------------------------------
@pytest.mark.parametrize("keys, words", [
    ({"keys": [{"key": "admin-key-0001", "admin": "false"}]}, "keys.0.admin"),
    ({"keys": [{"key": "alice-key-0001", "prefixes": "e2e"}]}, "keys.0.prefixes"),
    ({"keys": [{"key": "alice-key-0001", "prefix": ["e2e"]}]}, "keys.0.prefix"),
    ({"keys": [{"key": "short"}]}, "at least 8 characters"),
])
def test_a_typo_in_the_keys_file_stops_the_start_in_one_sentence(export, tmp_path, keys, words):
    root, _ = export
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(keys))
    run = subprocess.run([str(BIN / "pt-serve"), "--export", str(root / "tiny"), "--keys", str(path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and words in run.stderr and "Traceback" not in run.stderr, run.stderr


def bad_prefix_files(root, backbone, tmp_path) -> dict:
    good = root / "alice.npz"
    with np.load(good) as npz:
        key, value, meta = npz["key"], npz["value"], json.loads(npz["meta"].tobytes())
    files = {}
    files["not-npy"] = tmp_path / "not-npy.npz"
    with zipfile.ZipFile(files["not-npy"], "w") as archive:
        for name, array in (("key", key), ("value", value)):
            archive.writestr(f"{name}.npy", npz_member(array))
        archive.writestr("meta.npy", npz_member(np.frombuffer(json.dumps(meta).encode(), np.uint8)))
        archive.writestr("notes.txt", b"hello")
    files["deep"] = deep_meta_prefix(tmp_path / "deep.npz", backbone, depth=50_000)
    files["huge"] = tmp_path / "huge.npz"
    files["huge"].write_bytes(declared_only((2, 2, 10**17, 16)))
    files["template"] = tmp_path / "template.npz"
    files["template"].write_bytes(npz_bytes(key=key, value=value, meta=np.frombuffer(
        json.dumps({**meta, "template": 5}).encode(), np.uint8)))
    return files


def test_pt_generate_and_pt_serve_refuse_bad_prefixes_in_one_sentence(export, tmp_path):
    root, backbone = export
    for name, path in bad_prefix_files(root, backbone, tmp_path).items():
        commands = [[str(BIN / "pt-generate"), str(root / "tiny"), "x", "--prefix", str(path)]]
        if name in ("not-npy", "template"):  # pt-serve reads --prefix files as pt-generate does
            commands.append([str(BIN / "pt-serve"), "--export", str(root / "tiny"), "--prefix", str(path)])
        for command in commands:
            run = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert run.returncode != 0, (name, command[0])
            assert "Traceback" not in run.stderr and str(path) in run.stderr, (name, run.stderr)


def test_a_truncated_weights_file_is_one_sentence(export, tmp_path):
    import shutil

    root, _ = export
    broken = tmp_path / "broken"
    shutil.copytree(root / "tiny", broken)
    data = broken / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    for command in ([str(BIN / "pt-generate"), str(broken), "x"],
                    [str(BIN / "pt-serve"), "--export", str(broken)]):
        run = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and "Traceback" not in run.stderr, run.stderr
        assert "export it again" in run.stderr, run.stderr
