"""prefixkit's own CPU kernels for ONNX Runtime, as a custom-operator library.

ONNX Runtime's exact int4 kernels (MatMulNBits with fp32 activations) are fast for one row
only, and a Q4_1 weight's block offsets cost a side path of their own. `csrc/blockq.c` computes
prefixkit.MatMulQ4, a block-quantised matmul with its offsets, for any number of rows (see the
file), and prefixkit.MatMulQ8. `csrc/attention.c` computes prefixkit.Attention, the fused graph's
GroupQueryAttention without its per-head GEMM calls. Exports name each as a function whose body
is the standard-op form, so a session without this library (another ONNX Runtime user, a GPU
provider, a machine without a C compiler) runs the same graph unchanged, slower.

The library is compiled when prefixkit is installed (`make setup` runs
`python -m prefixkit.runtime.kernels`), never while a service runs: with the C compiler ($CC,
else cc) into `lib/` beside this file, under a name that is the hash of its sources, written
atomically; a new build removes those of earlier sources. A process that finds no library for
its sources says so once and runs the graphs' standard-op bodies.

The library is fast where the CPU has AVX-512; elsewhere its portable C path computes the same
sums far slower than ONNX Runtime's own kernels (benchmarks/results/kernels-avx2.md), so by
default it is loaded only on AVX-512 CPUs. $PREFIXKIT_KERNELS: unset or "auto" as just said,
"1" loads it on any CPU (the tests check the portable path so), "0" never.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOMAIN = "prefixkit"
KERNELS_ENV = "PREFIXKIT_KERNELS"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
LIBRARY_DIR = Path(__file__).resolve().parent / "lib"
SOURCES = ("blockq.c", "attention.c", "ort_abi.h")
C_SOURCES = [SOURCE_DIR / name for name in SOURCES if name.endswith(".c")]
FLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-std=gnu11")

_said: set[str] = set()  # what a process has said once on stderr


class KernelBuildError(RuntimeError):
    pass


def setting() -> str:
    """$PREFIXKIT_KERNELS as "auto", "on" or "off"."""
    value = os.environ.get(KERNELS_ENV, "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    return "on" if value in ("1", "true", "yes", "on") else "auto"


def wanted() -> bool:
    """Whether this process would use the library: not turned off, and AVX-512 or forced on."""
    return setting() == "on" or (setting() == "auto" and cpu_has_avx512())


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether the CPU has the AVX-512 subsets the kernels' fast paths use (Linux's
    /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512dq"} <= set(flags)


def library_name() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    digest.update(" ".join(FLAGS).encode())
    return f"libprefixkit_kernels-{digest.hexdigest()[:16]}.so"


def build(folder: Path | None = None) -> Path:
    """The compiled library, built into `folder` (default: LIBRARY_DIR) if it is not there yet.
    Raises KernelBuildError with the compiler's message where it cannot be built. Run at
    install time only."""
    folder = Path(folder) if folder else LIBRARY_DIR
    path = folder / library_name()
    if path.is_file():
        return path
    if sys.platform not in ("linux", "darwin"):
        raise KernelBuildError(f"prefixkit's kernels are built on Linux and macOS only, not {sys.platform}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        raise KernelBuildError("no C compiler found (set $CC, or install gcc or clang)")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        try:
            proc = subprocess.run([compiler, *FLAGS, *map(str, C_SOURCES), "-o", tmp], capture_output=True, text=True)
        except OSError as e:
            raise KernelBuildError(f"cannot run the C compiler {compiler}: {e}") from None
        if proc.returncode != 0:
            raise KernelBuildError(f"{compiler} failed to build prefixkit's kernels:\n{proc.stderr.strip()}")
        os.replace(tmp, path)  # another process building the same sources writes the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    for old in folder.glob("libprefixkit_kernels-*.so"):  # builds of earlier sources
        if old != path:
            with contextlib.suppress(OSError):  # a process using it keeps its mapping
                old.unlink()
    return path


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(f"prefixkit: {message}", file=sys.stderr)


def library() -> Path | None:
    """The library built at install time for these sources; None where turned off or not
    built (said once on stderr: the graphs then run their standard-op bodies)."""
    if not wanted():
        if setting() == "auto":
            _say_once("using ONNX Runtime's own CPU kernels: prefixkit's are faster only with AVX-512, which "
                      f"this CPU lacks ({KERNELS_ENV}=1 loads them anyway).")
        return None
    path = LIBRARY_DIR / library_name()
    if not path.is_file():
        _say_once("running without its own CPU kernels (slower int4/int8 and attention): they are not "
                  "built for this installation; run `python -m prefixkit.runtime.kernels` once.")
        return None
    return path


@functools.cache
def required_api_version() -> int:
    """The ONNX Runtime C API version the library is written against (csrc/ort_abi.h)."""
    return int(re.search(r"#define PK_ORT_API_VERSION (\d+)", (SOURCE_DIR / "ort_abi.h").read_text()).group(1))


def runtime_api_version() -> int:
    """The C API version of the installed ONNX Runtime (release 1.N serves API N)."""
    import onnxruntime as ort

    return int(ort.__version__.split(".")[1])


def cpu_only(providers) -> bool:
    """Whether a session with these providers runs on the CPU alone, where the kernels apply
    (on a GPU provider the graphs' fallback bodies keep the work on the device)."""
    return [p[0] if isinstance(p, tuple) else p for p in providers] == ["CPUExecutionProvider"]


def register(options, providers) -> bool:
    """Register the library into ONNX Runtime SessionOptions where the session runs on the CPU
    alone. Returns whether it was registered."""
    if not cpu_only(providers):
        return False
    path = library()
    if path is None:
        return False
    if runtime_api_version() < required_api_version():
        import onnxruntime as ort

        _say_once(f"running without its own CPU kernels: they need ONNX Runtime's C API "
                  f"{required_api_version()} (onnxruntime 1.{required_api_version()} or later), "
                  f"and onnxruntime {ort.__version__} is installed.")
        return False
    options.register_custom_ops_library(str(path))
    return True


def main() -> None:
    """Build the library for this installation (`python -m prefixkit.runtime.kernels`)."""
    try:
        print(build())
    except KernelBuildError as e:
        sys.exit(f"prefixkit: {e}")


if __name__ == "__main__":
    main()
