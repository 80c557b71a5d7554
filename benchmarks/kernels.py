"""prefixkit's CPU kernels (runtime/csrc/blockq.c) against ONNX Runtime's, one matmul at a time.

On smollm2-135m's matmul shapes (the four of a layer as Q4_1 4-bit, MatMulQ4, and the 576 x
49152 output projection as Q8_0 8-bit, MatMulQ8), at 1, 5 and 16 rows (greedy, 5 beams,
batch 16), with 1 and 2 threads: the same quantised graph in a session with prefixkit's
kernels registered (fp32 activations, and rounded to 16- and 8-bit integers as in int4-a16 and
int4-a8 exports) and in one without (ONNX Runtime then runs the operators' function bodies:
MatMulNBits and the offset path), and ONNX Runtime's fp32 MatMul on the same weights.

    .venv/bin/python benchmarks/kernels.py      # writes benchmarks/results/kernels.md
    .venv/bin/python benchmarks/kernels.py -o benchmarks/results/kernels-avx2.md   # on an AVX2-only CPU
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# (K, N, bits): smollm2's qkv, o, gate+up (merged), down, and the output projection
SHAPES = [(576, 960, 4), (576, 576, 4), (576, 3072, 4), (1536, 576, 4), (576, 49152, 8)]
ROWS = [1, 5, 16]


def on_grid(K: int, N: int, bits: int, seed: int) -> np.ndarray:
    """A weight [K, N] on a GGUF grid: Q4_1 (d * q + m) at 4 bits, Q8_0 (d * q) at 8."""
    rng = np.random.default_rng(seed)
    if bits == 4:
        q = rng.integers(0, 16, (N, K // 32, 32))
        q[..., 0], q[..., 1] = 0, 15  # each block spans its grid, so block_quantize finds d and m again
        d = rng.uniform(0.001, 0.2, (N, K // 32, 1)).astype(np.float16).astype(np.float32)
        m = rng.normal(0, 1, (N, K // 32, 1)).astype(np.float16).astype(np.float32)
        blocks = q * d + m
    else:
        q = rng.integers(-127, 128, (N, K // 32, 32))
        q[..., 0] = 127
        d = rng.uniform(0.001, 0.02, (N, K // 32, 1)).astype(np.float16).astype(np.float32)
        blocks = q * d
    return blocks.astype(np.float32).reshape(N, K).T.copy()


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


def session(model, threads: int, own_kernels: bool):
    import onnxruntime as ort

    from prefixkit.runtime import kernels

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if own_kernels and not kernels.register(options, ["CPUExecutionProvider"]):
        raise SystemExit("prefixkit's kernels could not be built here")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def timed_us(fn, calls: int) -> float:
    for _ in range(10):
        fn()
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - started) / calls)
    return float(np.median(runs) * 1e6)


def cpu_path() -> str:
    """Which path prefixkit's kernels take on this CPU (they pick it at run time from its flags)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    if "avx512f" in flags and "avx512bw" in flags and "avx512dq" in flags:
        return "AVX-512" + (" with VNNI" if "avx512_vnni" in flags else "")
    return "the portable C path (no AVX-512; AVX2: " + ("yes" if "avx2" in flags else "no") + ")"


@click.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=ROOT / "benchmarks" / "results" / "kernels.md", show_default=True)
def main(output: Path) -> None:
    from prefixkit.exporter.quantize import quantize_graph

    lines = ["# prefixkit's CPU kernels against ONNX Runtime's, one matmul at a time", "",
             f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}; prefixkit's kernels take "
             f"{cpu_path()}. µs per call, median of 5 runs. "
             "Weights on GGUF grids (Q4_1 at 4 bits, Q8_0 at 8); 'ORT exact' is the same quantised graph without "
             "prefixkit's kernels (MatMulNBits at accuracy level 1, plus the offset path at 4 bits); a16 / a8: "
             "prefixkit with activations rounded to 16- / 8-bit integers. Error: largest difference from a float64 "
             "matmul with fp32 activations, relative to the largest output.", "",
             "| K × N | bits | rows | threads | prefixkit | a16 | a8 | ORT exact | ORT fp32 MatMul | prefixkit error | a16 error | a8 error |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for K, N, bits in SHAPES:
        weight = on_grid(K, N, bits, seed=K + N)
        quantized = single_matmul(weight)
        quantize_graph(quantized, bits)
        rounded = {}
        for width in (16, 8):
            rounded[width] = single_matmul(weight)
            quantize_graph(rounded[width], bits, activations=width)
        calls = max(100, 20_000_000 // (K * N))
        feeds = {M: {"A": np.random.default_rng(M).standard_normal((M, 1, K)).astype(np.float32)} for M in ROWS}
        for threads in (1, 2):
            # one session at a time: an idle session's threads spin for a while after each run
            times, errors = {}, {}
            for kind, model in (("mine", quantized), ("a16", rounded[16]), ("a8", rounded[8]), ("theirs", quantized),
                                ("fp32", single_matmul(weight))):
                runner = session(model, threads, own_kernels=kind in ("mine", "a16", "a8"))
                for M, feed in feeds.items():
                    times[kind, M] = timed_us(lambda: runner.run(None, feed), calls)
                    if kind in ("mine", "a16", "a8"):
                        want = feed["A"][:, 0].astype(np.float64) @ weight.astype(np.float64)
                        errors[kind, M] = np.abs(runner.run(None, feed)[0][:, 0] - want).max() / np.abs(want).max()
                del runner
            for M in ROWS:
                row = (f"| {K} × {N} | {bits} | {M} | {threads} | {times['mine', M]:.0f} | {times['a16', M]:.0f} | "
                       f"{times['a8', M]:.0f} | {times['theirs', M]:.0f} | {times['fp32', M]:.0f} | "
                       f"{errors['mine', M]:.1e} | {errors['a16', M]:.1e} | {errors['a8', M]:.1e} |")
                print(row, flush=True)
                lines.append(row)
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
