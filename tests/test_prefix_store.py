"""The prefix store and the memory-bounded cache in front of it: lookups by name, LRU eviction
counted in bytes, prefixes in use never evicted, the version rule for files replaced by another
process, bad files and an unreadable store."""

from __future__ import annotations

import concurrent.futures
import os
import time

import numpy as np
import pytest

from serving import write_prefix
from prefixkit.runtime import load_prefix
from prefixkit.runtime.manifest import load_manifest
from prefixkit.runtime.prefix import PrefixFileError
from prefixkit.runtime.registry import PrefixRegistry, UnknownPrefix, valid_name
from prefixkit.runtime.store import FolderStore, MemoryStore, S3Store, StoreUnavailable


@pytest.fixture(scope="module")
def made(tiny_export, tmp_path_factory):
    """An export's manifest and three different prefix files for it."""
    export, backbone = tiny_export
    root = tmp_path_factory.mktemp("store")
    files = {}
    for name, words in {"a": "one two", "b": "three four five", "c": "six"}.items():
        files[name] = write_prefix(backbone, words, root / f"{name}.npz").read_bytes()
    return load_manifest(export), files


def nbytes(data: bytes, manifest) -> int:
    prefix = load_prefix(data, manifest.architecture, manifest.fingerprint)
    import json

    return prefix.key.nbytes + prefix.value.nbytes + len(json.dumps(prefix.meta))


def registry(manifest, store, max_bytes=1 << 30, recheck_s=0.0):
    return PrefixRegistry(manifest, store, max_bytes=max_bytes, recheck_s=recheck_s)


def a_store(kind: str, tmp_path, request):
    if kind == "folder":
        return FolderStore(tmp_path / "s", valid_name)
    if kind == "s3":  # moto's S3 server on loopback, through the same client code as a real service
        request.getfixturevalue("s3_endpoint")
        return S3Store(f"s3://prefixes/{tmp_path.name}", valid_name)
    return MemoryStore()


@pytest.mark.parametrize("kind", ["folder", "memory", "s3"])
def test_a_store_gets_puts_deletes_and_pages_names_in_order(kind, made, tmp_path, request):
    _, files = made
    store = a_store(kind, tmp_path, request)
    assert store.stat("a") is None and store.read("a") is None and store.delete("a") is False
    names = [f"user{i:03d}" for i in range(25)]
    for name in reversed(names):
        store.put(name, files["a"])
    first = store.stat("user007")
    data, stored = store.read("user007")
    assert data == files["a"] and stored == first and stored.size == len(files["a"])
    store.put("user007", files["b"])  # replaced: a new version
    assert store.stat("user007").version != first.version and store.read("user007")[0] == files["b"]
    pages, after = [], None
    while True:
        page = store.page(after, 10)
        if not page:
            break
        pages.append([s.name for s in page])
        after = page[-1].name
    assert [len(p) for p in pages] == [10, 10, 5] and sum(pages, []) == names
    assert store.delete("user007") is True and store.stat("user007") is None and store.read("user007") is None
    store.put("a-b", files["a"])  # pages follow file names: "a-b.npz" sorts before "a.npz"
    store.put("a", files["a"])
    assert [s.name for s in store.page(None, 2)] == ["a-b", "a"]
    assert [s.name for s in store.page("a-b", 1)] == ["a"]
    if kind == "folder":  # names outside the rule, temporaries and other files are not prefixes
        (tmp_path / "s" / ".hidden.npz").write_bytes(b"x")
        (tmp_path / "s" / "notes.txt").write_bytes(b"x")
        assert [s.name for s in store.page("user023", 10)] == ["user024"]
        assert sorted(os.listdir(tmp_path / "s" / FolderStore.PARTIAL)) == []


def test_a_folder_store_that_cannot_be_read_says_so_and_a_missing_name_is_just_missing(made, tmp_path):
    store = FolderStore(tmp_path / "s", valid_name)
    assert store.stat("nobody") is None
    os.rename(tmp_path / "s", tmp_path / "moved")
    for call in (lambda: store.stat("nobody"), lambda: store.read("nobody"), lambda: store.page(None, 5)):
        with pytest.raises(StoreUnavailable, match="prefix folder"):
            call()


def test_first_request_reads_the_store_then_memory_answers(made, tmp_path):
    manifest, files = made
    store = FolderStore(tmp_path, valid_name)
    store.put("a", files["a"])
    prefixes = registry(manifest, store, recheck_s=60)
    with pytest.raises(UnknownPrefix):
        prefixes.get("nobody")
    entry = prefixes.get("a")
    np.testing.assert_array_equal(entry.prefix.key, load_prefix(files["a"]).key)
    assert prefixes.stats.loads == 1 and prefixes.get("a") is entry and prefixes.stats.loads == 1
    assert prefixes.bytes_held == entry.nbytes == nbytes(files["a"], manifest)


def test_the_cache_is_bounded_in_bytes_and_evicts_the_least_recently_used(made, tmp_path):
    manifest, files = made
    store = MemoryStore()
    for name in "abc":
        store.put(name + "1", files["a"])  # three prefixes of one size
    size = nbytes(files["a"], manifest)
    prefixes = registry(manifest, store, max_bytes=2 * size + size // 2, recheck_s=60)
    a, b = prefixes.get("a1"), prefixes.get("b1")
    prefixes.get("a1")  # b1 is now the least recently used
    prefixes.get("c1")
    assert prefixes.cached("b1") is None and prefixes.cached("a1") is a and prefixes.cached("c1") is not None
    assert prefixes.stats.evictions == 1 and prefixes.bytes_held == 2 * size and not b.resident


def test_a_prefix_in_use_is_not_evicted_and_its_memory_counts_until_its_rows_finish(made, tmp_path):
    manifest, files = made
    store = MemoryStore()
    for name in ("p", "q", "r"):
        store.put(name, files["a"])
    a, b = nbytes(files["a"], manifest), nbytes(files["b"], manifest)
    assert a < b < 2 * a
    prefixes = registry(manifest, store, max_bytes=a + b, recheck_s=60)
    p = prefixes.get("p")
    prefixes.pin(p, rows=2)  # two rows of the running batch use it
    q = prefixes.get("q")
    prefixes.get("r")  # over the bound: q, the least recently used that is not in use, goes
    assert prefixes.cached("p") is p and prefixes.cached("q") is None and prefixes.bytes_held == 2 * a
    store.put("p", files["b"])  # replaced while in use ...
    assert prefixes.recheck()["updated"] == ["p"]
    new_p = prefixes.get("p")
    # ... the old version still counts, and r made room for the new one
    assert new_p is not p and not p.resident and prefixes.cached("r") is None
    assert prefixes.bytes_held == a + b
    prefixes.unpin(p)
    assert prefixes.bytes_held == a + b
    prefixes.unpin(p)  # its last row finished: only the new version is held
    assert prefixes.bytes_held == b and q.users == 0


def test_a_file_replaced_by_another_process_is_served_new_after_the_recheck_interval(made, tmp_path):
    manifest, files = made
    store = FolderStore(tmp_path, valid_name)
    store.put("u", files["a"])
    prefixes = registry(manifest, store, recheck_s=0.3)
    old = prefixes.get("u")
    other = FolderStore(tmp_path, valid_name)  # another process writing the same folder
    other.put("u", files["b"])
    assert prefixes.get("u") is old  # within the interval, memory answers
    time.sleep(0.35)
    new = prefixes.get("u")
    assert new is not old and new.prefix.prefix_len == load_prefix(files["b"]).prefix_len
    before = prefixes.stats.loads
    time.sleep(0.35)
    assert prefixes.get("u") is new and prefixes.stats.loads == before  # unchanged: not read again
    os.unlink(tmp_path / "u.npz")
    time.sleep(0.35)
    with pytest.raises(UnknownPrefix):
        prefixes.get("u")
    assert prefixes.cached("u") is None


def test_a_bad_file_names_its_prefix_and_is_not_read_again_until_it_changes(made, tmp_path):
    manifest, files = made
    store = FolderStore(tmp_path, valid_name)
    store.put("good", files["a"])
    (tmp_path / "bad.npz").write_bytes(files["a"][:200])
    prefixes = registry(manifest, store)
    for _ in range(2):
        with pytest.raises(PrefixFileError, match="prefix 'bad'"):
            prefixes.get("bad")
    assert prefixes.stats.loads == 0 and prefixes.get("good").prefix is not None
    store.put("bad", files["c"])  # mended
    assert prefixes.get("bad").prefix.prefix_len == load_prefix(files["c"]).prefix_len


def test_an_unreadable_store_keeps_serving_what_is_in_memory(made, tmp_path):
    manifest, files = made
    store = FolderStore(tmp_path / "s", valid_name)
    store.put("kept", files["a"])
    prefixes = registry(manifest, store, recheck_s=0.0)
    kept = prefixes.get("kept")
    os.rename(tmp_path / "s", tmp_path / "gone")
    assert prefixes.get("kept") is kept
    with pytest.raises(StoreUnavailable):
        prefixes.get("other")


def test_writes_racing_reads_of_one_name_end_consistent_with_the_last_write(made, tmp_path):
    """Uploads of two versions, deletes and reads of one name from many threads: every read
    gets one of the two versions whole, and afterwards memory agrees with the store."""
    manifest, files = made
    store = FolderStore(tmp_path, valid_name)
    prefixes = registry(manifest, store, recheck_s=0.0)
    lens = {load_prefix(files[n]).prefix_len for n in "ab"}
    stop = time.time() + 2.0
    seen, problems = [], []

    def act(i: int) -> None:
        while time.time() < stop:
            try:
                if i % 4 == 0:
                    prefixes.upload("x", files["ab"[i % 8 // 4]])
                elif i % 4 == 1:
                    prefixes.delete("x")
                else:
                    seen.append(prefixes.get("x").prefix.prefix_len)
            except UnknownPrefix:
                pass
            except Exception as e:  # noqa: BLE001 - any other error fails the test below
                problems.append(repr(e))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(act, range(12)))
    assert problems == [] and seen and set(seen) <= lens
    on_disk = store.read("x")
    if on_disk is None:
        with pytest.raises(UnknownPrefix):
            prefixes.get("x")
    else:
        assert prefixes.get("x").prefix.prefix_len == load_prefix(on_disk[0]).prefix_len


def test_per_prefix_metrics_name_the_busiest_and_count_everyone_else_as_other():
    from prefixkit.runtime.metrics import OTHER, PrefixCounts

    counts = PrefixCounts(labels=3, tracked=40)
    rng = np.random.default_rng(0)
    requests = {f"n{i}": int(n) for i, n in enumerate(1000 / np.arange(1, 201) ** 1.1)}  # Zipf-like
    order = [name for name, n in requests.items() for _ in range(n)]
    rng.shuffle(order)
    previous: dict[str, list[int]] = {}
    for i, name in enumerate(order):
        counts.count(name, requests=1, tokens=5)
        if i % 200 == 0:  # a scrape: every series only grows
            series = dict(counts.series())
            for label, values in previous.items():
                assert all(now >= before for now, before in zip(series[label], values)), label
            previous = series
    series = dict(counts.series())
    assert set(series) == {"n0", "n1", "n2", OTHER}  # the three busiest, then everyone else
    assert sum(v[0] for v in series.values()) == len(order)
    assert sum(v[1] for v in series.values()) == 5 * len(order)
    # A label counts from when it was earned; what came before stays in "other".
    assert all(series[n][0] <= requests[n] for n in ("n0", "n1", "n2"))
    assert series["n0"][0] > requests["n0"] / 2
