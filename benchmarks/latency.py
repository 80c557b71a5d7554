"""Latency and throughput of the runtime against Hugging Face generate and PEFT, side by side.

    .venv/bin/pip install -c constraints.txt peft matplotlib     # the baselines and the chart
    .venv/bin/python benchmarks/latency.py [--repeats 5] [--threads 2]

For one prefix of 10 positions and an E2E table of 29 tokens with its template (timed runs;
16 E2E tables of 21 to 42 tokens for batch 16 and the output comparison), each
configuration runs in its own process (so start-up time and peak memory are its own):
  runtime-fp32/int8/int4   prefixkit's runtime on the fused export at each precision
  runtime-int4-a16/-a8     the same int4 weights, activations rounded to 16 / 8-bit integers
                           in prefixkit's CPU kernel (pt-export --quantize int4-a16 / int4-a8)
  runtime-fp32-optimum     the runtime on optimum-onnx's fp32 graph
  runtime-fp16             the fused fp16 export (pt-export --dtype fp16): on CUDA its attention,
                           cache and token choice run on the GPU (runtime/device.py)
  runtime-fp16-graphs      the same, decode steps replayed as captured CUDA graphs
  hf-generate              transformers generate, PyTorch fp32, the prefix as past key values
                           (expanded per beam by hand: generate does not expand a passed cache)
  hf-static-compile        the same with a static cache and the forward compiled by torch.compile
                           (mode reduce-overhead: CUDA graphs), the strongest PyTorch baseline;
                           compilation happens in the untimed warm-up
  peft-generate            PEFT prefix-tuning generate, its prefix set to the same key/values
Measured: 5 beams at batch 1, 30 new tokens end to end (median and p95); greedy decode per
token at batch 1; greedy throughput at batch 16 (and 64 with --device cuda) with two prefixes
mixed (runtime only); start-up
and peak memory; and how often the quantised exports' greedy outputs equal fp32's on 16 E2E
inputs.
Every run is forced to 30 new tokens (min_new_tokens) so all do the same work.
Start-up is the worker's time from its start to a loaded model (imports included). It depends on
whether the weights are in the page cache, which a virtual machine may reclaim within minutes
(this project's reference VM drops cached file pages at about 10 MB/s with 20 GB free): by
default (--page-cache warm) each configuration's weight files are read just before its worker
starts, so every start-up is measured warm; --page-cache as-is leaves the cache alone. Either way
the report gives the share of the weights that was cached when the worker started.
With --rounds N (default 3) every configuration runs N times, the configurations taking turns
(round r starts at the r-th), and each one's timings of all rounds are pooled: this machine's
speed drifts by 10-20% within minutes, and taking turns spreads that drift over all of them.
Writes benchmarks/results/latency.json, latency.md and latency.png, after each configuration.

With --device cuda the runtime runs on ONNX Runtime's CUDA provider (prefixkit[gpu]) and the
baselines in PyTorch on the GPU (the fused graph's float32 attention runs on the CPU with its
cache in host memory; the optimum graph keeps attention and cache on the GPU); the reports are then
latency-cuda.{json,md,png}. Peak memory is the host's in both cases.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from prefixkit.benchmarks import commit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ["runtime-fp32", "runtime-int8", "runtime-int4", "runtime-int4-a16", "runtime-int4-a8", "runtime-fp32-optimum",
           "runtime-fp16", "runtime-fp16-graphs", "hf-generate", "hf-static-compile", "peft-generate"]
# The runtime's exports: (quantisation, graph, dtype). The fused graph's float32 attention runs
# on the CPU under CUDA; its fp16 export runs all of it on the GPU.
EXPORTS = {"runtime-fp32": (None, "auto", "fp32"), "runtime-int8": ("int8", "auto", "fp32"),
           "runtime-int4": ("int4", "auto", "fp32"), "runtime-int4-a16": ("int4-a16", "auto", "fp32"),
           "runtime-int4-a8": ("int4-a8", "auto", "fp32"), "runtime-fp32-optimum": (None, "optimum", "fp32"),
           "runtime-fp16": (None, "auto", "fp16"), "runtime-fp16-graphs": (None, "auto", "fp16")}
DEFAULT_CONFIGS = {"cpu": ["runtime-fp32", "runtime-int8", "runtime-int4", "runtime-int4-a16", "runtime-int4-a8",
                           "hf-generate", "peft-generate"],
                   "cuda": ["runtime-fp32", "runtime-fp16", "runtime-fp16-graphs", "hf-generate", "hf-static-compile"]}
BASELINES = ("hf-generate", "hf-static-compile", "peft-generate")
# ONNX Runtime providers for the runtime configurations, per --device.
PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
NEW_TOKENS = 30
TEMPLATE = "Table: {input}\nText:"
# The timed prefix is the backbone's own key/values of the first 10 tokens of this text.
PREFIX_TEXT = "table-to-text: restaurant descriptions"
# A table of the E2E dev set (../shared/data/e2e/devset.csv), 29 tokens with TEMPLATE: the
# input length the runtime-speed targets are stated for.
TIMED_TABLE = "name[The Wrestlers], customer rating[average], familyFriendly[no], near[The Sorrento]"


def e2e_tables(n: int) -> list[str]:
    with open(ROOT / "tests" / "data" / "e2e_sample.csv", newline="", encoding="utf-8") as f:
        return sorted({row["mr"] for row in csv.DictReader(f)})[:n]


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_s": statistics.median(ordered), "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "runs": len(ordered)}


def cached_share(paths: list[str]) -> float | None:
    """The share of these files' bytes in the page cache (mincore over a read-only mapping);
    None where that cannot be asked (not Linux, no libc)."""
    import ctypes
    import ctypes.util
    import mmap

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    page, cached, total = mmap.PAGESIZE, 0, 0
    for path in paths:
        size = os.path.getsize(path)
        if size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
            view = np.frombuffer(mapped, np.uint8)
            pages = np.zeros((size + page - 1) // page, np.uint8)
            failed = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size),
                                  ctypes.c_void_p(pages.ctypes.data))
            del view  # the mapping closes only once no array holds it
            if failed:
                return None
            cached, total = cached + int((pages & 1).sum()), total + len(pages)
    return cached / total if total else None


def weight_files(config: str, setup: dict) -> list[str]:
    """The files a configuration loads its weights from: the export's graph and weights files, or
    the backbone's safetensors for the PyTorch baselines."""
    folder = Path(setup["exports"][config] if config.startswith("runtime") else setup["backbone_folder"])
    pattern = "*.onnx*" if config.startswith("runtime") else "*.safetensors"
    return sorted(str(p) for p in folder.glob(pattern) if p.is_file())


def warm_page_cache(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


# ---------------------------------------------------------------- one configuration, in its own process


def worker(config: str, setup: dict) -> dict:
    weights_cached = cached_share(weight_files(config, setup))  # before the clock: not part of start-up
    started = time.perf_counter()
    tables = setup["tables"]
    if config.startswith("runtime"):
        result = _runtime(config, setup, tables, started)
    else:
        result = _torch(config, setup, tables, started)
    result["peak_rss_mb"] = peak_rss_mb()
    result["weights_cached"] = weights_cached
    return result


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space exec made;
    ru_maxrss would carry over the parent's peak through exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _runtime(config: str, setup: dict, tables: list[str], started: float) -> dict:
    from prefixkit.runtime import ExportedBackbone, GenerationSettings, Generator

    generator = Generator(ExportedBackbone(setup["exports"][config], providers=PROVIDERS[setup["device"]],
                                           threads=setup["threads"], cuda_graphs=config.endswith("-graphs")))
    generator.add_prefix("a", setup["prefix_a"])
    generator.add_prefix("b", setup["prefix_b"])
    startup = time.perf_counter() - started
    forced = GenerationSettings(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    one = [("a", setup["timed"])]
    beams = timed(lambda: generator.complete(one, forced, num_beams=5, length_penalty=0.8), setup["repeats"])
    first = timed(lambda: generator.complete(one, forced, max_new_tokens=1, min_new_tokens=1), setup["repeats"])
    greedy = timed(lambda: generator.complete(one, forced), setup["repeats"])
    mixed = [("a" if i % 2 else "b", tables[i % len(tables)]) for i in range(16)]
    batch16 = timed(lambda: generator.complete(mixed, forced), max(2, setup["repeats"] // 2))
    batch64 = None
    if setup["device"] != "cpu":
        mixed64 = [("a" if i % 2 else "b", tables[i % len(tables)]) for i in range(64)]
        batch64 = timed(lambda: generator.complete(mixed64, forced), max(2, setup["repeats"] // 2))
    outputs = [c.token_ids for c in generator.complete([("a", t) for t in tables], max_new_tokens=NEW_TOKENS)]
    prompt_tokens = generator.complete(one, max_new_tokens=1)[0].prompt_tokens
    report = _report(startup, beams, first, greedy, batch16, outputs, prompt_tokens, batch64)
    report["provider"] = generator.exported.session.get_providers()[0]
    return report


def _torch(config: str, setup: dict, tables: list[str], started: float) -> dict:
    import torch

    from prefixkit.exporter import load_backbone
    from prefixkit.exporter.reference import hf_generate
    from prefixkit.runtime import load_prefix

    torch.set_num_threads(setup["threads"])
    backbone = load_backbone(setup["backbone"])
    backbone.model.to(setup["device"])
    prefix = load_prefix(setup["prefix_a"])
    tok = backbone.tokenizer
    if config == "peft-generate":
        model = _peft_model(backbone, prefix)
        startup = time.perf_counter() - started

        def generate(ids, max_new, beams=1, **kw):
            with torch.no_grad():
                input_ids = torch.tensor([ids], device=setup["device"])
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     max_new_tokens=max_new, num_beams=beams, do_sample=False,
                                     pad_token_id=tok.pad_token_id, **kw)
            return out[0, len(ids):].tolist()
    else:
        static = config == "hf-static-compile"
        if static:  # HF's recipe: the forward compiled with CUDA graphs, over a static cache
            backbone.model.forward = torch.compile(backbone.model.forward, mode="reduce-overhead", fullgraph=True)
        startup = time.perf_counter() - started

        def generate(ids, max_new, beams=1, **kw):
            return hf_generate(backbone.model, prefix, ids, max_new, num_beams=beams, static=static, **kw)

    ids = tok(TEMPLATE.replace("{input}", setup["timed"])).input_ids
    if config == "hf-static-compile":  # compiled for each shape the timed runs take, untimed
        for beams, max_new in ((5, NEW_TOKENS), (1, 1), (1, NEW_TOKENS)):
            generate(ids, max_new, beams, min_new_tokens=max_new)
    beams = timed(lambda: generate(ids, NEW_TOKENS, 5, length_penalty=0.8, min_new_tokens=NEW_TOKENS), setup["repeats"])
    first = timed(lambda: generate(ids, 1), setup["repeats"])
    greedy = timed(lambda: generate(ids, NEW_TOKENS, min_new_tokens=NEW_TOKENS), setup["repeats"])
    outputs = [generate(tok(TEMPLATE.replace("{input}", t)).input_ids, NEW_TOKENS) for t in tables]
    report = _report(startup, beams, first, greedy, None, outputs, len(ids))
    report["provider"] = f"torch {torch.__version__} on {setup['device']}"
    return report


def _peft_model(backbone, prefix):
    """PEFT prefix tuning (no reparametrisation) with its prefix set to our key/values."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix.prefix_len)
    model = get_peft_model(backbone.model, config).eval()
    # PEFT reads its embedding as [P, L * 2, H, D] (layer-major, key then value).
    L, H, P, D = prefix.key.shape
    weights = np.stack([prefix.key, prefix.value], axis=1)  # [L, 2, H, P, D]
    weights = weights.transpose(3, 0, 1, 2, 4).reshape(P, L * 2 * H * D)
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(weights))
    return model


def _report(startup, beams, first, greedy, batch16, outputs, prompt_tokens, batch64=None) -> dict:
    per_token = (statistics.median(greedy) - statistics.median(first)) / (NEW_TOKENS - 1)
    report = {
        "startup_s": startup,
        "prompt_tokens": prompt_tokens,
        "beam5_batch1": summary(beams),
        "greedy_batch1": summary(greedy),
        "prefill_s": statistics.median(first),
        "decode_ms_per_token": per_token * 1000,
        "batch1_tokens_per_s": NEW_TOKENS / statistics.median(greedy),
        "outputs": outputs,
        "times": {"beams": beams, "first": first, "greedy": greedy, "batch16": batch16, "batch64": batch64},
    }
    if batch64:
        report["batch64_tokens_per_s"] = 64 * NEW_TOKENS / statistics.median(batch64)
    if batch16 is not None:
        report["batch16_tokens_per_s"] = 16 * NEW_TOKENS / statistics.median(batch16)
        report["batch16_vs_batch1"] = report["batch16_tokens_per_s"] / report["batch1_tokens_per_s"]
    return report


# ---------------------------------------------------------------- the parent: set up, run each, report


def pooled(rounds: list[dict]) -> dict:
    """One configuration's report from its rounds: timings pooled, start-up and peak memory
    their medians, outputs of the first round (and whether any round's differed)."""
    times = {key: [t for r in rounds for t in (r["times"].get(key) or [])] for key in rounds[0]["times"]}
    report = _report(statistics.median(r["startup_s"] for r in rounds), times["beams"], times["first"],
                     times["greedy"], times["batch16"] or None, rounds[0]["outputs"], rounds[0]["prompt_tokens"],
                     times.get("batch64") or None)
    report["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in rounds)
    shares = [r["weights_cached"] for r in rounds if r.get("weights_cached") is not None]
    report["weights_cached"] = statistics.median(shares) if shares else None
    report["provider"], report["rounds"] = rounds[0]["provider"], len(rounds)
    report["outputs_differ_between_rounds"] = any(r["outputs"] != rounds[0]["outputs"] for r in rounds)
    return report


def export(backbone_name: str, quantize: str | None = None, graph: str = "auto", dtype: str = "fp32") -> Path:
    """exports/BACKBONE[-QUANTIZE][-GRAPH][-fp16], made if missing (pt-export does nothing if it is there)."""
    from prefixkit.exporter.onnx_export import export_backbone

    parts = (quantize, None if graph == "auto" else graph, None if dtype == "fp32" else dtype)
    suffix = "".join(f"-{part}" for part in parts if part)
    out = ROOT / "exports" / f"{backbone_name}{suffix}"
    export_backbone(backbone_name, out, quantize=quantize, graph=graph, dtype=dtype)
    return out


def prefix_of_text(backbone, text: str) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's own key/values of the first 10 tokens of `text`: a prefix of 10."""
    from prefixkit.exporter.reference import kv_of_text

    return kv_of_text(backbone.model, backbone.tokenizer(text, return_tensors="pt").input_ids[:, :10])


def prepare(backbone_name: str, workdir: Path, threads: int, repeats: int, configs: list[str], device: str) -> dict:
    from prefixkit.exporter import load_backbone
    from prefixkit.runtime import make_meta, save_prefix
    from prefixkit.runtime.prefix import Prefix

    backbone = load_backbone(backbone_name)
    exports = {config: str(export(backbone_name, *EXPORTS[config])) for config in EXPORTS if config in configs}
    prefixes = {}
    for name, text in (("a", PREFIX_TEXT), ("b", "Describe the restaurant in one sentence")):
        key, value = prefix_of_text(backbone, text)
        meta = make_meta(backbone.fingerprint, key.shape[2], template=TEMPLATE, stop=[])
        prefixes[name] = str(save_prefix(workdir / f"prefix-{name}.npz", Prefix(key, value, meta)))
    return {"backbone": backbone_name, "backbone_folder": str(backbone.path), "exports": exports,
            "command": " ".join(["python benchmarks/latency.py", *sys.argv[1:]]), "commit": commit() or "?",
            "prefix_a": prefixes["a"], "prefix_b": prefixes["b"],
            "tables": e2e_tables(16), "timed": TIMED_TABLE, "threads": threads, "repeats": repeats, "device": device}


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def write_reports(results: dict, setup: dict) -> Path:
    """latency.{json,md,png} (latency-cuda.* for --device cuda) in benchmarks/results; returns the .md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "latency" if setup["device"] == "cpu" else f"latency-{setup['device']}"
    fp32 = results.get("runtime-fp32", {}).get("outputs")
    for config in results:
        if fp32 is not None and config != "runtime-fp32":
            same = sum(a == b for a, b in zip(results[config]["outputs"], fp32))
            key = "greedy_equal_to_fp32" if config.startswith("runtime") else "greedy_equal_to_runtime_fp32"
            results[config][key] = f"{same}/{len(fp32)}"
    baselines = [c for c in BASELINES if c in results]
    for config in CONFIGS:
        if config in results and config.startswith("runtime"):
            results[config]["beam5_speedup"] = {
                b: results[b]["beam5_batch1"]["median_s"] / results[config]["beam5_batch1"]["median_s"] for b in baselines
            }
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {setup['threads']} threads"
    if setup["device"] != "cpu":
        machine += f", {setup.get('gpu') or 'GPU'} ({setup['device']})"
    payload = {"machine": machine, "new_tokens": NEW_TOKENS, "setup": {k: v for k, v in setup.items() if k != "tables"},
               "results": {c: {k: v for k, v in r.items() if k != "outputs"} for c, r in results.items()}}
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")

    prompt = next(iter(results.values()))["prompt_tokens"] if results else "?"
    rounds = max((r.get("rounds", 1) for r in results.values()), default=1)
    lines = [f"# Latency, {setup['backbone']}", "", f"Command: `{setup.get('command', '')}` at commit "
             f"{setup.get('commit', '?')}.", "", f"Machine: {machine}. Prefix of 10 positions, "
             f"{prompt}-token input, {NEW_TOKENS} new tokens. {rounds} round(s) of {setup['repeats']} repeats, "
             "the configurations taking turns; timings pooled over the rounds. Start-up: "
             + ("each configuration's weight files read into the page cache just before its worker started"
                if setup.get("page_cache") == "warm" else "the page cache left as it was")
             + "; in brackets, the share of the weights cached when the worker started.", "",
             f"| configuration | 5 beams, batch 1: median / p95 | speed-up vs {' / '.join(baselines)} | "
             "greedy decode per token | batch 16 mixed prefixes | batch 16 / batch 1 | batch 64 mixed prefixes | "
             "start-up | peak memory | greedy = fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        if config not in results:
            continue
        r = results[config]
        speed = " / ".join(f"{r['beam5_speedup'][b]:.1f}x" for b in baselines) if "beam5_speedup" in r else ""
        b16 = f"{r['batch16_tokens_per_s']:.0f} tok/s" if "batch16_tokens_per_s" in r else ""
        ratio = f"{r['batch16_vs_batch1']:.1f}x" if "batch16_vs_batch1" in r else ""
        b64 = f"{r['batch64_tokens_per_s']:.0f} tok/s" if "batch64_tokens_per_s" in r else ""
        equal = r.get("greedy_equal_to_fp32", r.get("greedy_equal_to_runtime_fp32", ""))
        cached = "" if r.get("weights_cached") is None else f" ({100 * r['weights_cached']:.0f}% cached)"
        lines.append(f"| {config} | {r['beam5_batch1']['median_s']:.2f} s / {r['beam5_batch1']['p95_s']:.2f} s | {speed} | "
                     f"{r['decode_ms_per_token']:.2f} ms | {b16} | {ratio} | {b64} | {r['startup_s']:.1f} s{cached} | "
                     f"{r['peak_rss_mb']:.0f} MB | {equal} |")
    md = RESULTS / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")

    write_chart(results, setup["backbone"], machine, RESULTS / f"{stem}.png")
    return md


def write_chart(results: dict, backbone: str, machine: str, path: Path) -> None:
    """Bar charts of the 5-beam median and the greedy per-token time; nothing without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [c for c in CONFIGS if c in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    axes[0].bar(names, [results[c]["beam5_batch1"]["median_s"] for c in names], color="tab:blue")
    axes[0].set_ylabel("seconds")
    axes[0].set_title(f"5 beams, batch 1, {NEW_TOKENS} new tokens (median)")
    axes[1].bar(names, [results[c]["decode_ms_per_token"] for c in names], color="tab:orange")
    axes[1].set_ylabel("ms per token")
    axes[1].set_title("greedy decode, batch 1")
    for ax in axes:  # labels end under their bars, so long names do not run into the next
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    fig.suptitle(f"{backbone} on {machine}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--backbone", default="smollm2-135m", show_default=True)
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(1), help="Timed runs per round.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1),
              help="Times every configuration is measured, the configurations taking turns.")
@click.option("--threads", default=os.cpu_count(), show_default=True, type=click.IntRange(1))
@click.option("--configs", help=f"Comma-separated, of {', '.join(CONFIGS)} (default: "
              f"{', '.join(DEFAULT_CONFIGS['cpu'])}; with --device cuda {', '.join(DEFAULT_CONFIGS['cuda'])}).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: the runtime on ONNX Runtime's CUDA provider, the baselines in PyTorch on the GPU.")
@click.option("--page-cache", type=click.Choice(["warm", "as-is"]), default="warm", show_default=True,
              help="warm: read each configuration's weight files just before its worker starts, so that start-up "
                   "is measured with them in the page cache; as-is: leave the cache as it is.")
@click.option("--worker", hidden=True)
@click.option("--setup-file", hidden=True, type=click.Path(path_type=Path))
def main(backbone, repeats, rounds, threads, configs, device, page_cache, worker, setup_file):
    """Latency of the runtime (fp32, int8, int4) against Hugging Face generate and PEFT."""
    if worker:
        print(json.dumps(globals()["worker"](worker, json.loads(setup_file.read_text()))))
        return
    configs = configs.split(",") if configs else DEFAULT_CONFIGS[device]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise click.BadParameter(f"unknown configuration {', '.join(unknown)}; choose from {', '.join(CONFIGS)}.")
    with tempfile.TemporaryDirectory() as tmp:
        setup = prepare(backbone, Path(tmp), threads, repeats, configs, device)
        setup["gpu"] = gpu_name() if device == "cuda" else None
        setup["page_cache"] = page_cache
        setup_file = Path(tmp) / "setup.json"
        setup_file.write_text(json.dumps(setup))
        runs: dict[str, list[dict]] = {}
        failed, md = set(), None
        for round_ in range(rounds):
            for config in configs[round_ % len(configs):] + configs[:round_ % len(configs)]:
                if config in failed:
                    continue
                click.echo(f"round {round_ + 1}/{rounds}: measuring {config} …", err=True)
                if page_cache == "warm":
                    warm_page_cache(weight_files(config, setup))
                proc = subprocess.run([sys.executable, __file__, "--worker", config, "--setup-file", str(setup_file)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    click.echo(f"  {config} failed: {proc.stderr.strip().splitlines()[-1:]}", err=True)
                    failed.add(config)
                    continue
                runs.setdefault(config, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
                # After each one: an interrupted run keeps what it measured.
                md = write_reports({c: pooled(r) for c, r in runs.items()}, setup)
    if md is None:
        raise click.ClickException("no configuration could be measured (see the errors above).")
    click.echo(md.read_text())


if __name__ == "__main__":
    main()
