"""prefixkit's own CPU kernels for ONNX Runtime, as a custom-operator library.

ONNX Runtime's exact int4 kernels (MatMulNBits with fp32 activations) are fast for one row
only, and a Q4_1 weight's block offsets cost a side path of their own. `csrc/blockq.c` computes
prefixkit.MatMulQ4, a block-quantised matmul with its offsets, for any number of rows (see the
file), and prefixkit.MatMulQ8. `csrc/attention.c` computes prefixkit.Attention, the fused graph's
GroupQueryAttention without its per-head GEMM calls. Exports name each as a function whose body
is the standard-op form, so a session without this library (another ONNX Runtime user, a GPU
provider, a machine without a C compiler) runs the same graph unchanged, slower.

The library is compiled once from the shipped sources with the C compiler ($CC, else cc) into
the cache (files.cache_dir()/kernels), under a name that is the hash of its sources, written
atomically; a new build removes those of earlier sources. $PREFIXKIT_KERNELS=0 turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .files import cache_dir

DOMAIN = "prefixkit"
KERNELS_ENV = "PREFIXKIT_KERNELS"
SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
SOURCES = ("blockq.c", "attention.c", "ort_abi.h")
C_SOURCES = [SOURCE_DIR / name for name in SOURCES if name.endswith(".c")]
FLAGS = ("-O3", "-shared", "-fPIC", "-fvisibility=hidden", "-std=gnu11")

_built: dict[Path, Path | None] = {}  # per cache folder: the library, or None where it cannot be built


class KernelBuildError(RuntimeError):
    pass


def enabled() -> bool:
    return os.environ.get(KERNELS_ENV, "1").strip() not in ("0", "false", "no", "off")


def library_name() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    digest.update(" ".join(FLAGS).encode())
    return f"libprefixkit_kernels-{digest.hexdigest()[:16]}.so"


def build(folder: Path | None = None) -> Path:
    """The compiled library, built into `folder` (default: the cache) if it is not there yet.
    Raises KernelBuildError with the compiler's message where it cannot be built."""
    folder = Path(folder) if folder else cache_dir() / "kernels"
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


def library() -> Path | None:
    """The library for this process's sessions, built on first use; None where turned off or
    where it cannot be built (said once on stderr, and the graphs run their fallback bodies)."""
    if not enabled():
        return None
    folder = cache_dir() / "kernels"
    if folder not in _built:
        try:
            _built[folder] = build(folder)
        except (KernelBuildError, OSError) as e:
            print(f"prefixkit: running without its own CPU kernels (slower int4/int8): {e}", file=sys.stderr)
            _built[folder] = None
    return _built[folder]


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
    options.register_custom_ops_library(str(path))
    return True
