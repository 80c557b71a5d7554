"""Block quantisation: exact for weights already on a block grid (a dequantised GGUF Q4_1),
within half a step otherwise, and the rewritten graph computes A @ W with those weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from prefixkit.exporter.quantize import BLOCK, block_quantize, dequantize, integer_zero_points, quantize_graph
from tolerance import assert_within, rounding_rtol

# d * q + m in fp32 from d and m recovered from the weights: a product and a sum, rounded.
DEQUANTISED = rounding_rtol(1, 2)


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
    assert_within(dequantize(q, scale, low), weight, DEQUANTISED)


@pytest.mark.parametrize("bits", [4, 8])
def test_arbitrary_weights_move_by_at_most_half_a_step(bits):
    weight = np.random.default_rng(1).standard_normal((64, 24)).astype(np.float32)
    q, scale, low = block_quantize(weight, bits)
    err = np.abs(dequantize(q, scale, low) - weight).T.reshape(24, 2, BLOCK)
    assert (err <= scale[..., None] / 2 + DEQUANTISED * np.abs(weight).max()).all()
    assert np.all(scale > 0)


def inlined(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The graph's nodes with each prefixkit operator replaced by its function body: what a
    session without prefixkit's kernels runs."""
    functions = {(f.domain, f.name): f for f in model.functions}
    return [m for n in model.graph.node for m in (functions[(n.domain, n.op_type)].node if (n.domain, n.op_type) in functions else [n])]


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
    narrowed = int(bits == 8 and grid)  # a Q4_1 grid is exact at 4 bits: stored so
    assert quantize_graph(model, bits) == {"quantized": 1, "left_in_float": 0, "merged": 0, "narrowed": narrowed}
    assert [n.op_type for n in model.graph.node] == (["MatMulQ4"] if bits == 4 or grid else ["MatMulNBits", "MatMulNBits", "MatMul", "MatMul", "Add", "Add"])
    assert sum(n.op_type == "MatMulNBits" for n in inlined(model)) == (1 if bits == 4 or grid else 2)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(3).standard_normal((2, 5, K)).astype(np.float32)
    got = session.run(None, {"A": a})[0]
    want = a @ dequantize(*block_quantize(weight, bits))
    assert_within(got, want, rounding_rtol(1, K))
    if grid:  # exact weights: the quantised graph is the original matmul
        assert_within(got, a @ weight, rounding_rtol(1, K))


def test_matmul_whose_depth_is_not_a_multiple_of_32_stays_in_float():
    model = single_matmul(np.ones((40, 8), np.float32))
    assert quantize_graph(model, 4) == {"quantized": 0, "left_in_float": 1, "merged": 0, "narrowed": 0}
    assert [n.op_type for n in model.graph.node] == ["MatMul"]


@pytest.mark.parametrize("bits", [4, 8])
def test_matmuls_sharing_an_input_are_quantised_as_one_and_each_output_is_unchanged(bits):
    # An MLP's shape: gate and up read x; down reads their product; a 40-deep one stays in float.
    K, N = 64, 96
    gate, up = q4_1_like(K, N, seed=5), q4_1_like(K, N // 2, seed=6)
    down, odd = q4_1_like(N, K, seed=7), np.random.default_rng(8).standard_normal((40, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "Wg"], ["g"], name="gate"),
        helper.make_node("MatMul", ["x", "Wu"], ["u"], name="up"),
        helper.make_node("Slice", ["u", "zero", "width", "minus_one"], ["u_cut"]),
        helper.make_node("Mul", ["g", "g"], ["h"]),
        helper.make_node("MatMul", ["h", "Wd"], ["y"], name="down"),
        helper.make_node("MatMul", ["z", "Wo"], ["o"], name="odd"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, K]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 40])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("g", "u_cut", "y", "o")],
        [numpy_helper.from_array(w, n) for w, n in ((gate, "Wg"), (up, "Wu"), (down, "Wd"), (odd, "Wo"))]
        + [numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((0, "zero"), (N // 2, "width"), (-1, "minus_one"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_graph(model, bits) == {"quantized": 2, "left_in_float": 1, "merged": 1, "narrowed": 2 * (bits == 8)}
    assert sum(n.op_type == "MatMulNBits" for n in inlined(model)) == 2  # Q4_1 grids: 4 bits either way
    assert [n.op_type for n in model.graph.node].count("Split") == 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(9)
    x, z = rng.standard_normal((2, 3, K)).astype(np.float32), rng.standard_normal((4, 40)).astype(np.float32)
    g, u_cut, y, o = session.run(None, {"x": x, "z": z})
    assert_within(g, x @ gate, rounding_rtol(1, K))
    assert_within(u_cut, x @ up, rounding_rtol(1, K))
    assert_within(y, (g * g) @ down, rounding_rtol(1, N))
    assert_within(o, z @ odd, rounding_rtol(1, 40))


def test_matmuls_sharing_an_input_with_different_bit_widths_stay_apart():
    K = 64
    nodes = [helper.make_node("MatMul", ["x", f"W{i}"], [f"y{i}"], name=f"m{i}") for i in range(2)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(2)],
        [numpy_helper.from_array(q4_1_like(K, 16), "W0"),
         numpy_helper.from_array(np.random.default_rng(12).standard_normal((K, 16)).astype(np.float32), "W1")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert quantize_graph(model, 4, bits_for={"m1": 8}) == {"quantized": 2, "left_in_float": 0, "merged": 0, "narrowed": 0}
    assert sum(n.op_type == "MatMulNBits" for n in inlined(model)) == 3


def q8_0_like(K: int, N: int, seed: int = 4) -> np.ndarray:
    """Q8_0: per block, d * q with q in -127..127, the largest magnitude at ±127; d fp16."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-127, 128, (N, K // BLOCK, BLOCK))
    q[..., 0] = 127 * np.where(rng.random((N, K // BLOCK)) < 0.5, -1, 1)
    d = rng.uniform(0.001, 0.05, (N, K // BLOCK, 1)).astype(np.float16).astype(np.float32)
    return (q * d).astype(np.float32).reshape(N, K).T.copy()


def whole_steps_like(K: int, N: int, bits: int, seed: int = 10) -> np.ndarray:
    """Per block d * (q - z), q in 0..2^bits - 1 (both ends present) and a whole number of steps
    z that differs from block to block (GGUF Q4_0 is z = 8); d fp16."""
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    q = rng.integers(0, top + 1, (N, K // BLOCK, BLOCK))
    q[..., 0], q[..., 1] = 0, top
    z = rng.integers(0, top + 1, (N, K // BLOCK, 1))
    d = rng.uniform(0.001, 0.2 / 2 ** (bits - 4), (N, K // BLOCK, 1)).astype(np.float16).astype(np.float32)
    return ((q - z) * d).astype(np.float32).reshape(N, K).T.copy()


def test_weights_on_a_q8_0_grid_come_back_exactly_at_8_bits():
    weight = q8_0_like(64, 16)
    assert_within(dequantize(*block_quantize(weight, 8)), weight, DEQUANTISED)


@pytest.mark.parametrize("bits, grid", [(8, "q8_0"), (8, "whole steps"), (4, "whole steps")])
def test_offsets_of_whole_steps_become_zero_points_and_the_offset_path_goes(bits, grid):
    K, N = 96, 40  # 3 blocks per column: the zero points' last byte per column is half padding
    weight = q8_0_like(K, N) if grid == "q8_0" else whole_steps_like(K, N, bits)
    q, scale, low = block_quantize(weight, bits)
    zero = integer_zero_points(scale, low, bits)
    assert zero is not None and zero.shape == (N, K // BLOCK)
    np.testing.assert_array_equal(scale[..., None] * (q.astype(np.float32) - zero[..., None]), weight.T.reshape(N, -1, BLOCK))
    model = single_matmul(weight)
    quantize_graph(model, bits)
    assert [n.op_type for n in model.graph.node] == (["MatMulNBits"] if bits == 4 else ["MatMulQ8"])
    assert [n.op_type for n in inlined(model)] == (["MatMulNBits"] if bits == 4 else ["MatMulNBits", "MatMulNBits", "Add"])
    assert all(len(n.input) == 4 for n in inlined(model) if n.op_type == "MatMulNBits")  # with zero points
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    a = np.random.default_rng(11).standard_normal((2, 5, K)).astype(np.float32)
    assert_within(session.run(None, {"A": a})[0], a @ weight, rounding_rtol(1, K))


def test_offsets_that_are_not_whole_steps_keep_the_offset_path():
    q, scale, low = block_quantize(q4_1_like(96, 40), 4)
    assert integer_zero_points(scale, low, 4) is None
    model = single_matmul(q4_1_like(96, 40))
    quantize_graph(model, 4)
    assert [n.op_type for n in model.graph.node] == ["MatMulQ4"]
    assert [n.op_type for n in inlined(model)] == ["MatMulNBits", "MatMul", "MatMul", "Add"]
