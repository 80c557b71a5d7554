"""Block quantisation: exact for weights already on a block grid (a dequantised GGUF Q4_1),
within half a step otherwise, and the rewritten graph computes A @ W with those weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from prefixkit.exporter.quantize import BLOCK, block_quantize, dequantize, quantize_graph


def q4_1_like(K: int, N: int, seed: int = 0) -> np.ndarray:
    """Weights [K, N] as llama.cpp's Q4_1 leaves them: per block of 32 along K, d * q + m with
    q in 0..15, the block's minimum at q = 0 and its maximum at q = 15; d and m are fp16."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (N, K // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.001, 0.2, (N, K // BLOCK, 1)).astype(np.float16).astype(np.float32)
    m = rng.normal(0, 1, (N, K // BLOCK, 1)).astype(np.float16).astype(np.float32)
    return (q * d + m).astype(np.float32).reshape(N, K).T.copy()


@pytest.mark.parametrize("bits", [4, 8])
def test_weights_on_a_q4_1_grid_come_back_exactly(bits):
    weight = q4_1_like(96, 40)
    q, scale, low = block_quantize(weight, bits)
    assert q.max() <= 2**bits - 1
    np.testing.assert_allclose(dequantize(q, scale, low), weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_arbitrary_weights_move_by_at_most_half_a_step(bits):
    weight = np.random.default_rng(1).standard_normal((64, 24)).astype(np.float32)
    q, scale, low = block_quantize(weight, bits)
    err = np.abs(dequantize(q, scale, low) - weight).T.reshape(24, 2, BLOCK)
    assert (err <= scale[..., None] / 2 + 1e-6).all()
    assert np.all(scale > 0)


def single_matmul(weight: np.ndarray) -> onnx.ModelProto:
    K, N = weight.shape
    node = helper.make_node("MatMul", ["A", "W"], ["Y"], name="proj")
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, N])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("grid", [True, False], ids=["q4_1-grid", "arbitrary"])
def test_quantized_graph_computes_a_times_the_dequantized_weight(bits, grid):
    K, N = 128, 48
    weight = q4_1_like(K, N) if grid else np.random.default_rng(2).standard_normal((K, N)).astype(np.float32)
    model = single_matmul(weight)
    assert quantize_graph(model, bits) == {"quantized": 1, "left_in_float": 0}
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == (1 if bits == 4 else 2)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(3).standard_normal((2, 5, K)).astype(np.float32)
    got = session.run(None, {"A": a})[0]
    want = a @ dequantize(*block_quantize(weight, bits))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if grid:  # exact weights: the quantised graph is the original matmul
        np.testing.assert_allclose(got, a @ weight, rtol=1e-4, atol=1e-4)


def test_matmul_whose_depth_is_not_a_multiple_of_32_stays_in_float():
    model = single_matmul(np.ones((40, 8), np.float32))
    assert quantize_graph(model, 4) == {"quantized": 0, "left_in_float": 1}
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


def test_weights_on_a_q8_0_grid_come_back_exactly_at_8_bits():
    # Q8_0: per block, d * q with q in -127..127 and the largest magnitude at ±127.
    rng = np.random.default_rng(4)
    q = rng.integers(-127, 128, (16, 64 // BLOCK, BLOCK))
    q[..., 0] = 127 * np.where(rng.random((16, 2)) < 0.5, -1, 1)
    d = rng.uniform(0.001, 0.05, (16, 2, 1)).astype(np.float16).astype(np.float32)
    weight = (q * d).astype(np.float32).reshape(16, 64).T.copy()
    np.testing.assert_allclose(dequantize(*block_quantize(weight, 8)), weight, rtol=0, atol=1e-6)
