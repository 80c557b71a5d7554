"""prefixkit's own CPU kernels (runtime/csrc/blockq.c) against float64 matmuls of the weights
they stand for, against the function bodies ONNX Runtime runs without them, and row by row."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from prefixkit.exporter.quantize import block_quantize, dequantize, quantize_graph
from prefixkit.runtime import kernels
from test_quantize import q4_1_like, q8_0_like, single_matmul
from tolerance import assert_within, rounding_rtol

# (K, N): an odd block count (zero points' last byte half padding), N not a multiple of the
# 4-column tiles or the 16-column tasks, one column, a deep K.
SHAPES = [(96, 40), (64, 1), (128, 133), (1536, 21)]
ROWS = [1, 2, 5, 6, 9, 16]  # up to 5 rows the weights are decoded in registers; more, once into a buffer


def weights(kind: str, K: int, N: int) -> tuple[np.ndarray, int]:
    """A weight and the bit width its kernel takes: Q4_1 -> MatMulQ4, Q8_0 -> MatMulQ8, and
    arbitrary weights, quantised (not exactly) to 4 bits -> MatMulQ4."""
    if kind == "q4_1":
        return q4_1_like(K, N, seed=K + N), 4
    if kind == "q8_0":
        return q8_0_like(K, N, seed=K + N), 8
    return np.random.default_rng(K * N).standard_normal((K, N)).astype(np.float32), 4


def session(model, own_kernels: bool, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if own_kernels:
        assert kernels.register(options, ["CPUExecutionProvider"])
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=["q4_1", "q8_0", "arbitrary"])
def case(request):
    built = []
    for K, N in SHAPES:
        weight, bits = weights(request.param, K, N)
        model = single_matmul(weight)
        quantize_graph(model, bits)
        assert [n.op_type for n in model.graph.node] == ["MatMulQ4" if bits == 4 else "MatMulQ8"]
        exact = dequantize(*block_quantize(weight, bits)).astype(np.float64)  # the weight the graph holds
        built.append((model, exact))
    return built


def test_the_library_built_at_install_is_found():
    path = kernels.library()
    assert path is not None and path.is_file() and path.name == kernels.library_name()


def test_a_process_never_compiles_a_missing_library(tmp_path, monkeypatch, capsys):
    calls = tmp_path / "compiler-called"
    compiler = tmp_path / "cc"
    compiler.write_text(f"#!/bin/sh\ntouch {calls}\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setattr(kernels, "LIBRARY_DIR", tmp_path / "lib")
    monkeypatch.setattr(kernels, "_said", set())
    assert kernels.library() is None and not kernels.register(ort.SessionOptions(), ["CPUExecutionProvider"])
    assert not calls.exists() and not (tmp_path / "lib").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m prefixkit.runtime.kernels" in err


def test_by_default_the_library_is_loaded_only_on_cpus_with_avx512(monkeypatch, capsys):
    """Without AVX-512 its portable path is slower than ONNX Runtime's own kernels
    (benchmarks/results/kernels-avx2.md): left out unless PREFIXKIT_KERNELS=1."""
    monkeypatch.delenv(kernels.KERNELS_ENV)
    assert kernels.setting() == "auto"
    monkeypatch.setattr(kernels, "_said", set())
    monkeypatch.setattr(kernels, "cpu_has_avx512", lambda: False)
    assert kernels.library() is None and not kernels.register(ort.SessionOptions(), ["CPUExecutionProvider"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "AVX-512" in err and "PREFIXKIT_KERNELS=1" in err
    monkeypatch.setattr(kernels, "cpu_has_avx512", lambda: True)
    assert kernels.library() == kernels.LIBRARY_DIR / kernels.library_name()
    monkeypatch.setattr(kernels, "cpu_has_avx512", lambda: False)
    monkeypatch.setenv(kernels.KERNELS_ENV, "1")
    assert kernels.library() == kernels.LIBRARY_DIR / kernels.library_name()


def test_an_onnx_runtime_older_than_the_library_s_api_is_refused_in_one_sentence(monkeypatch, capsys):
    assert kernels.required_api_version() == 17  # csrc/ort_abi.h
    monkeypatch.setattr(kernels, "runtime_api_version", lambda: 16)
    monkeypatch.setattr(kernels, "_said", set())
    assert not kernels.register(ort.SessionOptions(), ["CPUExecutionProvider"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "C API 17" in err and ort.__version__ in err


def test_a_build_replaces_builds_of_earlier_sources(tmp_path):
    stale = tmp_path / "libprefixkit_kernels-0000000000000000.so"
    stale.write_bytes(b"built from older sources")
    path = kernels.build(tmp_path)
    assert path.is_file() and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nor a temporary file left


def test_kernel_equals_a_float64_matmul_of_the_quantised_weight(case):
    for model, exact in case:
        K = exact.shape[0]
        mine, fallback = session(model, True), session(model, False)
        for M in ROWS:
            a = np.random.default_rng(M).standard_normal((M, 1, K)).astype(np.float32)
            want = a[:, 0].astype(np.float64) @ exact
            got = mine.run(None, {"A": a})[0][:, 0]
            # fp32 sums of K products: within their rounding, as ONNX Runtime's own (tests/tolerance.py)
            assert_within(got, want, rounding_rtol(1, K), err_msg=f"{exact.shape}, {M} rows")
            assert_within(got, fallback.run(None, {"A": a})[0][:, 0], rounding_rtol(1, K), err_msg=f"{exact.shape}")


def assert_rows_independent(model, K: int, seed: int, prefill: bool = False) -> None:
    """Bit for bit, with 1 or 2 threads: each of 16 rows computed alone equals the same row in a
    batch of every size in ROWS (and, with `prefill`, as positions of two sequences of 8)."""
    a = np.random.default_rng(seed).standard_normal((16, 1, K)).astype(np.float32)
    for threads in (1, 2):
        mine = session(model, True, threads)
        alone = np.concatenate([mine.run(None, {"A": a[i : i + 1]})[0] for i in range(16)])
        for M in ROWS:
            np.testing.assert_array_equal(mine.run(None, {"A": a[:M]})[0], alone[:M])
        if prefill:
            np.testing.assert_array_equal(mine.run(None, {"A": a.reshape(2, 8, K)})[0].reshape(16, 1, -1), alone)


def test_a_rows_result_does_not_depend_on_the_other_rows(case):
    """On either path (weights decoded in registers up to 5 rows, from a buffer beyond)."""
    for model, exact in case:
        assert_rows_independent(model, exact.shape[0], seed=7)


def test_a_prefill_equals_a_float64_matmul_and_each_position_is_its_own(case):
    """Rows that are positions of sequences ([B, T > 1, K], a prefill) take another path
    (MatMulQ4: weights decoded once into a panel, positions as a GEMM): still within rounding,
    and a position's result does not depend on how many others come with it (T = 1 is a decode
    step, the other path)."""
    for model, exact in case:
        K = exact.shape[0]
        mine, fallback = session(model, True), session(model, False)
        a = np.random.default_rng(K).standard_normal((2, 37, K)).astype(np.float32)
        got = mine.run(None, {"A": a})[0]
        want = a.astype(np.float64) @ exact
        assert_within(got, want, rounding_rtol(1, K), err_msg=f"{exact.shape}")
        assert_within(got, fallback.run(None, {"A": a})[0], rounding_rtol(1, K), err_msg=f"{exact.shape}")
        for T in (2, 5, 8, 13, 36):
            np.testing.assert_array_equal(mine.run(None, {"A": a[1:, :T]})[0][0], got[1, :T])


def test_three_dimensional_inputs_keep_their_shape(case):
    model, exact = case[0]
    a = np.random.default_rng(1).standard_normal((3, 4, exact.shape[0])).astype(np.float32)
    got = session(model, True).run(None, {"A": a})[0]
    assert got.shape == (3, 4, exact.shape[1])
    assert_within(got, a.astype(np.float64) @ exact, rounding_rtol(1, exact.shape[0]))


def test_the_portable_path_computes_the_same():
    """Where the CPU has no AVX-512 (forced here), a plain loop computes the same products."""
    code = (
        "import numpy as np, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_kernels import weights, session, single_matmul\n"
        "from prefixkit.exporter.quantize import block_quantize, dequantize, quantize_graph\n"
        "for kind in ('q4_1', 'q8_0'):\n"
        "    w, bits = weights(kind, 96, 40)\n"
        "    m = single_matmul(w); quantize_graph(m, bits)\n"
        "    a = np.random.default_rng(3).standard_normal((6, 1, 96)).astype(np.float32)\n"
        "    got = session(m, True).run(None, {'A': a})[0][:, 0]\n"
        "    want = a[:, 0].astype(np.float64) @ dequantize(*block_quantize(w, bits))\n"
        "    print(kind, float(np.abs(got - want).max() / np.abs(want).max()))\n"
    )
    env = dict(os.environ, PREFIXKIT_KERNEL_PORTABLE="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    errors = dict(line.split() for line in proc.stdout.split("\n") if line)
    assert set(errors) == {"q4_1", "q8_0"} and all(float(e) < rounding_rtol(1, 96) for e in errors.values())


def test_without_a_compiler_sessions_run_the_function_bodies(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(kernels.KernelBuildError, match="cannot run the C compiler"):
        kernels.build(tmp_path / "lib")
    monkeypatch.setattr(kernels, "LIBRARY_DIR", tmp_path / "lib")
    monkeypatch.setattr(kernels, "_said", set())
    assert kernels.library() is None
    assert "running without its own CPU kernels" in capsys.readouterr().err
    options = ort.SessionOptions()
    assert not kernels.register(options, ["CPUExecutionProvider"])
    weight = q4_1_like(64, 8)
    model = single_matmul(weight)
    quantize_graph(model, 4)
    a = np.ones((1, 1, 64), np.float32)
    got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    assert_within(got[0, 0], a[0, 0] @ weight, rounding_rtol(1, 64))


def test_turned_off_or_on_a_gpu_provider_it_is_not_registered(monkeypatch):
    assert not kernels.register(ort.SessionOptions(), ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv(kernels.KERNELS_ENV, "0")
    assert kernels.library() is None and not kernels.register(ort.SessionOptions(), ["CPUExecutionProvider"])


# ---- Integer activations (exports quantised as int4-a16, int4-a8, ...) ----

LEVELS = {16: 16256, 8: 127}  # the largest integer an activation is rounded to, per width


def integer_activations(a: np.ndarray, width: int) -> np.ndarray:
    """The activations as the kernel rounds them, per row and block of 32: x = round(a * L /
    max|a|) to nearest even, in float32 as the kernel computes it, times max|a| / L."""
    M, K = a.shape
    levels = np.float32(LEVELS[width])
    blocks = a.reshape(M, K // 32, 32).astype(np.float32)
    most = np.abs(blocks).max(axis=-1, keepdims=True)
    inverse = np.where(most > 0, levels / np.where(most > 0, most, 1), 0).astype(np.float32)
    x = np.rint((blocks * inverse).astype(np.float32))
    assert np.abs(x).max() <= levels
    return (x * (most / levels).astype(np.float64)).reshape(M, K)


@pytest.fixture(scope="module", params=[(kind, width) for width in (16, 8) for kind in ("q4_1", "q8_0", "arbitrary")],
                ids=lambda p: f"{p[0]}-a{p[1]}")
def integer_case(request):
    """Per shape: the model with its node's activations at 16 or 8 bits, the same at fp32, and the
    float64 reference: the rounded activations times the quantised weight, except MatMulQ4's
    block offsets, which take the fp32 activations' block sums."""
    kind, width = request.param
    built = []
    for K, N in SHAPES:
        weight, bits = weights(kind, K, N)
        model, plain = single_matmul(weight), single_matmul(weight)
        quantize_graph(model, bits, activations=width)
        quantize_graph(plain, bits)
        assert [(a.name, a.i) for a in model.graph.node[0].attribute if a.name == "activations"] == [("activations", width)]
        q, scale, low = block_quantize(weight, bits)
        exact = dequantize(q, scale, low).astype(np.float64)
        offsets = np.zeros_like(exact)
        if bits == 4:  # MatMulQ4: scale * (q - 8) + offsets, offsets = low + 8 * scale
            offsets = np.repeat(low + 8 * scale, 32, axis=1).T.astype(np.float64)

        def reference(a, exact=exact, offsets=offsets):
            return integer_activations(a, width) @ (exact - offsets) + a.astype(np.float64) @ offsets

        built.append((model, plain, exact, reference))
    return width, built


def test_integer_activations_equal_their_float64_reference(integer_case):
    """Integer sums are exact, so only the fp32 parts round (scales, block sums, and MatMulQ4's
    sums of the activations for the offsets, K terms in all): within rounding_rtol(1, K) of the
    largest output. The outputs are off the fp32-activation result by more than ten times that
    kernel's own rounding error on the same inputs, so the rounding to integers did take place
    (measured on these shapes: 1e-5 to 4e-4 at 16 bits, 2e-3 to 8e-2 at 8 bits, one output column
    the most)."""
    width, built = integer_case
    for model, plain, exact, reference in built:
        K = exact.shape[0]
        mine, fp32 = session(model, True), session(plain, True)
        off_fp32 = fp32_error = 0.0
        for M in ROWS + [40]:
            a = np.random.default_rng(M).standard_normal((M, 1, K)).astype(np.float32)
            got = mine.run(None, {"A": a})[0][:, 0]
            want = reference(a[:, 0])
            assert_within(got, want, rounding_rtol(1, K), err_msg=f"{exact.shape}, {M} rows")
            exact_fp32 = a[:, 0].astype(np.float64) @ exact
            scale = np.abs(exact_fp32).max()
            off_fp32 = max(off_fp32, np.abs(got - exact_fp32).max() / scale)
            fp32_error = max(fp32_error, np.abs(fp32.run(None, {"A": a})[0][:, 0] - exact_fp32).max() / scale)
        assert off_fp32 > 10 * fp32_error, (exact.shape, off_fp32, fp32_error)
        # how far quantising the activations moves the outputs (measured, not a rounding bound)
        assert (off_fp32 < 1e-3) if width == 16 else (5e-4 < off_fp32 < 1e-1), (exact.shape, off_fp32)
        a = np.random.default_rng(K).standard_normal((2, 37, K)).astype(np.float32)  # a prefill's positions
        got = mine.run(None, {"A": a})[0]
        want = reference(a.reshape(-1, K)).reshape(got.shape)
        assert_within(got, want, rounding_rtol(1, K), err_msg=f"{exact.shape}")


def test_integer_activations_round_ties_to_even(integer_case):
    """Blocks whose largest value is the width's L, so a * L / max|a| = a: half-integers sit exactly
    on ties, which round to even (np.rint), not away from zero."""
    width, built = integer_case
    for model, _, exact, reference in built:
        K = exact.shape[0]
        halves = np.random.default_rng(K).integers(-LEVELS[width] // 2, LEVELS[width] // 2, (3, K)) + 0.5
        halves[:, ::32] = LEVELS[width]  # each block's largest magnitude
        a = halves.astype(np.float32)[:, None]
        got = session(model, True).run(None, {"A": a})[0][:, 0]
        assert_within(got, reference(a[:, 0]), rounding_rtol(1, K), err_msg=f"{exact.shape}")


def test_with_integer_activations_a_rows_result_does_not_depend_on_the_other_rows(integer_case):
    """Decode steps and prefills take one path here, so a prefill's positions equal it too."""
    for model, _, exact, _ in integer_case[1]:
        assert_rows_independent(model, exact.shape[0], seed=8, prefill=True)


def test_with_integer_activations_the_portable_path_computes_the_same():
    """Without VNNI (forced here: no AVX-512 paths at all) a plain loop computes the same numbers
    from the unpacked weights."""
    code = (
        "import numpy as np, sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_kernels import weights, session, single_matmul\n"
        "from prefixkit.exporter.quantize import quantize_graph\n"
        "for kind in ('q4_1', 'q8_0'):\n"
        "    for width in (16, 8):\n"
        "        w, bits = weights(kind, 96, 40)\n"
        "        m = single_matmul(w); quantize_graph(m, bits, activations=width)\n"
        "        a = np.random.default_rng(3).standard_normal((6, 1, 96)).astype(np.float32)\n"
        "        np.save(f'{sys.argv[1]}{kind}-{width}.npy', session(m, True).run(None, {'A': a})[0])\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for portable in ("0", "1"):
            env = dict(os.environ, PREFIXKIT_KERNEL_PORTABLE=portable)
            subprocess.run([sys.executable, "-c", code, f"{tmp}/{portable}-"], env=env, check=True)
        for name in ("q4_1-16", "q4_1-8", "q8_0-16", "q8_0-8"):
            vnni, portable = np.load(f"{tmp}/0-{name}.npy"), np.load(f"{tmp}/1-{name}.npy")
            assert_within(portable, vnni, rounding_rtol(1, 96), err_msg=name)


def test_with_integer_activations_the_function_body_keeps_fp32_activations(integer_case):
    """Sessions without the library (GPU providers, no compiler) run the body: the exact result."""
    for model, plain, exact, _ in integer_case[1]:
        K = exact.shape[0]
        a = np.random.default_rng(5).standard_normal((3, 1, K)).astype(np.float32)
        np.testing.assert_array_equal(session(model, False).run(None, {"A": a})[0],
                                      session(plain, False).run(None, {"A": a})[0])


def test_an_unknown_activation_width_is_refused():
    model = single_matmul(q4_1_like(64, 8))
    with pytest.raises(ValueError, match="activations must be one of"):
        quantize_graph(model, 4, activations=12)
    quantize_graph(model, 4)
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("activations", 12))
    with pytest.raises(Exception, match="activations must be 8, 16 or 32"):
        session(model, True)
