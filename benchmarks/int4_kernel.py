"""Would a hand-written int4 kernel reach the runtime issue's speed targets? A measurement.

ONNX Runtime's exact int4 path (MatMulNBits with fp32 activations, plus the block offsets; see
exporter/quantize.py) is fast for one row only. This builds benchmarks/int4_kernel.c (gcc,
AVX-512, OpenMP), a plain exact Q4_1 matmul with fp32 FMAs, and times it against ONNX Runtime's
fp32 MatMul and the export's exact int4 graph on smollm2-135m's matmul shapes, at 1, 5 and 16
rows, with 1 and 2 threads. Nothing in prefixkit uses the kernel.

    .venv/bin/python benchmarks/int4_kernel.py      # writes benchmarks/results/int4-kernel.md
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # smollm2's qkv, o, gate+up, down
ROWS = [1, 5, 16]


def q4_1_weight(K: int, N: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (N, K // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # each block spans its grid, so block_quantize finds d and m again
    d = rng.uniform(0.001, 0.2, (N, K // 32, 1)).astype(np.float16).astype(np.float32)
    m = rng.normal(0, 1, (N, K // 32, 1)).astype(np.float16).astype(np.float32)
    return (q * d + m).astype(np.float32).reshape(N, K).T.copy()


def pack(weight: np.ndarray) -> np.ndarray:
    from prefixkit.exporter.quantize import block_quantize

    q, d, m = block_quantize(weight, 4)  # q [N, K/32, 32]; d, m [N, K/32]
    N, nb, _ = q.shape
    G = N // 16
    pairs = q.reshape(G, 16, nb, 16, 2).transpose(0, 2, 3, 1, 4)  # [group, block, pair, column, 2]
    nibbles = (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8).reshape(G, nb, 256)
    scales = [np.ascontiguousarray(a.reshape(G, 16, nb).transpose(0, 2, 1), np.float32).view(np.uint8) for a in (d, m)]
    return np.ascontiguousarray(np.concatenate([nibbles] + [s.reshape(G, nb, 64) for s in scales], axis=2))


def single_matmul(weight: np.ndarray):
    """A graph of one MatMul A [M, 1, K] @ weight."""
    from onnx import TensorProto, helper, numpy_helper

    K, N = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="proj")], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, None, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, None, N])],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def timed_us(fn, calls: int = 200) -> float:
    for _ in range(10):
        fn()
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - started) / calls)
    return float(np.median(runs) * 1e6)


def main() -> None:
    from prefixkit.exporter.quantize import quantize_graph

    with tempfile.TemporaryDirectory() as tmp:
        lib_path = Path(tmp) / "libint4_kernel.so"
        subprocess.run(["gcc", "-O3", "-mavx512f", "-mavx512bw", "-mfma", "-fopenmp", "-shared", "-fPIC",
                        str(ROOT / "benchmarks" / "int4_kernel.c"), "-o", str(lib_path)], check=True)
        lib = ctypes.CDLL(str(lib_path))
    lib.q4mm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    lines = ["# A hand-written exact int4 matmul against ONNX Runtime", "",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}. µs per call, median of 5 × 200 calls. "
             "Weights on a Q4_1 grid; 'exact int4' is the export's MatMulNBits + block offsets.", "",
             "| K × N | rows | threads | kernel | ORT fp32 MatMul | ORT exact int4 | kernel error (rel.) |",
             "|---|---|---|---|---|---|---|"]
    for K, N in SHAPES:
        weight = q4_1_weight(K, N, seed=K + N)
        blob = pack(weight)
        quantized = single_matmul(weight)
        quantize_graph(quantized, 4)
        for threads in (1, 2):
            lib.set_threads(threads)
            fp32, int4 = session(single_matmul(weight), threads), session(quantized, threads)
            for M in ROWS:
                x = np.random.default_rng(M).standard_normal((M, K)).astype(np.float32)
                y, sums = np.empty((M, N), np.float32), np.empty((M, K // 32), np.float32)

                def kernel():
                    lib.q4mm(blob.ctypes.data, x.ctypes.data, y.ctypes.data, M, K, N, sums.ctypes.data)

                kernel()
                want = x.astype(np.float64) @ weight.astype(np.float64)
                error = np.abs(y - want).max() / np.abs(want).max()
                feed = {"A": x[:, None, :]}
                row = (f"| {K} × {N} | {M} | {threads} | {timed_us(kernel):.0f} | "
                       f"{timed_us(lambda: fp32.run(None, feed)):.0f} | {timed_us(lambda: int4.run(None, feed)):.0f} | "
                       f"{error:.1e} |")
                print(row, flush=True)
                lines.append(row)
    out = ROOT / "benchmarks" / "results" / "int4-kernel.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
