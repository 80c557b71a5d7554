"""pt-serve over a prefix store, against a real server: /v1/models a page at a time, the
per-prefix and cache metrics, and a store that cannot be read."""

from __future__ import annotations

import os

import httpx
import pytest

from serving import Server, complete, write_prefix

NAMES = ["ann", "ben", "cat", "dan", "eve", "fay", "gus"]


@pytest.fixture(scope="module")
def store_server(tiny_export, tmp_path_factory):
    tiny, backbone = tiny_export
    store = tmp_path_factory.mktemp("store-serving") / "store"
    store.mkdir()
    for name in NAMES:
        write_prefix(backbone, f"The words of {name}", store / f"{name}.npz")
    server = Server(tiny, "--prefix-dir", str(store), "--prefix-recheck", "0", "--metrics-prefixes", "2")
    server.store = store
    yield server
    server.stop()


def ask(server, name: str) -> httpx.Response:
    return complete(server.url, model=name, prompt="x", max_tokens=3, temperature=0)


def test_models_are_listed_a_page_at_a_time(store_server):
    url, pages, after = store_server.url, [], None
    while True:
        page = httpx.get(url + "/v1/models", params={"limit": 3, **({"after": after} if after else {})}).json()
        pages.append([m["id"] for m in page["data"]])
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages[0][0] == "tiny"  # the backbone itself comes first; prefixes name it as their parent
    cards = httpx.get(url + "/v1/models").json()["data"]
    assert [c.get("parent") for c in cards] == [None] + ["tiny"] * len(NAMES)
    assert sum(pages, []) == ["tiny", *NAMES] and all(len(p) <= 4 for p in pages) and len(pages) == 3
    assert httpx.get(url + "/v1/models", params={"limit": 0}).status_code == 400


def test_metrics_count_requests_tokens_and_cold_loads_per_prefix_with_a_cap(store_server):
    def metric(name: str) -> dict[str, float]:
        found = {}
        for line in httpx.get(store_server.url + "/metrics").text.splitlines():
            if line.startswith(name + "{"):
                found[line.split('"')[1]] = float(line.rsplit(" ", 1)[1])
        return found

    for name, times in (("fay", 4), ("gus", 3), ("eve", 1)):
        for _ in range(times):
            assert ask(store_server, name).status_code == 200
    httpx.get(store_server.url + "/metrics")  # the scrape that gives the busiest their labels
    assert ask(store_server, "fay").status_code == 200 and ask(store_server, "gus").status_code == 200
    requests = metric("prefixkit_prefix_requests_total")
    assert set(requests) <= {"fay", "gus", "other"} and requests["fay"] == 1 and requests["gus"] == 1
    assert sum(requests.values()) >= 10
    assert metric("prefixkit_prefix_cold_loads_total").get("other", 0) >= 3
    assert sum(metric("prefixkit_prefix_tokens_total").values()) >= 30
    text = httpx.get(store_server.url + "/metrics").text
    value = lambda name: float(text.split(f"\n{name} ")[1].split()[0])  # noqa: E731
    # three names read from the store once each; every later request answered from memory
    assert value("prefixkit_prefix_cache_misses_total") == 3 and value("prefixkit_prefix_cache_hits_total") == 7
    assert value("prefixkit_prefix_cache_bytes") > 0 and value("prefixkit_prefix_cache_evictions_total") == 0


def test_an_unreadable_store_is_a_503_and_prefixes_in_memory_go_on(store_server):
    assert ask(store_server, "ann").status_code == 200
    moved = store_server.store.with_name("moved")
    os.rename(store_server.store, moved)
    try:
        assert ask(store_server, "ann").status_code == 200  # in memory
        answer = ask(store_server, "ben")
        assert answer.status_code == 503 and "cannot be read" in answer.json()["error"]["message"]
        assert "Traceback" not in answer.text and "\n" not in answer.json()["error"]["message"]
        assert httpx.get(store_server.url + "/v1/models").status_code == 503
        assert ask(store_server, "tiny").status_code == 200
    finally:
        os.rename(moved, store_server.store)
    assert ask(store_server, "ben").status_code == 200
