"""Property-based fuzzing of what pt-serve takes from outside: its HTTP API, generated from the
OpenAPI schema FastAPI publishes (schemathesis), and prefix files (Hypothesis).

After every generated request the server must have answered below 500, still answer a normal
request, and have nothing left waiting or running. Every generated prefix file must load as a
valid prefix or be refused with PrefixFileError, one sentence naming the file."""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import Server, complete, counter, eventually, write_prefix
from prefixkit.exporter.backbones import load_backbone
from prefixkit.runtime.backbone import Architecture
from prefixkit.runtime.prefix import Prefix, PrefixFileError, load_prefix

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)


@pytest.fixture(scope="module")
def fuzzed_server(tiny_llama_dir, tiny_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "tiny").symlink_to(tiny_export[0])  # the session's tiny export, read only
    write_prefix(load_backbone(tiny_llama_dir), "table-to-text:", root / "alice.npz")
    server = Server(root / "tiny", f"--prefix={root / 'alice'}.npz", "--prefix-dir", str(root / "uploads"),
                    "--prefix-recheck", "0", "--max-tokens-cap", "64")
    yield server
    server.stop()


def healthy(url: str) -> None:
    answer = complete(url, model="tiny", prompt="name : Aromi", max_tokens=3, temperature=0)
    assert answer.status_code == 200, answer.text
    assert eventually(lambda: counter(url, "prefixkit_queue_depth") == 0 and counter(url, "prefixkit_active_rows") == 0)


def test_no_generated_request_gets_a_5xx_or_leaves_the_server_stuck(fuzzed_server):
    import schemathesis

    url = fuzzed_server.url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    schema.config.update(base_url=url, request_timeout=30)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/completions", "GET /v1/models", "POST /v1/prefixes", "DELETE /v1/prefixes/{name}", "GET /health"}
    failures = []
    for operation in operations:
        examples = 50 if operation.path == "/v1/completions" else 10
        # valid requests by the schema, and requests that break it
        strategy = operation.as_strategy() | operation.as_strategy(schemathesis.GenerationMode.NEGATIVE)

        @settings(FUZZ, max_examples=examples)
        @given(case=strategy)
        def request(case):
            response = case.call(timeout=30)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r}: {response.status_code} {response.text[:300]}")
            healthy(url)

        request()
    assert not failures, "\n".join(failures[:5])


# -- prefix files ----------------------------------------------------------------------------------------
ARCH = Architecture(model_type="llama", n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_size=32,
                    vocab_size=512, max_positions=128)
FINGERPRINT = "pkfp1-" + "ab" * 32

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20)


@st.composite
def metas(draw) -> bytes:
    """Meta JSON: the real fields, each kept, dropped or replaced by any JSON value; or raw bytes."""
    good = {"format": 1, "backbone_fingerprint": FINGERPRINT, "prefix_len": draw(st.integers(0, 4)),
            "template": "{input}\n", "stop": ["\n"], "losses": {"dev_best": 1.0}, "method": "prefix", "steps": 3}
    meta = {}
    for field, value in good.items():
        choice = draw(st.sampled_from(["keep", "keep", "drop", "replace"]))
        if choice != "drop":
            meta[field] = value if choice == "keep" else draw(json_values)
    meta.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    if draw(st.booleans()):
        return draw(st.binary(max_size=60))
    return json.dumps(meta).encode()


@st.composite
def arrays(draw) -> np.ndarray:
    dtype = draw(st.sampled_from(["<f4", "<f2", ">f4", "<f8", "<i4", "|u1", "|b1"]))
    shape = draw(st.sampled_from([(2, 2, 3, 16), (2, 2, 0, 16), (2, 2, 3), (1, 2, 3, 16), (2, 2, 130, 16), (3,), ()]))
    array = np.zeros(shape, dtype)
    if array.size and dtype in ("<f4", "<f2") and draw(st.booleans()):
        array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from([np.nan, np.inf, 1.0]))
    return array


def member(array: np.ndarray, damage: str, data) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    raw = buffer.getvalue()
    if damage == "truncate":
        return raw[: data.draw(st.integers(0, len(raw)))]
    if damage == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
    return raw


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_any_prefix_file_loads_as_a_valid_prefix_or_fails_in_one_sentence(data, tmp_path_factory):
    names = data.draw(st.lists(st.sampled_from(["key.npy", "value.npy", "meta.npy", "enc_key.npy", "notes.txt", "key"]),
                               min_size=0, max_size=5))
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))) as archive:
        warnings.simplefilter("ignore", UserWarning)  # a name twice: that is one of the cases
        key = data.draw(arrays())
        for name in ["key.npy", "value.npy", "meta.npy"][: data.draw(st.integers(0, 3))] + names:
            damage = data.draw(st.sampled_from(["none", "none", "none", "truncate", "flip"]))
            if name == "meta.npy":
                content = member(np.frombuffer(data.draw(metas()), np.uint8), damage, data)
            elif name in ("key.npy", "value.npy") and data.draw(st.booleans()):
                content = member(key, damage, data)  # key and value alike, as real files are
            else:
                content = member(data.draw(arrays()), damage, data)
            archive.writestr(name, content)
    raw = buffer.getvalue()
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path_factory.mktemp("fuzz-prefix") / "p.npz"
    path.write_bytes(raw)
    for source in (path, raw):
        try:
            prefix = load_prefix(source, architecture=ARCH, fingerprint=FINGERPRINT)
        except PrefixFileError as e:
            message = str(e)
            assert message.count("\n") == 0 and len(message) < 2000, message
            assert message.startswith(str(path) if source is path else "the uploaded file"), message
            continue
        assert isinstance(prefix, Prefix)
        assert prefix.key.shape == ARCH.kv_shape(prefix.prefix_len) == prefix.value.shape
        assert np.isfinite(prefix.key).all() and prefix.meta["backbone_fingerprint"] == FINGERPRINT
