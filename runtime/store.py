"""Where pt-serve's prefixes live: a store of prefix files by name, behind one small interface.

A store answers five questions, each about one name or one page, so that its cost does not
grow with the number of prefixes it holds: nothing here lists a whole store, except a page
listing, which a folder has to read in full (a client pages through `/v1/models` on its own
time, never the server at start).

  stat(name)        the file's version (or None when there is no such prefix), cheaply
  read(name)        its bytes and the version those bytes are
  put(name, data)   write it whole, atomically: a reader sees the old file or the new one
  delete(name)      remove it
  page(after, n)    the first n names after `after`, in order

A version is an opaque string that changes whenever the file is replaced: in a folder, the
file's inode, modification time and size. Files are only ever replaced by a rename, so one
inode is one content. A store that cannot be read at all raises StoreUnavailable; the server
answers that with 503 and keeps serving the prefixes it holds.
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import threading
import time
from pathlib import Path
from typing import Protocol

from .files import atomic_write, remove_stale_temporaries

SUFFIX = ".npz"


class StoreUnavailable(RuntimeError):
    """The store cannot be read or written right now (the message says why, in one sentence)."""


@dataclasses.dataclass(frozen=True)
class Stored:
    """One prefix file in a store: its name, version, last change (seconds since the epoch) and size."""

    name: str
    version: str
    modified: float
    size: int


class PrefixStore(Protocol):
    def stat(self, name: str) -> Stored | None: ...

    def read(self, name: str) -> tuple[bytes, Stored] | None: ...

    def put(self, name: str, data: bytes) -> Stored: ...

    def delete(self, name: str) -> bool: ...

    def page(self, after: str | None, limit: int) -> list[Stored]: ...

    def describe(self) -> str: ...


class FolderStore:
    """Prefix files `NAME.npz` in one folder. Uploads are written in its `.partial/` subfolder and
    renamed into place; what a killed upload left there is removed when the store opens."""

    PARTIAL = ".partial"

    def __init__(self, directory: str | os.PathLike, valid_name=None):
        self.directory = Path(directory)
        self.valid_name = valid_name or (lambda name: True)
        try:
            (self.directory / self.PARTIAL).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"the prefix folder {self.directory} cannot be used ({e.strerror or e}).") from None
        self.removed_at_start = remove_stale_temporaries(self.directory / self.PARTIAL)

    def describe(self) -> str:
        return str(self.directory)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def stat(self, name: str) -> Stored | None:
        try:
            return self._stored(name, os.stat(self.path(name)))
        except FileNotFoundError:
            self._check_folder()
            return None
        except OSError as e:
            raise self._unavailable(e) from None

    def read(self, name: str) -> tuple[bytes, Stored] | None:
        try:
            with open(self.path(name), "rb") as f:  # the version of the inode actually read
                return f.read(), self._stored(name, os.fstat(f.fileno()))
        except FileNotFoundError:
            self._check_folder()
            return None
        except IsADirectoryError:
            return b"", Stored(name, "directory", 0.0, 0)  # refused as "not an .npz file" by the reader
        except OSError as e:
            raise self._unavailable(e) from None

    def put(self, name: str, data: bytes) -> Stored:
        self._check_folder()  # never re-create a folder that went away
        try:
            (self.directory / self.PARTIAL).mkdir(exist_ok=True)
            with atomic_write(self.path(name), temporary_dir=self.directory / self.PARTIAL) as f:
                f.write(data)
            return self._stored(name, os.stat(self.path(name)))
        except OSError as e:
            raise self._unavailable(e, "written") from None

    def delete(self, name: str) -> bool:
        try:
            os.unlink(self.path(name))
            return True
        except FileNotFoundError:
            self._check_folder()
            return False
        except OSError as e:
            raise self._unavailable(e, "written") from None

    def page(self, after: str | None, limit: int) -> list[Stored]:
        """Reads the whole folder (scandir: one system call per few hundred names) and keeps the
        first `limit` names after `after`."""
        try:
            with os.scandir(self.directory) as entries:
                names = (e.name[: -len(SUFFIX)] for e in entries if e.name.endswith(SUFFIX))
                first = heapq.nsmallest(limit, (n for n in names if (after is None or n > after) and self.valid_name(n)))
        except OSError as e:
            raise self._unavailable(e) from None
        return [s for s in (self._stat_quietly(n) for n in first) if s is not None]

    def _stat_quietly(self, name: str) -> Stored | None:
        try:
            return self._stored(name, os.stat(self.path(name)))
        except OSError:  # removed since the folder was read
            return None

    @staticmethod
    def _stored(name: str, st: os.stat_result) -> Stored:
        return Stored(name, f"{st.st_ino}-{st.st_mtime_ns}-{st.st_size}", st.st_mtime, st.st_size)

    def _check_folder(self) -> None:
        """A missing file is a missing prefix only while the folder itself is there."""
        try:
            if os.path.isdir(self.directory):
                return
        except OSError as e:
            raise self._unavailable(e) from None
        raise StoreUnavailable(f"the prefix folder {self.directory} is gone.")

    def _unavailable(self, error: OSError, done: str = "read") -> StoreUnavailable:
        return StoreUnavailable(f"the prefix folder {self.directory} cannot be {done} ({error.strerror or error}).")


class MemoryStore:
    """Uploads kept in memory, for a server without a prefix folder: they last until it stops."""

    def __init__(self):
        self._files: dict[str, tuple[bytes, Stored]] = {}
        self._lock = threading.Lock()
        self._count = 0

    def describe(self) -> str:
        return "memory"

    def stat(self, name: str) -> Stored | None:
        with self._lock:
            found = self._files.get(name)
        return None if found is None else found[1]

    def read(self, name: str) -> tuple[bytes, Stored] | None:
        with self._lock:
            return self._files.get(name)

    def put(self, name: str, data: bytes) -> Stored:
        with self._lock:
            self._count += 1
            stored = Stored(name, str(self._count), time.time(), len(data))
            self._files[name] = (bytes(data), stored)
        return stored

    def delete(self, name: str) -> bool:
        with self._lock:
            return self._files.pop(name, None) is not None

    def page(self, after: str | None, limit: int) -> list[Stored]:
        with self._lock:
            names = heapq.nsmallest(limit, (n for n in self._files if after is None or n > after))
            return [self._files[n][1] for n in names]
