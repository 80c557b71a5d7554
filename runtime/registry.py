"""pt-serve's prefixes by name: read from the store on a name's first request, validated against
the backbone, and kept in a cache bounded in bytes that evicts the least recently used.

- Lookups cost the same however many prefixes the store holds: one dictionary lookup when the
  prefix is in memory and was checked against the store less than `recheck_s` ago; otherwise one
  `stat` of its name, and a read when the version changed. Nothing lists the store.
- Consistency: a prefix replaced in the store by anyone is served in its new version from the
  first request that starts more than `recheck_s` after the replacement (a version check, not a
  TTL on the content: an unchanged prefix is never read twice). Uploads and deletes through this
  server write through to the store and the cache at once.
- Loads, uploads and deletes of one name are serialised by that name's lock, so a slow load of
  an old version can never land after a newer write.
- A prefix that rows of the running batch use (`pin`) is never evicted; when it is replaced or
  deleted its memory is still counted until the last of its rows finishes.
- A file that fails validation is refused with a PrefixFileError naming the prefix, remembered
  by its version so it is not read again until it changes. A store that cannot be read raises
  StoreUnavailable for names not in memory; those in memory go on being served.
- `--prefix` files given at start are fixed: always in memory, outside the cache's bound, and
  they win over a store file of the same name.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .manifest import Manifest
from .prefix import Prefix, PrefixFileError, load_prefix
from .store import PrefixStore, Stored, StoreUnavailable

log = logging.getLogger("prefixkit.registry")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_LOCK_STRIPES = 64
_FAILURES_KEPT = 1024


def valid_name(name: str) -> bool:
    """Whether `name` may name a prefix (and so a file in the prefix store)."""
    return NAME.fullmatch(name) is not None


class UnknownPrefix(KeyError):
    """No prefix of that name in the store."""


class FixedPrefix(ValueError):
    """The name is a --prefix file given at start, which the API does not replace or delete."""


@dataclasses.dataclass(eq=False)
class Entry:
    name: str
    prefix: Prefix
    version: str | None  # the store's version; None for a --prefix file
    created: int
    nbytes: int
    checked: float  # time.monotonic() of the last check against the store
    users: int = 0  # rows of the running batch (or queued) that use it
    resident: bool = True  # in the cache; False once evicted, replaced or deleted


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    loads: int = 0


class PrefixRegistry:
    def __init__(self, manifest: Manifest, store: PrefixStore, max_bytes: int, recheck_s: float = 1.0,
                 on_load: Callable[[str], None] | None = None):
        self.manifest = manifest
        self.store = store
        self.max_bytes = max_bytes
        self.recheck_s = recheck_s
        self.on_load = on_load or (lambda name: None)
        self.stats = CacheStats()
        self._fixed: dict[str, Entry] = {}
        self._entries: "collections.OrderedDict[str, Entry]" = collections.OrderedDict()  # least recent first
        self._bytes = 0  # of the entries in the cache
        self._retired = 0  # of entries out of the cache whose rows have not finished
        self._failed: "collections.OrderedDict[tuple[str, str], str]" = collections.OrderedDict()
        self._lock = threading.Lock()  # the dictionaries and counts above
        self._names = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    # -- reading --------------------------------------------------------------------------------
    def add_fixed(self, name: str, path: Path) -> Entry:
        """A --prefix file, read now and kept for the server's life."""
        if not valid_name(name):
            raise PrefixFileError(f"{path}: {name!r} is not a usable prefix name ({NAME_RULE}).")
        mtime = path.stat().st_mtime
        prefix = self._validate(path)
        entry = Entry(name, prefix, None, _created(prefix, mtime), _nbytes(prefix), float("inf"))
        self._fixed[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The prefix named `name`, from memory or the store. Raises UnknownPrefix, PrefixFileError
        (the store's file is bad) or StoreUnavailable (not in memory, and the store cannot be read)."""
        fixed = self._fixed.get(name)
        if fixed is not None:
            return fixed
        entry = self._fresh(name)
        if entry is not None:
            return entry
        with self._name_lock(name):
            entry = self._fresh(name)  # another request may have loaded it meanwhile
            if entry is not None:
                return entry
            with self._lock:
                entry = self._entries.get(name)
            try:
                stored = self.store.stat(name)
            except StoreUnavailable as e:
                if entry is None:
                    raise
                log.warning("serving '%s' from memory: %s", name, e)
                return self._hit(entry, checked=True)
            if stored is None:
                if entry is not None:
                    self._drop(entry)
                raise UnknownPrefix(name)
            if entry is not None and entry.version == stored.version:
                return self._hit(entry, checked=True)
            return self._load(name, stored)

    def cached(self, name: str) -> Entry | None:
        """The prefix if it is in memory, without touching the store."""
        with self._lock:
            return self._fixed.get(name) or self._entries.get(name)

    def page(self, after: str | None, limit: int) -> list[Stored]:
        return self.store.page(after, limit)

    def fixed_names(self) -> list[str]:
        return sorted(self._fixed)

    def recheck(self) -> dict[str, Any]:
        """Check every prefix in memory against the store now: "updated" were read again,
        "removed" are gone from the store, "failed" cannot be used (and are dropped)."""
        result: dict[str, Any] = {"added": [], "removed": [], "updated": [], "failed": {}}
        with self._lock:
            cached = list(self._entries.values())
        for old in cached:
            if not old.resident:  # evicted by an earlier one's new version: nothing to check
                continue
            old.checked = float("-inf")
            try:
                if self.get(old.name) is not old:
                    result["updated"].append(old.name)
            except UnknownPrefix:
                result["removed"].append(old.name)
            except (PrefixFileError, StoreUnavailable) as e:
                result["failed"][old.name] = str(e)[:500]
        return result

    # -- rows using a prefix ------------------------------------------------------------------------
    def pin(self, entry: Entry, rows: int = 1) -> None:
        """`rows` more rows use `entry`: it stays in memory until each has called `unpin`."""
        with self._lock:
            if entry.users == 0 and not entry.resident:
                self._retired += entry.nbytes
            entry.users += rows

    def unpin(self, entry: Entry) -> None:
        with self._lock:
            entry.users -= 1
            if entry.users == 0 and not entry.resident:
                self._retired -= entry.nbytes
            self._evict()

    # -- writing --------------------------------------------------------------------------------
    def upload(self, name: str, data: bytes) -> tuple[Entry, bool]:
        """Check an uploaded file, write it to the store and serve it from now on. Raises
        PrefixFileError (the file), FixedPrefix or StoreUnavailable."""
        self._refuse_fixed(name)
        prefix = self._validate(data, where="the uploaded file")
        with self._name_lock(name):
            replaced = self.store.stat(name) is not None
            stored = self.store.put(name, data)
            entry = Entry(name, prefix, stored.version, _created(prefix, stored.modified), _nbytes(prefix),
                          time.monotonic())
            self._insert(entry)
        return entry, replaced

    def delete(self, name: str) -> bool:
        self._refuse_fixed(name)
        with self._name_lock(name):
            removed = self.store.delete(name)
            with self._lock:
                entry = self._entries.get(name)
            if entry is not None:
                self._drop(entry)
        return removed

    # -- what the metrics read ----------------------------------------------------------------------
    @property
    def bytes_held(self) -> int:
        """Bytes of prefixes in memory: the cache's, and those evicted or replaced but still in use."""
        return self._bytes + self._retired

    @property
    def in_memory(self) -> int:
        return len(self._entries) + len(self._fixed)

    # -- inside ---------------------------------------------------------------------------------
    def _name_lock(self, name: str) -> threading.Lock:
        return self._names[hash(name) % _LOCK_STRIPES]

    def _fresh(self, name: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or time.monotonic() - entry.checked >= self.recheck_s:
                return None
            self._entries.move_to_end(name)
            self.stats.hits += 1
            return entry

    def _hit(self, entry: Entry, checked: bool) -> Entry:
        with self._lock:
            if checked:
                entry.checked = time.monotonic()
            if entry.resident:
                self._entries.move_to_end(entry.name)
            self.stats.hits += 1
        return entry

    def _load(self, name: str, stored: Stored) -> Entry:
        with self._lock:
            self.stats.misses += 1
            known = self._failed.get((name, stored.version))
        if known is not None:
            raise PrefixFileError(known)
        read = self.store.read(name)
        if read is None:
            with self._lock:
                entry = self._entries.get(name)
            if entry is not None:
                self._drop(entry)
            raise UnknownPrefix(name)
        data, stored = read
        try:
            prefix = self._validate(data, where=f"prefix '{name}'")
        except PrefixFileError as e:
            with self._lock:
                self._failed[(name, stored.version)] = str(e)
                while len(self._failed) > _FAILURES_KEPT:
                    self._failed.popitem(last=False)
                entry = self._entries.get(name)
            if entry is not None:
                self._drop(entry)
            raise
        entry = Entry(name, prefix, stored.version, _created(prefix, stored.modified), _nbytes(prefix),
                      time.monotonic())
        self._insert(entry)
        with self._lock:
            self.stats.loads += 1
        self.on_load(name)
        return entry

    def _validate(self, source: Path | bytes, where: str | None = None) -> Prefix:
        return load_prefix(source, architecture=self.manifest.architecture, fingerprint=self.manifest.fingerprint,
                           name=where)

    def _insert(self, entry: Entry) -> None:
        with self._lock:
            old = self._entries.pop(entry.name, None)
            if old is not None:
                self._retire(old)
            self._entries[entry.name] = entry
            self._bytes += entry.nbytes
            self._evict()

    def _drop(self, entry: Entry) -> None:
        with self._lock:
            if self._entries.get(entry.name) is entry:
                del self._entries[entry.name]
                self._retire(entry)

    def _retire(self, entry: Entry) -> None:
        """Out of the cache (with the lock held): its bytes count until its last row is done."""
        entry.resident = False
        self._bytes -= entry.nbytes
        if entry.users > 0:
            self._retired += entry.nbytes

    def _evict(self) -> None:
        """Least recently used first, never a prefix in use (with the lock held)."""
        over = self._bytes + self._retired - self.max_bytes
        victims = []
        for entry in self._entries.values():
            if over <= 0:
                break
            if entry.users == 0:
                victims.append(entry)
                over -= entry.nbytes
        for entry in victims:
            del self._entries[entry.name]
            self._retire(entry)
            self.stats.evictions += 1

    def _refuse_fixed(self, name: str) -> None:
        if name in self._fixed:
            raise FixedPrefix(f"'{name}' is a --prefix file given at start; the API cannot replace or delete it.")


def _nbytes(prefix: Prefix) -> int:
    """What a prefix holds in memory: its arrays, and its meta counted as its JSON."""
    arrays = [a for a in (prefix.key, prefix.value, prefix.enc_key, prefix.enc_value, prefix.cross_key,
                          prefix.cross_value) if a is not None]
    return sum(a.nbytes for a in arrays) + len(json.dumps(prefix.meta))


def _created(prefix: Prefix, mtime: float) -> int:
    try:
        return int(datetime.datetime.fromisoformat(prefix.meta["created"]).timestamp())
    except (KeyError, TypeError, ValueError, OverflowError):
        return int(mtime)
