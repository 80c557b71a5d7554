"""prefixkit.Attention (runtime/csrc/attention.c) against ONNX Runtime's GroupQueryAttention,
the node it replaces in the fused exports and its function body: decode steps of rows with
different cache lengths, a prefill after a prefix and one without, the cache in a buffer of its
own and shared between past and present, both code paths, and row by row."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from prefixkit.exporter.quantize import use_attention_kernel
from test_kernels import session  # with or without prefixkit's kernels registered
from tolerance import assert_within, rounding_rtol

MAX_POSITIONS = 96


def gqa_model(H: int, G: int, D: int) -> onnx.ModelProto:
    """One GroupQueryAttention node with the attributes of the fused exports (smollm2-135m's)."""
    node = helper.make_node(
        "GroupQueryAttention",
        ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos", "sin"],
        ["out", "present_key", "present_value"], name="attn", domain="com.microsoft",
        num_heads=H, kv_num_heads=G, scale=float(D) ** -0.5, do_rotary=1, rotary_interleaved=0, softcap=0.0,
        local_window_size=-1, smooth_softmax=-1, qk_output=0, k_quant_type="NONE", v_quant_type="NONE",
    )
    kv = ["B", G, "P", D]
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["B", "S", (H + 2 * G) * D]),
         helper.make_tensor_value_info("past_key", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("past_value", TensorProto.FLOAT, kv),
         helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
         helper.make_tensor_value_info("total", TensorProto.INT32, []),
         helper.make_tensor_value_info("cos", TensorProto.FLOAT, [MAX_POSITIONS, D // 2]),
         helper.make_tensor_value_info("sin", TensorProto.FLOAT, [MAX_POSITIONS, D // 2])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", H * D]),
         helper.make_tensor_value_info("present_key", TensorProto.FLOAT, ["B", G, "T", D]),
         helper.make_tensor_value_info("present_value", TensorProto.FLOAT, ["B", G, "T", D])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def feeds(H: int, G: int, D: int, pasts: list[int], S: int, buffer: int, seed: int = 0) -> dict:
    """Rows whose caches hold pasts[b] positions (zeros after, up to `buffer`), S new tokens each."""
    rng = np.random.default_rng(seed)
    B = len(pasts)
    key = rng.standard_normal((B, G, buffer, D)).astype(np.float32)
    value = rng.standard_normal((B, G, buffer, D)).astype(np.float32)
    for b, past in enumerate(pasts):
        key[b, :, past:], value[b, :, past:] = 0, 0
    angles = np.arange(MAX_POSITIONS)[:, None] / 10000 ** (np.arange(D // 2) / (D // 2))
    return {
        "qkv": rng.standard_normal((B, S, (H + 2 * G) * D)).astype(np.float32),
        "past_key": key, "past_value": value,
        "seqlens_k": np.array([p + S - 1 for p in pasts], np.int32),
        "total": np.array(max(pasts) + S, np.int32),
        "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
    }


def close(got: list[np.ndarray], want: list[np.ndarray], D: int, positions: int) -> None:
    """Within the rounding of one attention: scores sum D products, outputs `positions` values."""
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert_within(g, w, rounding_rtol(1, max(D, positions)))


# (H, G, D): smollm2-135m's heads, and others (GroupQueryAttention takes D a multiple of 16)
HEADS = [(9, 3, 64), (4, 1, 32)]


@pytest.fixture(scope="module", params=HEADS, ids=["smollm2", "d32"])
def models(request):
    H, G, D = request.param
    reference = gqa_model(H, G, D)
    model = gqa_model(H, G, D)
    assert use_attention_kernel(model) == 1
    assert [(n.domain, n.op_type) for n in model.graph.node] == [("prefixkit", "Attention")]
    return (H, G, D), session(reference, False), session(model, True), session(model, False)


@pytest.mark.parametrize("pasts, S, buffer", [
    ([3, 17, 30, 47, 0], 1, 48),   # decode steps of five rows, one with an empty cache
    ([10], 7, 10),                  # a prefill after a prefix of 10
    ([0], 6, 0),                    # a prefill without one
    ([0, 0, 0], 5, 0),              # a first prompt of three rows (all of S positions real)
])  # (GroupQueryAttention takes several new tokens after a cache for one row only)
def test_attention_equals_group_query_attention(models, pasts, S, buffer):
    (H, G, D), reference, kernel, body = models
    feed = feeds(H, G, D, pasts, S, buffer)
    want = reference.run(None, feed)
    close(kernel.run(None, feed), want, D, max(pasts) + S)
    # without the library the function body runs: GroupQueryAttention itself, the same bits
    for got, expected in zip(body.run(None, feed), want):
        np.testing.assert_array_equal(got, expected)


def test_in_place_on_a_shared_cache_buffer(models):
    """As the runtime decodes: one buffer bound as both past and present."""
    (H, G, D), reference, kernel, _ = models
    pasts, results = [4, 20, 9], []
    for sess in (reference, kernel):
        feed = feeds(H, G, D, pasts, 1, 32, seed=1)
        io = sess.io_binding()
        for name in ("qkv", "seqlens_k", "total", "cos", "sin"):
            io.bind_cpu_input(name, feed[name])
        for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
            cache = ort.OrtValue.ortvalue_from_numpy(feed[past])
            io.bind_ortvalue_input(past, cache)
            io.bind_ortvalue_output(present, cache)
        io.bind_output("out", "cpu")
        sess.run_with_iobinding(io)
        results.append([io.copy_outputs_to_cpu()[0], feed["past_key"], feed["past_value"]])  # written in place
    close(results[1], results[0], D, max(pasts) + 1)
    assert np.abs(results[1][1] - feeds(H, G, D, pasts, 1, 32, seed=1)["past_key"]).max() > 0


def test_a_row_is_the_same_alone_and_in_a_batch(models):
    (H, G, D), _, kernel, _ = models
    pasts = [7, 30, 2, 15, 15, 40]
    batch = feeds(H, G, D, pasts, 1, 41, seed=2)
    together = kernel.run(None, batch)
    for b, past in enumerate(pasts):
        alone = {k: v[b : b + 1] if k in ("qkv", "past_key", "past_value", "seqlens_k") else v for k, v in batch.items()}
        alone["total"] = np.array(past + 1, np.int32)
        out = kernel.run(None, alone)
        np.testing.assert_array_equal(out[0][0], together[0][b])
        np.testing.assert_array_equal(out[1][0, :, : past + 1], together[1][b, :, : past + 1])


def test_a_cache_too_short_for_the_lengths_is_an_error(models):
    (H, G, D), _, kernel, _ = models
    feed = feeds(H, G, D, [5], 1, 8)
    feed["seqlens_k"] = np.array([MAX_POSITIONS + 3], np.int32)
    with pytest.raises(Exception, match="seqlens_k out of range"):
        kernel.run(None, feed)


def test_the_portable_path_computes_the_same():
    """Where the CPU has no AVX-512 (forced here), plain loops with expf compute it."""
    code = (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_attention_kernel import *\n"
        "reference, model = gqa_model(9, 3, 64), gqa_model(9, 3, 64)\n"
        "use_attention_kernel(model)\n"
        "for pasts, S, buffer in (([3, 17, 0], 1, 24), ([10], 7, 10)):\n"
        "    feed = feeds(9, 3, 64, pasts, S, buffer)\n"
        "    close(session(model, True).run(None, feed), session(reference, False).run(None, feed), 64, max(pasts) + S)\n"
        "print('same')\n"
    )
    env = dict(os.environ, PREFIXKIT_KERNEL_PORTABLE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.split() == ["same"], proc.stderr


def test_a_first_prompt_of_right_padded_rows(models):
    """Rows of 5 and 2 tokens padded to 5, no cache: the real positions are as GroupQueryAttention
    computes them (what it leaves in padded positions is not defined)."""
    (H, G, D), reference, kernel, _ = models
    feed = feeds(H, G, D, [0, 0], 5, 0, seed=4)
    feed["seqlens_k"] = np.array([4, 1], np.int32)
    want, got = reference.run(None, feed), kernel.run(None, feed)
    for b, length in enumerate((5, 2)):
        close([got[0][b, :length], got[1][b, :, :length], got[2][b, :, :length]],
              [want[0][b, :length], want[1][b, :, :length], want[2][b, :, :length]], D, 5)
