"""Load on pt-serve: N concurrent users with mixed prefixes for T seconds.

    pt-bench load --export exports/smollm2-135m --prefix-dir prefixes/ [--clients 16 --seconds 60]
    pt-bench load --url http://127.0.0.1:8000 --model alice --model bob      # a server already running

Each client sends greedy completions one after another (closed loop), each for its own prefix
(client i uses prefix i mod the number of prefixes) and an E2E table. Reported: throughput
(requests and generated tokens per second), latency p50/p95/p99, errors, and whether every
response equals the same request served alone afterwards. With --export the script starts the
server itself, and with --compare-unbatched runs the same load against `pt-serve --no-batching`.
With --make-prefixes N it first writes N prefixes (the backbone's own key/values over N
different phrases, the paper's real-word initialisation) into --prefix-dir.

With --long-prompt-tokens N, one of the clients instead sends a prompt of N tokens every
--long-every seconds (without waiting for the previous one), and the same load runs twice, with
and without those long prompts, to show how much a long prefill delays everyone else (the
short requests' p95). --compare-unchunked adds a run with chunked prefill off.
Writes benchmarks/results/load.json and load.md (or --output).
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from prefixkit.benchmarks import commit
from prefixkit.runtime.cli_options import Renamed

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PHRASES = [
    "table-to-text:", "Describe the restaurant.", "Write one sentence about this place:",
    "Summarise the table:", "Restaurant review:", "In plain English:", "A short description:",
    "From the data below:", "Tell a guest about it:", "Facts to text:", "One line, please:", "Describe:",
]


def e2e_inputs() -> list[str]:
    import csv

    from prefixkit.training.data import linearise_e2e

    with open(ROOT / "tests" / "data" / "e2e_sample.csv", newline="", encoding="utf-8") as f:
        tables = sorted({row["mr"] for row in csv.DictReader(f)})
    return [linearise_e2e(mr) for mr in tables]


def write_prefixes(export: Path, prefix_dir: Path, n: int) -> None:
    """n prefixes of the backbone's own key/values over different phrases (needs torch)."""
    from prefixkit.exporter.backbones import load_backbone
    from prefixkit.exporter.reference import kv_of_text
    from prefixkit.runtime import make_meta, save_prefix
    from prefixkit.runtime.manifest import load_manifest
    from prefixkit.runtime.prefix import Prefix

    manifest = load_manifest(export)
    backbone = load_backbone(manifest.source["path"])
    if backbone.fingerprint != manifest.fingerprint:
        raise click.ClickException(f"{export} was exported from another backbone than {manifest.source['path']}.")
    prefix_dir.mkdir(parents=True, exist_ok=True)
    for i, phrase in enumerate(PHRASES[:n]):
        ids = backbone.tokenizer(phrase, return_tensors="pt").input_ids
        key, value = kv_of_text(backbone.model, ids)
        meta = make_meta(manifest.fingerprint, key.shape[2], template="{input}\n", method="prefix",
                         init_text=phrase, note="real-word initialisation, untrained (benchmarks/load.py)")
        save_prefix(prefix_dir / f"user{i}.npz", Prefix(key, value, meta))


class Served:
    """pt-serve in a subprocess on a free loopback port; `ready_s` is how long it took to answer
    /health from the moment it was started."""

    def __init__(self, export: Path, prefix_dir: Path | None, extra: list[str], threads: int | None,
                 quiet: bool = False):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(Path(sys.executable).parent / "pt-serve"), "--export", str(export), "--port", str(self.port),
                   "--max-queue", "1024", *(["--prefix-dir", str(prefix_dir)] if prefix_dir else []), *extra]
        if threads:
            command += ["--threads", str(threads)]
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stderr=subprocess.DEVNULL if quiet else None)
        import httpx

        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise click.ClickException("pt-serve did not start (see above).")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    self.ready_s = time.perf_counter() - started
                    return
            except httpx.HTTPError:
                time.sleep(0.02)
        raise click.ClickException("pt-serve did not come up in 120 s.")

    def rss_mb(self) -> float:
        """The server's resident memory now, in MiB."""
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise click.ClickException("cannot read the server's memory (/proc is needed).")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)


def long_prompt(export: Path, tokens: int) -> str:
    """A prompt of about `tokens` tokens for the export's tokenizer: E2E tables, one after another."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(export / "tokenizer.json"))
    tables = " | ".join(e2e_inputs())
    text = tables
    while len(tokenizer.encode(text).ids) < tokens:
        text += " | " + tables
    return tokenizer.decode(tokenizer.encode(text).ids[:tokens])


async def run_load(url: str, models: list[str], inputs: list[str], clients: int, seconds: float,
                   max_tokens: int, key: str | None, long: tuple[str, float] | None = None) -> dict:
    """`clients` closed-loop clients; with `long` (a prompt, every how many seconds), the last
    client sends that prompt at that rate instead, each without waiting for the one before."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    records: list[dict] = []
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 64)

    async def long_client(http: httpx.AsyncClient):
        text, every = long
        tasks = []

        async def one(n: int):
            body = {"model": models[n % len(models)], "prompt": text, "max_tokens": 8, "temperature": 0}
            started = time.perf_counter()
            try:
                r = await http.post(url + "/v1/completions", json=body, headers=headers, timeout=600)
                status = r.status_code
            except httpx.HTTPError as e:
                status = f"{type(e).__name__}"
            records.append({"model": body["model"], "input": None, "long": True, "status": status,
                            "latency": time.perf_counter() - started, "text": None, "tokens": 0, "error": None})

        n = 0
        while time.perf_counter() < stop_at:
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            await asyncio.sleep(min(every, max(0.0, stop_at - time.perf_counter())))
        for task in tasks:  # still prefilling when the run ends: hang up (the server drops them)
            if not task.done():
                task.cancel()
                records.append({"model": None, "input": None, "long": True, "status": "unfinished",
                                "latency": None, "text": None, "tokens": 0, "error": None})
        await asyncio.gather(*tasks, return_exceptions=True)

    async def client(i: int, http: httpx.AsyncClient):
        n = 0
        while time.perf_counter() < stop_at:
            model, text = models[i % len(models)], inputs[(i * 7 + n) % len(inputs)]
            body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0}
            started = time.perf_counter()
            try:
                r = await http.post(url + "/v1/completions", json=body, headers=headers, timeout=600)
                ok = r.status_code == 200
                data = r.json()
                records.append({"model": model, "input": text, "latency": time.perf_counter() - started,
                                "status": r.status_code,
                                "text": data["choices"][0]["text"] if ok else None,
                                "tokens": data["usage"]["completion_tokens"] if ok else 0,
                                "error": None if ok else data.get("error", {}).get("message")})
            except (httpx.HTTPError, ValueError, KeyError) as e:
                records.append({"model": model, "input": text, "latency": time.perf_counter() - started,
                                "status": None, "text": None, "tokens": 0, "error": f"{type(e).__name__}: {e}"})
            n += 1

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits) as http:
        short = clients - 1 if long else clients
        await asyncio.gather(*(client(i, http) for i in range(short)), *([long_client(http)] if long else []))
    elapsed = time.perf_counter() - started
    return {"records": records, "elapsed": elapsed}


def solo_check(url: str, records: list[dict], max_tokens: int, key: str | None) -> dict:
    """Each distinct (prefix, input) of the load, sent alone to the idle server."""
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    alone: dict[tuple[str, str], str] = {}
    for model, text in sorted({(r["model"], r["input"]) for r in records if r["text"] is not None}):
        body = {"model": model, "prompt": text, "max_tokens": max_tokens, "temperature": 0}
        alone[model, text] = httpx.post(url + "/v1/completions", json=body, headers=headers,
                                        timeout=600).json()["choices"][0]["text"]
    compared = [r for r in records if r["text"] is not None]
    different = [r for r in compared if r["text"] != alone[r["model"], r["input"]]]
    return {"compared": len(compared), "distinct_requests": len(alone), "different": len(different),
            "examples_different": [{k: r[k] for k in ("model", "input", "text")} for r in different[:3]]}


def summarise(load: dict, label: str) -> dict:
    """Throughput and latency of the short requests; the long prompts' own count and latency."""
    records, elapsed = [r for r in load["records"] if not r.get("long")], load["elapsed"]
    longs = [r for r in load["records"] if r.get("long")]
    done = [r for r in records if r["status"] == 200]
    latencies = sorted(r["latency"] for r in done)

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(round(p / 100 * (len(latencies) - 1))))]

    return {
        "server": label,
        "seconds": round(elapsed, 1),
        "requests": len(done),
        "errors": len(records) - len(done),
        "requests_per_s": round(len(done) / elapsed, 3),
        "tokens_per_s": round(sum(r["tokens"] for r in done) / elapsed, 1),
        "latency_s": {"p50": pct(50), "p95": pct(95), "p99": pct(99),
                      "mean": statistics.fmean(latencies) if latencies else None},
        "error_examples": sorted({r["error"] for r in records if r["error"]})[:3],
        "long_prompts": {"sent": len(longs), "answered": sum(r["status"] == 200 for r in longs),
                         "latency_s": sorted(round(r["latency"], 1) for r in longs if r["status"] == 200)}
        if longs else None,
    }


@click.command()
@click.option("--url", default=None, help="A running server; otherwise --export starts one.")
@click.option("--export", "backbone", cls=Renamed, old=("--backbone",),
              type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Export folder to serve (the script starts pt-serve itself).")
@click.option("--prefix-dir", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--make-prefixes", type=int, default=0, help="First write this many prefixes into --prefix-dir.")
@click.option("--model", "models", multiple=True, help="Prefix names to use [default: all the server lists].")
@click.option("--clients", type=int, default=16, show_default=True)
@click.option("--seconds", type=float, default=60.0, show_default=True)
@click.option("--max-tokens", type=int, default=32, show_default=True)
@click.option("--key", default=None, help="API key, if the server has keys.")
@click.option("--threads", type=int, default=None, help="pt-serve's ONNX Runtime threads.")
@click.option("--compare-unbatched", is_flag=True, help="Also run the load against pt-serve --no-batching.")
@click.option("--long-prompt-tokens", type=int, default=0,
              help="One client sends a prompt this long every --long-every seconds; the load runs with and without.")
@click.option("--long-every", type=float, default=10.0, show_default=True)
@click.option("--compare-unchunked", is_flag=True, help="With --long-prompt-tokens: also a run without chunked prefill.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=RESULTS / "load.json", show_default=True)
def main(url, backbone, prefix_dir, make_prefixes, models, clients, seconds, max_tokens, key, threads,
         compare_unbatched, long_prompt_tokens, long_every, compare_unchunked, output):
    """Throughput, latency and solo-equality of pt-serve under concurrent mixed-prefix load."""
    import httpx

    if url is None and (backbone is None or prefix_dir is None):
        raise click.UsageError("give --url, or --export with --prefix-dir.")
    if make_prefixes:
        if backbone is None or prefix_dir is None:
            raise click.UsageError("--make-prefixes needs --export and --prefix-dir.")
        write_prefixes(backbone, prefix_dir, make_prefixes)
    inputs = e2e_inputs()
    runs = []
    servers = [("batched", [], None)] + ([("unbatched", ["--no-batching"], None)] if compare_unbatched else [])
    if long_prompt_tokens:
        if backbone is None:
            raise click.UsageError("--long-prompt-tokens needs --export (for its tokenizer).")
        long = (long_prompt(backbone, long_prompt_tokens), long_every)
        servers = [("short only", [], None), ("with long prompts", [], long)]
        if compare_unchunked:
            servers.append(("with long prompts, unchunked", ["--prefill-chunk", str(long_prompt_tokens + 64)], long))
    for label, extra, long in servers if url is None else [("given", [], None)]:
        server = Served(backbone, prefix_dir, extra, threads) if url is None else None
        target = url or server.url
        try:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            cards = httpx.get(target + "/v1/models", headers=headers).json()["data"]
            use = list(models) or sorted(c["id"] for c in cards if c.get("parent"))
            if not use:
                raise click.ClickException(f"{target} serves no prefixes; give --prefix-dir or --model.")
            click.echo(f"{label}: {clients} clients on {len(use)} prefixes for {seconds:.0f} s …", err=True)
            load = asyncio.run(run_load(target, use, inputs, clients, seconds, max_tokens, key, long))
            result = summarise(load, label)
            result["prefixes"] = len(use)
            result["solo"] = solo_check(target, load["records"], max_tokens, key)
            runs.append(result)
            click.echo(json.dumps({k: v for k, v in result.items() if k != "solo"}), err=True)
            click.echo(f"  identical to solo: {result['solo']['compared'] - result['solo']['different']}"
                       f"/{result['solo']['compared']}", err=True)
        finally:
            if server is not None:
                server.stop()
    report = {
        "settings": {"clients": clients, "seconds": seconds, "max_tokens": max_tokens, "greedy": True,
                     "backbone": str(backbone) if backbone else None, "threads": threads,
                     "long_prompt_tokens": long_prompt_tokens or None, "long_every": long_every},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "pt-bench load " + " ".join(sys.argv[2 if sys.argv[1:2] == ["load"] else 1:]),
        "commit": commit(), "date": time.strftime("%Y-%m-%d"),
        "runs": runs,
    }
    if len(runs) == 2 and runs[1]["tokens_per_s"]:
        report["batched_over_unbatched"] = {
            "tokens_per_s": round(runs[0]["tokens_per_s"] / runs[1]["tokens_per_s"], 2),
            "requests_per_s": round(runs[0]["requests_per_s"] / runs[1]["requests_per_s"], 2),
        }
        click.echo(f"batched / unbatched throughput: {report['batched_over_unbatched']}", err=True)
    if long_prompt_tokens and runs[0]["latency_s"]["p95"]:
        report["p95_with_long_over_without"] = {r["server"]: round(r["latency_s"]["p95"] / runs[0]["latency_s"]["p95"], 2)
                                                for r in runs[1:] if r["latency_s"]["p95"]}
        click.echo(f"short requests' p95, with long prompts / without: {report['p95_with_long_over_without']}", err=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    output.with_suffix(".md").write_text(markdown(report))
    click.echo(f"wrote {output} and {output.with_suffix('.md')}", err=True)


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        f"# pt-serve under load: {s['clients']} clients, greedy, {s['max_tokens']} tokens, {s['seconds']:.0f} s",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs. Backbone: {s['backbone']}.",
        "",
        f"Command: `{report.get('command', '')}`" + (f", at {report['commit']} on {report['date']}."
                                                     if report.get("commit") else ""),
        "",
        "| server | prefixes | requests | errors | req/s | tokens/s | p50 s | p95 s | p99 s | identical to solo |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        lat = r["latency_s"]
        fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
        solo = r["solo"]
        lines.append(f"| {r['server']} | {r['prefixes']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} "
                     f"| {r['tokens_per_s']:.1f} | {fmt(lat['p50'])} | {fmt(lat['p95'])} | {fmt(lat['p99'])} "
                     f"| {solo['compared'] - solo['different']}/{solo['compared']} |")
    if "batched_over_unbatched" in report:
        ratio = report["batched_over_unbatched"]
        lines += ["", f"Batched over unbatched: {ratio['tokens_per_s']}x tokens/s, {ratio['requests_per_s']}x requests/s."]
    if "p95_with_long_over_without" in report:
        lines += ["", f"Short requests only in the columns above. One of the {s['clients']} clients sends a "
                      f"{s['long_prompt_tokens']}-token prompt (8 new tokens) every {s['long_every']:g} s in the "
                      "runs with long prompts.", "",
                  "| run | short p95 / short only | long prompts sent | answered in the run | their latencies, s |",
                  "|---|---|---|---|---|"]
        for r in report["runs"][1:]:
            lp = r["long_prompts"] or {}
            lines.append(f"| {r['server']} | {report['p95_with_long_over_without'].get(r['server'], '–')}x "
                         f"| {lp.get('sent', 0)} | {lp.get('answered', 0)} | {', '.join(map(str, lp.get('latency_s', [])))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
