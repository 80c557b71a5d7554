"""Token parity of the runtime on an execution provider against Hugging Face generate in
PyTorch fp32 (CPU) with the same prefix as past key values, on E2E inputs.

    .venv/bin/python benchmarks/parity.py [--device cuda] [--backbone smollm2-135m] [--export DIR]

The test suite checks this on the CPU; this script is how the same check runs where a GPU is
(ONNX Runtime's CUDA provider; with --device cuda the default exports are the fused graph, whose
float32 attention runs on the CPU with its cache in host memory, and optimum-onnx's graph, which
runs wholly on the GPU with the cache in device memory). For 16 E2E tables with a prefix of 10
positions and the latency benchmark's template: greedy and 5-beam (length penalty 0.8) outputs
of 30 new tokens, each compared token for token with Hugging Face's. Where greedy outputs part,
the two candidates' logits at that step are compared under PyTorch: a divergence is a near-tie
when their gap is within twice the export's measured numeric difference on this provider (its
parity check, run here on the same provider; each logit may move by that much), and a bug
otherwise. Writes
benchmarks/results/parity-{device}.json and .md.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import click
import numpy as np

from prefixkit.benchmarks.latency import (NEW_TOKENS, PREFIX_TEXT, PROVIDERS, TEMPLATE, e2e_tables, gpu_name,
                                          prefix_of_text)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _gap(model, prefix, ids: list[int], common: list[int], ours: int, theirs: int) -> tuple[float, float]:
    """PyTorch's logits after prompt + the common tokens: (theirs - ours, max |logit|)."""
    import torch

    from prefixkit.exporter.reference import logits_after_prefix

    logits = logits_after_prefix(model, prefix.key, prefix.value, torch.tensor([ids + common])).numpy()[0, -1]
    return float(logits[theirs] - logits[ours]), float(np.abs(logits).max())


def run(backbone, export: Path, device: str, n: int, threads: int, references: dict) -> dict:
    """One export's parity on `device` (backbone: the loaded PyTorch reference; references:
    Hugging Face's outputs by (decoding, input), filled and reused across exports)."""
    from prefixkit.exporter.parity import check_parity
    from prefixkit.exporter.reference import hf_generate
    from prefixkit.runtime import ExportedBackbone, Generator
    from prefixkit.runtime.prefix import Prefix

    tok = backbone.tokenizer
    exported = ExportedBackbone(export, providers=PROVIDERS[device], threads=threads)
    provider = exported.session.get_providers()[0]
    parity = check_parity(backbone.model, tok, exported)  # the numeric difference on this provider
    generator = Generator(exported)
    prefix = Prefix(*prefix_of_text(backbone, PREFIX_TEXT), {})
    tables = e2e_tables(n)
    report = {"export": str(export), "graph": exported.manifest.graph.kind, "dtype": exported.manifest.dtype,
              "provider": provider,
              "cache": f"device memory ({exported.cache_device})" if exported.cache_device else "host memory",
              "export_parity_relative": parity["relative"], "argmax_equal": parity["argmax_equal"],
              }
    for mode, settings in (("greedy", {}), ("beams5", {"num_beams": 5, "length_penalty": 0.8})):
        equal, divergences, seconds = 0, [], 0.0
        for table in tables:
            ids = tok(TEMPLATE.replace("{input}", table)).input_ids
            started = time.perf_counter()
            ours = generator.generate([(prefix, ids)], max_new_tokens=NEW_TOKENS, **settings)[0].token_ids
            seconds += time.perf_counter() - started
            if (mode, table) not in references:
                references[mode, table] = hf_generate(backbone.model, prefix, ids, NEW_TOKENS, **settings)
            theirs = references[mode, table]
            if ours == theirs:
                equal += 1
                continue
            step = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            item = {"input": table, "step": step}
            if mode == "greedy" and step < min(len(ours), len(theirs)):
                gap, scale = _gap(backbone.model, prefix, ids, theirs[:step], ours[step], theirs[step])
                # Each logit may move by the measured difference: a flip needs a gap within twice it.
                item.update(logit_gap=gap, relative_gap=gap / scale,
                            near_tie=gap / scale <= 2 * parity["relative"])
            divergences.append(item)
        report[mode] = {"equal": equal, "of": len(tables), "divergences": divergences,
                        "runtime_seconds": seconds}
    return report


def write(report: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"parity-{report['device']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Parity, {report['backbone']} on {report['device']} ({report['machine']})", "",
             f"Against Hugging Face generate, PyTorch fp32 on the CPU, prefix of 10 as past key values; "
             f"{report['inputs']} E2E inputs, {NEW_TOKENS} new tokens. Export parity: the export's own check "
             "(max |Δlogit| / max |logit|, prefixes 0/1/10) run on the provider. A divergence is a near-tie when "
             "the two candidates' logit gap is within twice that.", "",
             "| export | provider | cache | export parity | decoding | token-identical | divergences "
             "(step, relative logit gap, near-tie) | runtime time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["exports"]:
        for mode, label in (("greedy", "greedy"), ("beams5", "5 beams, length penalty 0.8")):
            m = r[mode]
            div = "; ".join(f"step {d['step']}" + (f", {d['relative_gap']:.1e}, {'yes' if d['near_tie'] else 'NO'}"
                                                  if "relative_gap" in d else "") for d in m["divergences"]) or "none"
            lines.append(f"| {Path(r['export']).name} ({r['graph']}, {r['dtype']}) | {r['provider']} | {r['cache']} | "
                         f"{r['export_parity_relative']:.1e} | {label} | {m['equal']}/{m['of']} | {div} | "
                         f"{m['runtime_seconds']:.2f} s |")
    md = RESULTS / f"{stem}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


@click.command()
@click.option("--backbone", default="smollm2-135m", show_default=True)
@click.option("--export", "exports", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="An fp32 export of the backbone (repeatable; default: exports/BACKBONE, the fused graph, and "
                   "with --device cuda also exports/BACKBONE-optimum; made if missing).")
@click.option("--device", type=click.Choice(sorted(PROVIDERS)), default="cpu", show_default=True)
@click.option("--inputs", "n", default=16, show_default=True, type=click.IntRange(1, 16))
@click.option("--threads", default=os.cpu_count(), show_default=True, type=click.IntRange(1))
def main(backbone, exports, device, n, threads):
    """Token parity of the runtime with Hugging Face generate on E2E inputs, on DEVICE."""
    import torch

    from prefixkit.exporter import load_backbone

    if not exports:
        from prefixkit.benchmarks.latency import export as export_folder

        exports = [export_folder(backbone, graph=g) for g in (["auto", "optimum"] if device == "cuda" else ["auto"])]
    torch.set_num_threads(threads)
    loaded = load_backbone(backbone)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {threads} threads"
    if device == "cuda":
        machine += f", {gpu_name() or 'GPU'}"
    report = {"backbone": backbone, "device": device, "machine": machine, "inputs": n, "new_tokens": NEW_TOKENS,
              "exports": []}
    references: dict = {}
    for export in exports:
        report["exports"].append(run(loaded, export, device, n, threads, references))
        md = write(report)  # after each export: an interrupted run keeps what it measured
    click.echo(md.read_text())


if __name__ == "__main__":
    main()
