"""One server for many users' prefixes: pt-serve over a store of N synthetic prefixes.

    pt-bench prefixes --export exports/smollm2-135m-int4 [--prefixes 100000 --cache-mb 256]

The store holds N names, hard links to a few distinct files of random keys and values of the
export's shape (N distinct files of 460 KB would need 46 GB of disk; what pt-serve holds in
memory is one copy per name all the same). Measured, each against a fresh server:

- start: seconds from launch to the first /health answer, with the store and with no prefixes;
- memory: RSS of the server with no prefixes after the same client load, then of the store's
  server after requests to more distinct prefixes than --cache-mb holds;
- cold load: a request for a prefix not yet in memory, then the same request again (hot);
  the latency of each, p50 and p99, and the difference;
- throughput: --clients closed-loop clients over --zipf-names names drawn from the store, each
  request's name drawn Zipf(--zipf-s) from them, against a server holding those same names as
  --prefix files (loaded at start, as the eager registry did); both servers run side by side
  and take turns, --rounds times, since this machine's speed drifts within minutes;
- churn: --churn-threads threads uploading two versions of, deleting and requesting a few names
  for --churn-seconds: every answer must be one of the two versions' own answer, none a 5xx,
  and the server must agree with the store afterwards.

Writes benchmarks/results/prefixes.json and prefixes.md (or --output).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

import click
import numpy as np

from . import commit
from .load import RESULTS, Served, e2e_inputs

PROMPT = "name : Aromi | Type : pub | food : Italian | area : city centre"


def build_store(export: Path, store: Path, n: int, distinct: int, prefix_len: int) -> list[str]:
    """N names in `store` (reused when it already holds them), hard links to `distinct` files."""
    from prefixkit.runtime import make_meta, save_prefix
    from prefixkit.runtime.manifest import load_manifest
    from prefixkit.runtime.prefix import Prefix

    names = [f"user{i:06d}" for i in range(n)]
    marker = store / ".built"
    wanted = f"{n} {distinct} {prefix_len} {load_manifest(export).fingerprint}"
    if marker.exists() and marker.read_text() == wanted:
        return names
    shutil.rmtree(store, ignore_errors=True)
    (store / ".sources").mkdir(parents=True)
    manifest = load_manifest(export)
    arch = manifest.architecture
    rng = np.random.default_rng(0)
    sources = []
    for j in range(distinct):
        shape = (arch.n_layers, arch.n_kv_heads, prefix_len, arch.head_dim)
        key, value = (rng.normal(0, 1, shape).astype(np.float32) for _ in range(2))
        meta = make_meta(manifest.fingerprint, prefix_len, template="{input}\n", method="synthetic",
                         note="random keys and values (benchmarks/prefixes.py)")
        sources.append(save_prefix(store / ".sources" / f"s{j}.npz", Prefix(key, value, meta)))
    started = time.perf_counter()
    for i, name in enumerate(names):
        os.link(sources[i % distinct], store / f"{name}.npz")
        if i and i % 20_000 == 0:
            click.echo(f"  {i} names linked …", err=True)
    marker.write_text(wanted)
    click.echo(f"store of {n} names built in {time.perf_counter() - started:.1f} s", err=True)
    return names


def _post(url: str, model: str, max_tokens: int, prompt: str = PROMPT) -> tuple[int, float, dict]:
    import httpx

    started = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                 "temperature": 0}, timeout=600)
    return r.status_code, time.perf_counter() - started, r.json()


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def cold_and_hot(url: str, names: list[str], max_tokens: int) -> dict:
    """Each name once cold (its first request) and once hot (the same request again)."""
    cold, hot = [], []
    for name in names:
        for into in (cold, hot):
            status, seconds, _ = _post(url, name, max_tokens)
            if status != 200:
                raise click.ClickException(f"{name}: the server answered {status}.")
            into.append(seconds)
    diffs = [c - h for c, h in zip(cold, hot)]
    ms = lambda v: round(v * 1000, 2)  # noqa: E731
    return {"requests": len(names), "max_tokens": max_tokens,
            "cold_ms": {"p50": ms(_pct(cold, 50)), "p99": ms(_pct(cold, 99))},
            "hot_ms": {"p50": ms(_pct(hot, 50)), "p99": ms(_pct(hot, 99))},
            "cold_minus_hot_ms": {"p50": ms(_pct(diffs, 50)), "p99": ms(_pct(diffs, 99)),
                                  "p50_of_cold_minus_p50_of_hot": ms(_pct(cold, 50) - _pct(hot, 50))}}


def fill(url: str, names: list[str], max_tokens: int = 1, workers: int = 4) -> int:
    """Request each name once (a few at a time); the number answered 200."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return sum(s == 200 for s, _, _ in pool.map(lambda n: _post(url, n, max_tokens), names))


async def zipf_load(url: str, names: list[str], s: float, clients: int, seconds: float, max_tokens: int,
                    seed: int = 0) -> dict:
    import httpx

    weights = np.arange(1, len(names) + 1, dtype=np.float64) ** -s
    weights /= weights.sum()
    rng = np.random.default_rng(seed)
    inputs = e2e_inputs()
    tokens, done, errors, latencies = 0, 0, 0, []
    stop_at = time.perf_counter() + seconds

    async def client(i: int, http: httpx.AsyncClient):
        nonlocal tokens, done, errors
        n = 0
        while time.perf_counter() < stop_at:
            model = names[rng.choice(len(names), p=weights)]
            body = {"model": model, "prompt": inputs[(i * 7 + n) % len(inputs)], "max_tokens": max_tokens,
                    "temperature": 0}
            started = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body, timeout=600)
            if r.status_code == 200:
                done += 1
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1
            n += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8)) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    elapsed = time.perf_counter() - started
    return {"seconds": round(elapsed, 1), "requests": done, "errors": errors,
            "tokens_per_s": round(tokens / elapsed, 1),
            "latency_s": {"p50": round(_pct(latencies, 50), 3), "p99": round(_pct(latencies, 99), 3)}
            if latencies else None}


def churn(url: str, store: Path, versions: dict[str, bytes], names: list[str], threads: int,
          seconds: float) -> dict:
    """Threads upload one of two versions of, delete and request a few names. Every 200 answer must
    equal what one of the two versions answers alone; afterwards the server must agree with the store."""
    import httpx

    expected = {}
    for label, data in versions.items():  # each version's own answer, served alone
        assert httpx.post(url + "/v1/prefixes", params={"name": "probe"}, content=data).status_code == 200
        expected[label] = _post(url, "probe", 8)[2]["choices"][0]["text"]
    httpx.delete(url + "/v1/prefixes/probe")
    if len(set(expected.values())) != len(expected):
        raise click.ClickException("the two versions answer alike; the churn could not tell them apart.")
    statuses: dict[str, int] = {}
    wrong = []
    stop_at = time.perf_counter() + seconds

    def act(i: int) -> None:
        rng = random.Random(i)
        with httpx.Client(timeout=600) as http:
            while time.perf_counter() < stop_at:
                name, what = rng.choice(names), rng.random()
                if what < 0.25:
                    label = rng.choice(sorted(versions))
                    r = http.post(url + "/v1/prefixes", params={"name": name}, content=versions[label])
                elif what < 0.35:
                    r = http.delete(url + f"/v1/prefixes/{name}")
                else:
                    r = http.post(url + "/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 8,
                                                                "temperature": 0})
                    if r.status_code == 200 and r.json()["choices"][0]["text"] not in expected.values():
                        wrong.append(name)
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        list(pool.map(act, range(threads)))
    disagree = []
    by_bytes = {data: label for label, data in versions.items()}
    for name in names:
        path = store / f"{name}.npz"
        status, _, body = _post(url, name, 8)
        if not path.exists():
            disagree += [name] if status != 404 else []
        elif status != 200 or body["choices"][0]["text"] != expected[by_bytes[path.read_bytes()]]:
            disagree.append(name)
    return {"threads": threads, "seconds": seconds, "names": len(names), "statuses": statuses,
            "wrong_answers": len(wrong), "server_errors": sum(v for k, v in statuses.items() if k.startswith("5")),
            "names_where_server_and_store_disagree": disagree}


@click.command()
@click.option("--export", "export", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Export folder to serve.")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to build the store [default: the system's temporary folder]; reused if built already.")
@click.option("--prefixes", "count", type=click.IntRange(1), default=100_000, show_default=True)
@click.option("--distinct", type=click.IntRange(1), default=8, show_default=True, help="Distinct files behind the names.")
@click.option("--prefix-len", type=click.IntRange(1), default=10, show_default=True)
@click.option("--cache-mb", type=click.IntRange(1), default=256, show_default=True)
@click.option("--fill-names", type=click.IntRange(0), default=2000, show_default=True,
              help="Distinct prefixes requested before memory is read (more than --cache-mb holds).")
@click.option("--cold-names", type=click.IntRange(1), default=200, show_default=True)
@click.option("--zipf-names", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--zipf-s", type=float, default=1.1, show_default=True)
@click.option("--clients", type=click.IntRange(1), default=16, show_default=True)
@click.option("--seconds", type=float, default=120.0, show_default=True,
              help="Throughput: each server's load, in --rounds turns.")
@click.option("--rounds", type=click.IntRange(1), default=6, show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=16, show_default=True)
@click.option("--churn-threads", type=click.IntRange(0), default=20, show_default=True)
@click.option("--churn-seconds", type=float, default=30.0, show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=RESULTS / "prefixes.json", show_default=True)
def main(export, store, count, distinct, prefix_len, cache_mb, fill_names, cold_names, zipf_names, zipf_s, clients,
         seconds, rounds, max_tokens, churn_threads, churn_seconds, output):
    """Start time, memory, cold loads, throughput and consistency of pt-serve over a prefix store."""
    import tempfile

    store = store or Path(tempfile.gettempdir()) / f"prefixkit-store-{count}"
    names = build_store(export, store, count, distinct, prefix_len)
    rng = random.Random(1)
    sample = rng.sample(names, fill_names + cold_names + zipf_names)
    filling, cold, zipf = sample[:fill_names], sample[fill_names:fill_names + cold_names], sample[-zipf_names:]
    report: dict = {"settings": {"export": str(export), "prefixes": count, "distinct_files": distinct,
                                 "prefix_len": prefix_len, "cache_mb": cache_mb, "clients": clients,
                                 "seconds": seconds, "rounds": rounds, "max_tokens": max_tokens, "zipf_names": zipf_names,
                                 "zipf_s": zipf_s},
                    "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version()},
                    "command": "pt-bench prefixes " + " ".join(sys.argv[2 if sys.argv[1:2] == ["prefixes"] else 1:]),
                    "commit": commit(), "date": time.strftime("%Y-%m-%d")}
    cache = ["--prefix-cache-mb", str(cache_mb)]

    base = export.resolve().name
    click.echo("a server with no prefixes …", err=True)
    bare = Served(export, None, [], None, quiet=True)
    try:
        fill(bare.url, [base] * 8)
        report["bare"] = {"ready_s": round(bare.ready_s, 2), "rss_mb_idle": round(bare.rss_mb(), 1)}
        # the same load as the Zipf runs, on the backbone alone: the memory a busy server needs anyway
        loaded = asyncio.run(zipf_load(bare.url, [base], zipf_s, clients, min(seconds, 20.0), max_tokens))
        report["bare"].update(rss_mb=round(bare.rss_mb(), 1), tokens_per_s=loaded["tokens_per_s"])
    finally:
        bare.stop()
    bound = report["bare"]["rss_mb"] + cache_mb + 100
    report["memory_bound_mb"] = round(bound, 1)

    click.echo(f"a server on the store of {count} …", err=True)
    served = Served(export, store, cache, None, quiet=True)
    eager = None
    try:
        report["store"] = {"ready_s": round(served.ready_s, 2), "rss_mb_at_start": round(served.rss_mb(), 1)}
        fill(served.url, [base] * 8)
        click.echo(f"  requesting {len(filling)} distinct prefixes …", err=True)
        answered = fill(served.url, filling)
        report["store"].update(filled=answered, rss_mb_after_fill=round(served.rss_mb(), 1))
        click.echo(f"  {len(cold)} cold, then hot …", err=True)
        report["cold_load"] = cold_and_hot(served.url, cold, max_tokens)
        report["store"]["rss_mb_after_cold"] = round(served.rss_mb(), 1)

        click.echo(f"a server with the same {zipf_names} prefixes loaded at start …", err=True)
        eager = Served(export, None, [f"--prefix={n}={store / n}.npz" for n in zipf], None, quiet=True)
        report["eager"] = {"ready_s": round(eager.ready_s, 2)}
        # The machine's speed drifts by 10-20% within minutes: the two servers take turns, in
        # rounds, and the ratio is of the totals.
        runs: dict[str, list[dict]] = {"store": [], "eager": []}
        for i in range(rounds):
            for label in (("store", "eager") if i % 2 == 0 else ("eager", "store")):
                url = served.url if label == "store" else eager.url
                click.echo(f"  round {i + 1}/{rounds}: {label}, {clients} clients, {seconds / rounds:.0f} s …", err=True)
                runs[label].append(asyncio.run(zipf_load(url, zipf, zipf_s, clients, seconds / rounds, max_tokens,
                                                         seed=i)))
        for label, server in (("store", served), ("eager", eager)):
            rounds_ = runs[label]
            report[f"zipf_{label}"] = {
                "rounds_tokens_per_s": [r["tokens_per_s"] for r in rounds_],
                "tokens_per_s": round(sum(r["tokens_per_s"] * r["seconds"] for r in rounds_)
                                      / sum(r["seconds"] for r in rounds_), 1),
                "requests": sum(r["requests"] for r in rounds_), "errors": sum(r["errors"] for r in rounds_),
                "rss_mb": round(server.rss_mb(), 1)}
        report["zipf_store"]["metrics"] = _cache_metrics(served.url)
    finally:
        served.stop()
        if eager is not None:
            eager.stop()
    report["zipf_store_over_eager"] = round(report["zipf_store"]["tokens_per_s"] / report["zipf_eager"]["tokens_per_s"], 3)

    if churn_threads:
        click.echo(f"churn: {churn_threads} threads for {churn_seconds:.0f} s …", err=True)
        scratch = Path(tempfile.mkdtemp(prefix="prefixkit-churn-"))
        sources = sorted((store / ".sources").glob("*.npz"))[:2]
        served = Served(export, scratch, ["--prefix-recheck", "0.2"], None, quiet=True)
        try:
            report["churn"] = churn(served.url, scratch, {"v1": sources[0].read_bytes(), "v2": sources[1].read_bytes()},
                                    ["shared0", "shared1", "shared2"], churn_threads, churn_seconds)
        finally:
            served.stop()
            shutil.rmtree(scratch, ignore_errors=True)

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    output.with_suffix(".md").write_text(markdown(report))
    click.echo(markdown(report), err=True)
    click.echo(f"wrote {output} and {output.with_suffix('.md')}", err=True)


def _cache_metrics(url: str) -> dict:
    import httpx

    wanted = ("prefixkit_prefix_cache_hits_total", "prefixkit_prefix_cache_misses_total",
              "prefixkit_prefix_cache_evictions_total", "prefixkit_prefix_cache_bytes")
    found = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            found[name.removeprefix("prefixkit_prefix_cache_")] = float(value)
    return found


def markdown(report: dict) -> str:
    s, bare, st, cold = report["settings"], report["bare"], report["store"], report["cold_load"]
    zs, ze = report["zipf_store"], report["zipf_eager"]
    zipf = f"Zipf({s['zipf_s']}) over {s['zipf_names']} names, {s['clients']} clients, {s['rounds']} rounds"
    lines = [
        f"# pt-serve over a store of {s['prefixes']:,} prefixes ({s['prefix_len']} positions), "
        f"--prefix-cache-mb {s['cache_mb']}",
        "",
        f"`{report['command']}` (commit {report['commit']}, {report['date']}, {report['machine']['cpus']} CPUs, "
        f"{report['machine']['platform']})",
        "",
        "| what | measured |",
        "|---|---|",
        f"| ready after start, no prefixes | {bare['ready_s']} s |",
        f"| ready after start, store of {s['prefixes']:,} | {st['ready_s']} s |",
        f"| ready after start, {s['zipf_names']} `--prefix` files | {report['eager']['ready_s']} s |",
        f"| RSS, no prefixes: idle / after {s['clients']} clients' load | {bare['rss_mb_idle']} / {bare['rss_mb']} MB |",
        f"| RSS of the store's server: after {st['filled']} distinct prefixes / after the cold run / "
        f"after the Zipf runs | {st['rss_mb_after_fill']} / {st['rss_mb_after_cold']} / {zs['rss_mb']} MB "
        f"(bound: {report['memory_bound_mb']} MB) |",
        f"| request ({cold['max_tokens']} tokens), cold prefix: p50 / p99 | {cold['cold_ms']['p50']} / "
        f"{cold['cold_ms']['p99']} ms |",
        f"| same request, hot: p50 / p99 | {cold['hot_ms']['p50']} / {cold['hot_ms']['p99']} ms |",
        f"| cold minus hot, per name: p50 / p99 | {cold['cold_minus_hot_ms']['p50']} / "
        f"{cold['cold_minus_hot_ms']['p99']} ms |",
        f"| {zipf}: store | {zs['tokens_per_s']} tokens/s (rounds {zs['rounds_tokens_per_s']}; {zs['requests']} "
        f"requests, {zs['errors']} errors) |",
        f"| same, all {s['zipf_names']} loaded at start | {ze['tokens_per_s']} tokens/s (rounds "
        f"{ze['rounds_tokens_per_s']}; {ze['requests']} requests, {ze['errors']} errors; RSS {ze['rss_mb']} MB) |",
        f"| store / preloaded | {report['zipf_store_over_eager']} |",
        f"| the store's cache at the end | {zs['metrics']} |",
    ]
    if "churn" in report:
        c = report["churn"]
        lines.append(f"| churn: {c['threads']} threads, {c['seconds']:.0f} s on {c['names']} names | statuses "
                     f"{c['statuses']}, wrong answers {c['wrong_answers']}, 5xx {c['server_errors']}, "
                     f"server and store disagree on {c['names_where_server_and_store_disagree'] or 'none'} |")
    return "\n".join(lines) + "\n"
