"""Atomic writes for the files users keep (prefixes, manifests, checkpoints), and prefixkit's cache."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def cache_dir() -> Path:
    """Where prefixkit keeps what it fetches or builds once: $PREFIXKIT_CACHE, else
    $XDG_CACHE_HOME/prefixkit, else ~/.cache/prefixkit."""
    if os.environ.get("PREFIXKIT_CACHE"):
        return Path(os.environ["PREFIXKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "prefixkit"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", temporary_dir: str | os.PathLike | None = None) -> Iterator[IO]:
    """Open a temporary file beside `path` (or in `temporary_dir`, on the same file system); on
    success fsync it and rename it over `path`.

    An exception part-way leaves `path` as it was and no temporary file behind, so a reader
    never sees half a file. The temporary file is locked while it is written: one that a killed
    process left behind is unlocked, and `remove_stale_temporaries` removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=temporary_dir or path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a kept file gets the usual mode
        _lock(fd)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


TEMPORARY_SUFFIX = ".tmp"


def _lock(fd: int, wait: bool = True) -> bool:
    """An exclusive advisory lock on an open file (released when it is closed); False where
    another process holds it and `wait` is False."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locks, and nothing is ever taken for stale
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        return wait
    return True


def remove_stale_temporaries(folder: str | os.PathLike, patterns: tuple[str, ...] = ()) -> list[str]:
    """Remove the temporary files that atomic_write left in `folder` when its process was
    killed (hidden, ending in .tmp, and locked by no one), and hidden files matching
    `patterns`; the names removed."""
    removed = []
    for path in [p for pattern in (f".*{TEMPORARY_SUFFIX}", *patterns) for p in Path(folder).glob(pattern)]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _lock(fd, wait=False):
                os.unlink(path)
                removed.append(path.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _read_umask() -> int:
    # os.umask can only be read by setting it; do that once, at import, not per write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_folder(tmp: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Move the finished folder `tmp` to `dest`, replacing any folder there: the old one is moved
    aside first and removed only once the new one is in place."""
    import shutil

    tmp, dest = Path(tmp), Path(dest)
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
