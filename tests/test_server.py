"""pt-serve as users meet it: a real server on a loopback port, called with a real HTTP client
(httpx) and with the official openai client. Outputs are compared with the runtime generating
each request alone."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import pytest

from conftest import e2e_rows
from serving import Server, arriving_together, complete, counter, eventually, write_prefix
from prefixkit.exporter.backbones import load_backbone
from prefixkit.exporter.onnx_export import export_backbone
from prefixkit.exporter.reference import kv_of_text
from prefixkit.runtime import make_meta, save_prefix
from prefixkit.runtime.generate import Generator
from prefixkit.runtime.prefix import Prefix
from prefixkit.runtime.session import ExportedBackbone

PHRASES = {"alice": "table-to-text:", "bob": "Describe the restaurant", "carol": "Write one sentence about it,"}
ADMIN, ALICE_KEY = "admin-key-0001", "alice-key-0001"


@pytest.fixture(scope="module", params=["fused", "optimum"])
def served(request, tiny_llama_dir, tiny_gpt2_dir, tmp_path_factory):
    """An export of a tiny backbone (Llama as the fused graph, GPT-2 as the optimum graph),
    three users' prefixes in a prefix directory, and a server over them."""
    source = tiny_llama_dir if request.param == "fused" else tiny_gpt2_dir
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    export = root / "tiny"
    export_backbone(str(source), export, graph=request.param)
    backbone = load_backbone(source)
    prefix_dir = root / "prefixes"
    prefix_dir.mkdir()
    for name, phrase in PHRASES.items():
        write_prefix(backbone, phrase, prefix_dir / f"{name}.npz", stop=["."] if name == "carol" else [])
    server = Server(export, "--prefix-dir", str(prefix_dir), "--batch-window-ms", "50", "--prefix-recheck", "0.5",
                    "--max-tokens-cap", "256")
    generator = Generator(ExportedBackbone(export, threads=1))
    for name in PHRASES:
        generator.add_prefix(name, prefix_dir / f"{name}.npz")
    yield {"server": server, "export": export, "backbone": backbone, "generator": generator,
           "prefix_dir": prefix_dir, "root": root}
    server.stop()


def inputs(n: int) -> list[str]:
    from prefixkit.training.data import linearise_e2e

    return [linearise_e2e(mr) for mr in sorted({r["mr"] for r in e2e_rows()})[:n]]


def solo(served, model: str, text: str, max_tokens: int, **settings) -> str:
    return served["generator"].complete([(model, text)], max_new_tokens=max_tokens, **settings)[0].text


def test_health_and_models_list_every_prefix_with_its_length_and_training(served):
    url = served["server"].url
    assert httpx.get(url + "/health").json()["status"] == "ok"
    # A prefix is read on its first request; the list gives its length and training once in memory.
    assert complete(url, model="alice", prompt="x", max_tokens=2, temperature=0).status_code == 200
    assert httpx.get(url + "/health").json()["prefixes"] >= 1
    models = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
    assert set(models) == {"tiny", *PHRASES}
    assert models["alice"]["prefix_len"] == served["generator"].prefixes["alice"].prefix_len
    assert models["alice"]["training"]["method"] == "prefix"
    metrics = httpx.get(url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("prefixkit_requests_total", "prefixkit_batch_rows_bucket", "prefixkit_batch_prefixes_bucket",
                 "prefixkit_queue_depth",
                 "prefixkit_active_rows", "prefixkit_request_latency_seconds_bucket",
                 "prefixkit_tokens_generated_total", "prefixkit_prefixes", 'prefixkit_prefix_requests_total{prefix="other"}',
                 "prefixkit_prefix_cache_hits_total", "prefixkit_prefix_cache_bytes"):
        assert name in metrics.text, name


def test_mixed_user_batch_outputs_equal_each_request_served_alone(served):
    url = served["server"].url
    jobs = [(name, text) for text in inputs(4) for name in [*PHRASES, "tiny"]]
    before = _batch_histogram(url)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool, arriving_together(served["server"]):
        futures = [pool.submit(complete, url, model=name, prompt=text, max_tokens=24, temperature=0)
                   for name, text in jobs]
    answers = [f.result() for f in futures]
    after = _batch_histogram(url)
    for (name, text), answer in zip(jobs, answers):
        assert answer.status_code == 200, answer.text
        expected = solo(served, None if name == "tiny" else name, text, 24)
        assert answer.json()["choices"][0]["text"] == expected, (name, text)
    # Requests of different users really shared forward passes.
    assert after["rows"] - before["rows"] > 1.5 * (after["passes"] - before["passes"])
    assert after["mixed"] > before["mixed"]


def _batch_histogram(url: str) -> dict[str, float]:
    """Rows decoded and forward passes so far; more rows than passes means shared passes."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("prefixkit_batch_rows_sum"):
            values["rows"] = float(line.split()[-1])
        elif line.startswith("prefixkit_batch_rows_count"):
            values["passes"] = float(line.split()[-1])
        elif line.startswith('prefixkit_batch_prefixes_bucket{le="1.0"}'):
            values["single"] = float(line.split()[-1])
        elif line.startswith("prefixkit_batch_prefixes_count"):
            values["all"] = float(line.split()[-1])
    values["mixed"] = values["all"] - values["single"]  # passes that carried two or more prefixes
    return values


def test_prompt_list_beam_search_and_stop_strings(served):
    url = served["server"].url
    texts = inputs(2)
    answer = complete(url, model="bob", prompt=texts, max_tokens=16, num_beams=3, length_penalty=0.8).json()
    for choice, text in zip(answer["choices"], texts):
        assert choice["text"] == solo(served, "bob", text, 16, num_beams=3, length_penalty=0.8)
    assert answer["usage"]["completion_tokens"] > 0
    stopped = complete(url, model="carol", prompt=texts[0], max_tokens=40, temperature=0).json()["choices"][0]
    assert "." not in stopped["text"]  # carol's prefix carries the stop string "."
    assert stopped["text"] == solo(served, "carol", texts[0], 40)


def test_streaming_sends_events_that_add_up_to_the_whole_completion(served):
    url = served["server"].url
    text = inputs(1)[0]
    for settings in ({"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}):
        body = {"model": "alice", "prompt": text, "max_tokens": 20, "min_tokens": 20, **settings}
        whole = complete(url, **body).json()["choices"][0]
        pieces, reasons = [], []
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        # Random tiny models often say special tokens, which add no text: the number of events
        # varies, what they add up to does not.
        assert lines[-1] == "data: [DONE]" and len(lines) >= 2
        for line in lines[:-1]:
            choice = json.loads(line[6:])["choices"][0]
            pieces.append(choice["text"])
            reasons.append(choice["finish_reason"])
        assert "".join(pieces) == whole["text"] and reasons[-1] == whole["finish_reason"]
    # The same seed samples the same text again; greedy equals the runtime alone.
    body = {"model": "alice", "prompt": text, "max_tokens": 20, "temperature": 0.9, "seed": 3}
    assert complete(url, **body).json()["choices"][0]["text"] == complete(url, **body).json()["choices"][0]["text"]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "nobody", "prompt": "x"}, 404, "no prefix named 'nobody'"),
    ({"model": "alice", "prompt": "x", "max_tokens": 1000}, 400, "at most 256"),
    ({"model": "alice", "prompt": "word " * 200, "max_tokens": 8}, 400, "tokens"),
    ({"model": "alice"}, 400, "prompt"),
    ({"model": "alice", "prompt": "x", "num_beams": 2, "stream": True}, 400, "stream"),
    ({"model": "alice", "prompt": "x", "n": 2}, 400, "n must be 1"),
])
def test_bad_requests_get_a_clear_4xx_and_change_nothing(served, body, status, words):
    url = served["server"].url
    before = httpx.get(url + "/v1/models").json()
    answer = complete(url, **body)
    assert answer.status_code == status and words in answer.json()["error"]["message"], answer.text
    assert httpx.get(url + "/v1/models").json() == before


def test_prompt_longer_than_the_context_says_its_token_count_and_the_limit(served):
    answer = complete(served["server"].url, model="alice", prompt="word " * 200, max_tokens=8).json()
    message = answer["error"]["message"]
    assert "the input is" in message and "the backbone takes 128" in message


def test_invalid_json_is_a_400(served):
    answer = httpx.post(served["server"].url + "/v1/completions", content=b"{not json",
                        headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "invalid request" in answer.json()["error"]["message"]


def test_prefixes_come_and_go_without_a_restart(served, tmp_path):
    url, prefix_dir, backbone = served["server"].url, served["prefix_dir"], served["backbone"]
    # Upload: validated, kept in the directory, usable at once.
    data = write_prefix(backbone, "A new user's words", tmp_path / "dave.npz").read_bytes()
    up = httpx.post(url + "/v1/prefixes", params={"name": "dave"}, content=data)
    assert up.status_code == 200 and up.json()["replaced"] is False
    assert (prefix_dir / "dave.npz").exists()
    assert complete(url, model="dave", prompt="x", max_tokens=4, temperature=0).status_code == 200
    # Delete: gone from the list, the directory and the API.
    assert httpx.delete(url + "/v1/prefixes/dave").status_code == 200
    assert not (prefix_dir / "dave.npz").exists()
    assert complete(url, model="dave", prompt="x", max_tokens=4).status_code == 404
    assert httpx.delete(url + "/v1/prefixes/dave").status_code == 404
    # A file dropped into the store is listed, and served from its first request ...
    write_prefix(backbone, "Someone else entirely", prefix_dir / "erin.npz")
    assert "erin" in _model_ids(url)
    assert complete(url, model="erin", prompt="x", max_tokens=4, temperature=0).status_code == 200
    # ... and once removed, it is gone from the list at once, and from the API after the
    # recheck interval (0.5 s here), or at once with an explicit reload.
    (prefix_dir / "erin.npz").unlink()
    assert "erin" not in _model_ids(url)
    assert httpx.post(url + "/v1/prefixes/reload").json()["removed"] == ["erin"]
    assert complete(url, model="erin", prompt="x", max_tokens=4).status_code == 404


def _model_ids(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}


def test_bad_uploads_are_refused_and_change_nothing(served, tmp_path):
    url, backbone = served["server"].url, served["backbone"]
    before = _model_ids(url)
    cases = {
        "garbage": b"this is not an npz file",
        "empty": b"",
    }
    foreign = tmp_path / "foreign.npz"
    ids = backbone.tokenizer("other", return_tensors="pt").input_ids
    key, value = kv_of_text(backbone.model, ids)
    save_prefix(foreign, Prefix(key, value, make_meta("pkfp1-" + "0" * 64, key.shape[2])))
    cases["foreign"] = foreign.read_bytes()
    for name, data in cases.items():
        answer = httpx.post(url + "/v1/prefixes", params={"name": name}, content=data)
        assert answer.status_code == 400, answer.text
        assert "uploaded file" in answer.json()["error"]["message"] or "empty" in answer.json()["error"]["message"]
    assert "not this one" in httpx.post(url + "/v1/prefixes", params={"name": "x"},
                                        content=cases["foreign"]).json()["error"]["message"]
    assert httpx.post(url + "/v1/prefixes", params={"name": "../evil"}, content=cases["foreign"]).status_code == 400
    assert _model_ids(url) == before
    assert sorted(p.name for p in served["prefix_dir"].iterdir() if p.name != ".partial") == sorted(f"{n}.npz" for n in PHRASES)


def test_official_openai_client_calls_the_server(served):
    from openai import OpenAI

    client = OpenAI(base_url=served["server"].url + "/v1", api_key="unused", max_retries=0)
    text = inputs(1)[0]
    completion = client.completions.create(model="bob", prompt=text, max_tokens=12, temperature=0)
    assert completion.choices[0].text == solo(served, "bob", text, 12)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="bob", prompt=text, max_tokens=12, temperature=0, stream=True))
    assert streamed == completion.choices[0].text
    assert {m.id for m in client.models.list()} >= set(PHRASES)


def test_a_client_that_disconnects_leaves_the_batch_and_others_continue(served):
    """The hung-up row must stop short of its 110 tokens. A tiny model makes them in ~0.1 s, so
    on a loaded machine the hang-up may be noticed too late; up to three tries."""
    url = served["server"].url
    body = {"model": "alice", "prompt": "x", "max_tokens": 110, "min_tokens": 110, "temperature": 0, "stream": True}
    for _ in range(3):
        tokens_before = counter(url, "prefixkit_tokens_generated_total")
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            first = next(line for line in r.iter_lines() if line)  # the first event, then hang up
            assert first.startswith("data: {")
        other = complete(url, model="bob", prompt="x", max_tokens=8, min_tokens=8, temperature=0)
        assert other.status_code == 200 and other.json()["usage"]["completion_tokens"] == 8
        assert eventually(lambda: counter(url, "prefixkit_active_rows") == 0)
        generated = counter(url, "prefixkit_tokens_generated_total") - tokens_before - 8
        assert generated >= 1
        if generated < 110:  # the hung-up request stopped before its 110 tokens
            break
    assert generated < 110


@pytest.fixture(scope="module")
def fused_export(tiny_llama_dir, tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-keys")
    (root / "tiny").symlink_to(tiny_export[0])  # the session's tiny export, read only
    backbone = load_backbone(tiny_llama_dir)
    for name, phrase in PHRASES.items():
        write_prefix(backbone, phrase, root / f"{name}.npz")
    return root, backbone


def test_api_keys_limit_each_key_to_its_prefixes_and_reveal_nothing_else(fused_export, tmp_path):
    root, backbone = fused_export
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": ALICE_KEY, "prefixes": ["alice"]}, {"key": ADMIN, "admin": True}]}))
    server = Server(root / "tiny", "--keys", str(keys), *[f"--prefix={root / n}.npz" for n in PHRASES])
    try:
        url = server.url
        assert complete(url, ALICE_KEY, model="alice", prompt="x", max_tokens=3).status_code == 200
        for other in ("bob", "nobody", "tiny"):  # existing or not: the same 403
            answer = complete(url, ALICE_KEY, model=other, prompt="x", max_tokens=3)
            assert answer.status_code == 403
            assert answer.json()["error"]["message"] == f"this key may not use model '{other}'."
        assert complete(url, None, model="alice", prompt="x").status_code == 401
        assert complete(url, "wrong-key-000", model="alice", prompt="x").status_code == 401
        listed = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {ALICE_KEY}"}).json()
        assert [m["id"] for m in listed["data"]] == ["alice"]
        data = (root / "bob.npz").read_bytes()
        user = httpx.post(url + "/v1/prefixes", params={"name": "x"}, content=data,
                          headers={"Authorization": f"Bearer {ALICE_KEY}"})
        assert user.status_code == 403
        admin = httpx.post(url + "/v1/prefixes", params={"name": "x"}, content=data,
                           headers={"Authorization": f"Bearer {ADMIN}"})
        assert admin.status_code == 200
        assert complete(url, ADMIN, model="x", prompt="x", max_tokens=3).status_code == 200
        assert complete(url, ALICE_KEY, model="x", prompt="x", max_tokens=3).status_code == 403
    finally:
        assert server.stop() in (0, -signal.SIGTERM)


def test_a_full_queue_answers_429_with_retry_after(fused_export):
    root, _ = fused_export
    server = Server(root / "tiny", f"--prefix={root / 'alice'}.npz", "--no-batching", "--max-queue", "2")
    try:
        body = {"model": "alice", "prompt": "x", "max_tokens": 100, "min_tokens": 100, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(12) as pool, arriving_together(server):
            futures = [pool.submit(complete, server.url, **body) for _ in range(12)]
        answers = [f.result() for f in futures]
        busy = [a for a in answers if a.status_code == 429]
        assert busy and all(a.headers["Retry-After"] == "1" for a in busy)
        assert all(a.status_code in (200, 429) for a in answers)
    finally:
        server.stop()


def test_sigterm_stops_intake_and_finishes_requests_in_flight(fused_export):
    """One request at a time, so at SIGTERM one is running and the others wait in the queue:
    all of them are answered in full, new connections are refused, then the process ends."""
    root, _ = fused_export
    server = Server(root / "tiny", f"--prefix={root / 'alice'}.npz", "--no-batching")
    body = {"model": "alice", "prompt": "x", "max_tokens": 100, "min_tokens": 100, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        with arriving_together(server):
            futures = [pool.submit(complete, server.url, **body) for _ in range(8)]
        assert eventually(lambda: counter(server.url, "prefixkit_queue_depth") > 0, 20)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)
        answers = [f.result() for f in futures]
    assert [a.status_code for a in answers] == [200] * 8
    assert all(a.json()["usage"]["completion_tokens"] == 100 for a in answers)
    assert server.process.wait(timeout=60) in (0, -signal.SIGTERM)


def test_streamed_text_holds_back_what_may_become_a_stop_string_or_a_split_character():
    from prefixkit.runtime.stops import sendable

    assert sendable("The Eagle is a pub. It", (". It",)) == "The Eagle is a pub"
    assert sendable("The Eagle is a pub.", (". It",)) == "The Eagle is a pub"  # "." may start ". It"
    assert sendable("The Eagle is a pub", (". It",)) == "The Eagle is a pub"
    assert sendable("Caf\ufffd", ()) == "Caf"  # half of a multi-byte character
