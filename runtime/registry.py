"""pt-serve's prefixes by name: from --prefix files, a --prefix-dir that is rescanned, and
uploads (kept in the directory when there is one). Every prefix is checked against the
backbone; a file that fails is skipped and reported, and changes nothing else."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from .files import atomic_write, remove_stale_temporaries
from .manifest import Manifest
from .prefix import Prefix, PrefixFileError, load_prefix

log = logging.getLogger("prefixkit.registry")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def valid_name(name: str) -> bool:
    """Whether `name` may name a prefix (and so a file in the prefix directory)."""
    return NAME.fullmatch(name) is not None


@dataclasses.dataclass
class Entry:
    prefix: Prefix
    path: Path | None
    mtime: float | None
    from_dir: bool
    created: int


class PrefixRegistry:
    """Named prefixes checked against the backbone. Uploads and deletes are serialised, so one
    racing the other leaves the name either present and whole or absent."""

    def __init__(self, manifest: Manifest, directory: Path | None = None):
        self.manifest = manifest
        self.directory = directory
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()  # the entries
        self._writing = threading.Lock()  # uploads, deletes and rescans, one at a time
        if directory is not None:
            for name in remove_stale_temporaries(directory, patterns=(".*.npz",)):
                log.warning("removed %s, left by an upload that did not finish", directory / name)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(name)

    def _read(self, source: Path | bytes, name: str | None = None) -> Prefix:
        return load_prefix(source, architecture=self.manifest.architecture, fingerprint=self.manifest.fingerprint,
                           name=name)

    def load(self, name: str, path: Path, from_dir: bool = False) -> Entry:
        if not valid_name(name):
            raise PrefixFileError(f"{path}: {name!r} is not a usable prefix name ({NAME_RULE}).")
        mtime = path.stat().st_mtime  # before reading: a change after it is seen at the next rescan
        prefix = self._read(path)
        entry = Entry(prefix, path, mtime, from_dir, _created(prefix, mtime))
        with self._lock:
            self._entries[name] = entry
        return entry

    def reload(self) -> dict[str, Any]:
        """Rescan the directory: new files appear, changed ones are reloaded, removed ones go. A
        file that cannot be used is skipped, logged and listed under "failed"."""
        result: dict[str, Any] = {"added": [], "removed": [], "updated": [], "failed": {}}
        if self.directory is None:
            return result
        with self._writing:
            found = {p.stem: p for p in sorted(self.directory.glob("*.npz")) if not p.name.startswith(".")}
            with self._lock:
                current = {n: e for n, e in self._entries.items() if e.from_dir}
            for name, path in found.items():
                entry = current.get(name)
                try:
                    if entry is None:
                        if self.get(name) is None:  # a --prefix of the same name wins
                            self.load(name, path, from_dir=True)
                            result["added"].append(name)
                    elif path.stat().st_mtime != entry.mtime:
                        self.load(name, path, from_dir=True)
                        result["updated"].append(name)
                except FileNotFoundError:
                    found[name] = None  # removed while we looked
                except Exception as e:  # noqa: BLE001 - any bad file is skipped, never the scan
                    problem = str(e) if isinstance(e, (PrefixFileError, OSError)) else f"{type(e).__name__}: {e}"
                    result["failed"][name] = problem[:500]
                    log.warning("skipped prefix %s: %s", name, problem[:500])
            with self._lock:
                for name in current:
                    if found.get(name) is None and name in self._entries:
                        del self._entries[name]
                        result["removed"].append(name)
        return result

    def upload(self, name: str, data: bytes) -> tuple[Entry, bool]:
        """Check an uploaded file and keep it under `name`: in the directory (atomically) when
        there is one, else in memory. PrefixFileError says what is wrong with it."""
        prefix = self._read(data, name="the uploaded file")
        with self._writing:
            replaced = self.get(name) is not None
            path, mtime, from_dir = None, None, False
            if self.directory is not None:
                path, from_dir = self.directory / f"{name}.npz", True
                with atomic_write(path) as f:
                    f.write(data)
                mtime = path.stat().st_mtime
            entry = Entry(prefix, path, mtime, from_dir, _created(prefix, mtime or time.time()))
            with self._lock:
                self._entries[name] = entry
        return entry, replaced

    def delete(self, name: str) -> bool:
        with self._writing:
            with self._lock:
                entry = self._entries.pop(name, None)
            if entry is None:
                return False
            if entry.from_dir and entry.path is not None:
                entry.path.unlink(missing_ok=True)
        return True


def _created(prefix: Prefix, mtime: float) -> int:
    try:
        return int(datetime.datetime.fromisoformat(prefix.meta["created"]).timestamp())
    except (KeyError, TypeError, ValueError, OverflowError):
        return int(mtime)
