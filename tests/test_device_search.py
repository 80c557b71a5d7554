"""The search on the device (runtime/device.py), run here on the CPU provider: what CUDA runs
with the same graphs and IO binding, the cache and logits kept as ONNX Runtime values.

References: numpy's argmax and stable top-k on the same logits; numpy's gather of the same
cache; the host search (SharedKVCache and numpy token choice), itself tested against Hugging
Face `generate` in test_generate.py; and Hugging Face `generate` directly."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from prefixkit.exporter import load_backbone
from prefixkit.exporter.onnx_export import export_backbone
from prefixkit.exporter.parity import EPS16, fp16_limit
from prefixkit.exporter.reference import hf_generate, kv_of_text
from prefixkit.runtime.batching import Batcher, Row
from prefixkit.runtime.cache import SharedKVCache, right_pad
from prefixkit.runtime.device import DeviceLogits, DeviceSharedKVCache
from prefixkit.runtime.generate import GenerationSettings, Generator, _log_softmax
from prefixkit.runtime.prefix import Prefix
from prefixkit.runtime.session import ExportedBackbone

PROMPTS = [
    "name : Aromi | Type : coffee shop | food : English",
    "name : The Eagle | area : riverside",
    "name : Zizzi | Type : pub | family friendly : yes | near : The Bakers",
]


@pytest.fixture(scope="module")
def fused(tmp_path_factory, tiny_llama_dir, tiny_export):
    """The tiny Llama's fused graph at fp32 (the session's) and fp16, the backbone, and three rows
    with prefixes of length 0, 3 and 10 (the model's own key/values of real text)."""
    folders = {"fp32": tiny_export[0], "fp16": tmp_path_factory.mktemp("fused-fp16") / "export"}
    export_backbone(str(tiny_llama_dir), folders["fp16"], graph="fused", dtype="fp16")
    backbone = load_backbone(tiny_llama_dir)
    tok = backbone.tokenizer
    text_ids = tok("table-to-text: restaurant descriptions from tables").input_ids
    prefixes = [None] + [Prefix(*kv_of_text(backbone.model, torch.tensor([text_ids[:p]])), {}) for p in (3, 10)]
    rows = [(prefix, tok(prompt).input_ids) for prefix, prompt in zip(prefixes, PROMPTS)]
    return folders, backbone, rows


def on_device(folder) -> ExportedBackbone:
    """The export with its search on the device: the CPU provider's memory here, the GPU's where
    the suite runs under CUDA (PREFIXKIT_PROVIDERS, benchmarks/gpu/check.sh)."""
    exported = ExportedBackbone(folder)
    exported.attention_on_host, exported.cache_device = False, exported.cache_device or "cpu"
    assert exported.searches_on_device
    return exported


def as_dtype(rows, dtype):
    return [(None if p is None else Prefix(p.key.astype(dtype), p.value.astype(dtype), {}), ids) for p, ids in rows]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_greedy_graph_is_numpys_argmax_ties_to_the_lower_index(fused, dtype):
    exported = on_device(fused[0]["fp32"])
    rng = np.random.default_rng(1)
    V = 40
    logits = rng.normal(0, 3, (6, V)).astype(dtype)
    logits[1, [3, 17, 30]] = logits[1].max() + 1  # three-way tie: the first wins
    logits[2] = 0.5  # all equal
    logits[3, [5, 6]] = logits[3].max() + 1
    exported._logits_dtype = np.dtype(dtype)
    for banned in ([], [1 * V + 3], [3 * V + 5, 3 * V + 6, 0 * V + int(logits[0].argmax())]):
        want = logits.astype(np.float32).reshape(-1)
        want[banned] = -np.inf
        want = want.reshape(6, V).argmax(-1)
        got = DeviceLogits.from_host(exported, logits).greedy(np.array(banned, np.int64))
        np.testing.assert_array_equal(got, want)
    assert list(DeviceLogits.from_host(exported, logits).greedy(np.array([], np.int64))[1:3]) == [3, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_beams_graph_is_numpys_top_k_of_log_softmax_plus_scores_ties_to_the_lower_index(fused, dtype):
    exported = on_device(fused[0]["fp32"])
    exported._logits_dtype = np.dtype(dtype)
    rng = np.random.default_rng(2)
    B, K, V, keep = 3, 4, 50, 8
    logits = rng.normal(0, 3, (B * K, V)).astype(dtype)
    logits[K : 2 * K] = logits[K]  # request 1: its beams alike, every candidate tied K ways
    logits[2 * K, :] = 1.0  # request 2's first beam: all V tied
    scores = rng.normal(-5, 2, B * K).astype(np.float32)
    scores[K : 2 * K] = -3.0
    scores[2 * K + 1 :] = -1e9  # only the first beam of request 2 expands
    banned = np.array([0 * V + 7, 5 * V + 11, 2 * K * V + 3], np.int64)

    want = _log_softmax(logits.astype(np.float32))
    want.reshape(-1)[banned] = -np.inf
    flat = (want + scores[:, None]).reshape(B, K * V)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :keep]  # stable: lower index first on ties
    values, indices = DeviceLogits.from_host(exported, logits).beams(scores, banned, B, keep)
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(values, np.take_along_axis(flat, order, axis=1), rtol=8 * np.finfo(np.float32).eps)
    assert list(indices[2]) == [0, 1, 2, 4, 5, 6, 7, 8]  # all tied, banned 3 left out, in index order


def test_device_moves_puts_and_resizes_rows_as_numpy_indexes_them(fused):
    """The beam reorder on the device (move_rows, bound in place) is the host gather; a row put
    into its slot is the row, zero-padded; growing keeps every row."""
    exported = on_device(fused[0]["fp16"])
    a = exported.architecture
    rng = np.random.default_rng(3)
    S = 9
    key = rng.normal(size=(a.n_layers, 4, a.n_kv_heads, S, a.head_dim)).astype(np.float16)
    value = rng.normal(size=key.shape).astype(np.float16)
    cache = DeviceSharedKVCache(exported, key, value, np.array([9, 3, 5, 7]))
    host_key, host_value = cache.key.numpy().copy(), cache.value.numpy().copy()  # [L, R, H, M, D], zero after S
    np.testing.assert_array_equal(host_key[:, :4, :, :S], key)
    assert not host_key[:, :, :, S:].any()
    for rows in ([1, 0, 2, 3], [2, 0, 1], [2, 2, 0], [0, 0, 0, 1, 2], [3]):  # cycles, repeats, growth, leaving
        n, lens = len(rows), cache.lens[rows]
        cache.select(np.array(rows))
        got_key, got_value = cache.key.numpy().copy(), cache.value.numpy().copy()
        grown = got_key.shape[1] - host_key.shape[1]
        if grown:  # more rows than there was room for: zeros added, rows kept
            assert got_key.shape[1] >= n and not got_key[:, n:].any()
            pad = [(0, 0), (0, grown), (0, 0), (0, 0), (0, 0)]
            host_key, host_value = np.pad(host_key, pad), np.pad(host_value, pad)
        host_key[:, :n], host_value[:, :n] = host_key[:, rows], host_value[:, rows]
        np.testing.assert_array_equal(got_key[:, :n], host_key[:, :n])
        np.testing.assert_array_equal(got_value[:, :n], host_value[:, :n])
        np.testing.assert_array_equal(cache.lens, lens)
    new = rng.normal(size=(a.n_layers, a.n_kv_heads, 70, a.head_dim)).astype(np.float16)
    cache.append(new, -new)  # more positions than there was room for: resized
    assert cache.room[1] >= 71 and list(cache.lens) == [9, 70]
    got = cache.key.numpy()
    np.testing.assert_array_equal(got[:, 1, :, :70], new)
    np.testing.assert_array_equal(cache.value.numpy()[:, 1, :, :70], -new)
    assert not got[:, 1, :, 70:].any()
    np.testing.assert_array_equal(got[:, 0, :, :S], host_key[:, 0, :, :S])


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_device_cache_gives_the_host_in_place_caches_logits_bit_for_bit(fused, dtype):
    """Rows prefilled in their slots, decoding with a mask as wide as the buffer, reorders,
    rows leaving and a row joining: the logits of the host path (SharedKVCache), exactly."""
    folders, _, rows = fused
    host, device = ExportedBackbone(folders[dtype]), on_device(folders[dtype])
    rows = as_dtype(rows, host.kv_dtype)
    alone = [host.run_alone(prefix, ids) for prefix, ids in rows]
    key, value, lens = right_pad([cache for _, cache in alone[:2]])
    host_cache = SharedKVCache(host, key, value, lens)
    device_cache = DeviceSharedKVCache(device, room=(1, 8))  # too small: grows as rows join
    first = [device_cache.join(prefix, ids) for prefix, ids in rows[:2]]
    for got, (want, _) in zip(first, alone):
        np.testing.assert_array_equal(got.numpy(), want[-1:].astype(np.float32))
    ids = np.array([5, 6])
    for step in range(10):
        if step == 2:
            host_cache.append(*alone[2][1])
            got = device_cache.join(*rows[2]).numpy()
            np.testing.assert_array_equal(got, alone[2][0][-1:].astype(np.float32))
            ids = np.append(ids, 7)
        reorder = {4: [2, 0, 0], 6: [0, 2, 1], 8: [1, 2]}.get(step)
        if reorder:
            host_cache.select(np.array(reorder))
            device_cache.select(np.array(reorder))
            ids = ids[reorder]
        want = host_cache.forward(ids)
        got = device_cache.forward(ids)
        assert isinstance(got, DeviceLogits) and not got.on_host  # left on the device
        np.testing.assert_array_equal(got.numpy(), want)
        ids = want.argmax(-1)


def test_fp16_export_states_its_limit_its_error_and_argmax_agreement(fused):
    folders, backbone, _ = fused
    manifest = ExportedBackbone(folders["fp16"]).manifest
    assert (manifest.dtype, manifest.graph.kind, manifest.graph.attention) == ("float16", "genai-gqa", "")
    limit = fp16_limit(backbone.model.config.to_dict())
    assert limit["eps"] == EPS16 and limit["width"] == 1 and limit["layers"] == 2
    assert manifest.parity["limit"] == limit["relative"] and manifest.parity["limit_from"] == limit
    assert 0 < manifest.parity["relative"] < limit["relative"]  # fp16 rounding, not none
    assert manifest.parity["argmax_equal"] is True


@pytest.mark.parametrize("num_beams", [1, 5], ids=["greedy", "5 beams"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_search_on_the_device_equals_the_host_search_and_a_row_alone(fused, dtype, num_beams):
    folders, _, rows = fused
    host, device = Generator(ExportedBackbone(folders[dtype])), Generator(on_device(folders[dtype]))
    rows = as_dtype(rows, host.exported.kv_dtype)
    settings = dict(max_new_tokens=14, num_beams=num_beams, length_penalty=0.8)
    together = device.generate(rows, **settings)
    assert [g.token_ids for g in together] == [g.token_ids for g in host.generate(rows, **settings)]
    for row, generation in zip(rows, together):
        alone = device.generate([row], **settings)[0]
        assert generation.token_ids == alone.token_ids
        assert generation.score == alone.score


@pytest.mark.parametrize("num_beams", [1, 4], ids=["greedy", "4 beams"])
def test_search_on_the_device_equals_hugging_face_generate(fused, num_beams):
    """fp32 on the device path: token for token Hugging Face's, with no-repeat n-grams and a
    minimum length ruled out on the device."""
    folders, backbone, rows = fused
    device = Generator(on_device(folders["fp32"]))
    settings = dict(num_beams=num_beams, no_repeat_ngram_size=2, min_new_tokens=6)
    got = device.generate(rows, max_new_tokens=12, **settings)
    for (prefix, ids), generation in zip(rows, got):
        assert generation.token_ids == hf_generate(backbone.model, prefix, ids, 12, **settings)


def test_pt_serve_batches_on_the_device_as_rows_alone(fused):
    """Continuous batching on the device path: rows join a running batch at different steps, one
    samples (reading its logits on the host), and each gets what it gets alone."""
    folders, _, rows = fused
    device = Generator(on_device(folders["fp16"]))
    rows = as_dtype(rows, device.exported.kv_dtype)
    settings = [GenerationSettings(max_new_tokens=12), GenerationSettings(max_new_tokens=20, no_repeat_ngram_size=2),
                GenerationSettings(max_new_tokens=9, do_sample=True, seed=5, top_k=30)]
    want = [device.generate([row], s)[0].token_ids for row, s in zip(rows, settings)]
    served = Generator(on_device(folders["fp16"]))
    batcher = Batcher(served, max_rows=4, window_s=0.0)
    done = threading.Semaphore(0)
    submitted = []
    try:
        for (prefix, ids), s in zip(rows, settings):
            row = Row(prefix, list(ids), s, on_done=lambda r: done.release())
            submitted.append(row)
            batcher.submit([row])
            time.sleep(0.02)  # the batch runs a few steps before the next row joins
        for _ in submitted:
            assert done.acquire(timeout=60)
    finally:
        batcher.close(timeout=30)
    assert [r.error for r in submitted] == [None, None, None]
    assert [r.token_ids for r in submitted] == want
    ran = {name for name, _ in served.exported._ops}
    assert {"put_rows", "greedy"} <= ran and "resize" not in ran  # the device path ran, with room for all


def test_steps_bound_for_cuda_graphs_write_their_inputs_in_place_and_give_the_same_tokens(fused):
    """With CUDA graphs a step's ids, mask and positions live in device values bound once and
    written in place (a captured graph replays with the addresses it was captured with). On the
    CPU the capture itself is not run; the binding is, and changes nothing."""
    folders, _, rows = fused
    plain = Generator(on_device(folders["fp16"]))
    captured = on_device(folders["fp16"])
    captured.cuda_graphs = True
    rows = as_dtype(rows, plain.exported.kv_dtype)
    for num_beams in (1, 3):
        want = plain.generate(rows, max_new_tokens=10, num_beams=num_beams)
        got = Generator(captured).generate(rows, max_new_tokens=10, num_beams=num_beams)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
    # one graph per batch size and set of buffers: greedy (3 rows), then beams (9), then fewer as rows end
    assert captured.captured_graphs and sorted(set(captured.captured_graphs.values())) == list(
        range(1, len(captured.captured_graphs) + 1))
    assert {key[0] for key in captured.captured_graphs} >= {3, 9}


def test_provider_options_set_cuda_graphs_and_tensorrt_profiles_for_the_cache(fused, monkeypatch, tmp_path):
    from prefixkit.runtime.session import TRT_MAX_ROWS, provider_options

    monkeypatch.setenv("PREFIXKIT_CACHE", str(tmp_path))
    manifest = ExportedBackbone(fused[0]["fp16"]).manifest
    a, M = manifest.architecture, manifest.max_positions
    assert provider_options("CUDAExecutionProvider", manifest) == {"use_tf32": "0"}
    assert provider_options("CUDAExecutionProvider", manifest, cuda_graphs=True) == {
        "use_tf32": "0", "enable_cuda_graph": "1"}
    assert provider_options("CPUExecutionProvider", manifest) == {}
    trt = provider_options("TensorrtExecutionProvider", manifest)
    assert trt["trt_fp16_enable"] == "1" and trt["trt_engine_cache_enable"] == "1"
    assert trt["trt_engine_cache_path"].startswith(str(tmp_path / "tensorrt"))

    def shapes(option):
        return {name: [int(d) for d in dims.split("x")] for name, dims in
                (entry.split(":") for entry in trt[option].split(","))}

    low, tuned, high = shapes("trt_profile_min_shapes"), shapes("trt_profile_opt_shapes"), shapes("trt_profile_max_shapes")
    past = [n for n in manifest.graph.inputs if n.startswith("past_key_values")]
    assert set(low) == set(tuned) == set(high) == {"input_ids", "attention_mask", *past}
    assert len(past) == 2 * a.n_layers
    for name in past:
        assert low[name] == [1, a.n_kv_heads, 0, a.head_dim]
        assert high[name] == [TRT_MAX_ROWS, a.n_kv_heads, M, a.head_dim]
        assert all(lo <= mid <= hi for lo, mid, hi in zip(low[name], tuned[name], high[name]))
    assert low["input_ids"] == [1, 1] and high["attention_mask"] == [TRT_MAX_ROWS, M]
