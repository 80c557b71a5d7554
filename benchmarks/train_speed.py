"""Training speed of prefix-tuning against fine-tuning, on the same data and machine: the paper's
claim is that a prefix trains faster per step and in less memory, since no weight of the
backbone needs a gradient or optimizer state.

    python benchmarks/train_speed.py [--backbone smollm2-135m] [--steps 12] [--batch-size 5]
    pt-bench train-speed ...

Each method trains in its own process (so its peak memory is its own) through pt-train's
`train()`, on the same E2E examples with the same batch size, template and seed, for `--steps`
optimizer steps: prefix (the default, `--init-text "table-to-text:"`), prompt (virtual input
tokens) and finetune (every weight, AdamW). Measured per method: steps/s and tokens/s after the
first step (which carries one-time costs), the first step's time, trained parameters, and peak
memory (the process's peak resident set on a CPU; PyTorch's peak allocation on a GPU, where the
process's memory is the host's). Writes benchmarks/results/train-speed.json and .md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("prefix", "prompt", "finetune")
DATA = ROOT / "examples" / "data" / "e2e" / "train.csv"


def worker(method: str, backbone_name: str, steps: int, batch_size: int, threads: int) -> dict:
    import dataclasses

    import torch

    from prefixkit.benchmarks.latency import peak_rss_mb
    from prefixkit.exporter.backbones import load_backbone
    from prefixkit.training.data import draw, load_examples
    from prefixkit.training.trainer import TrainSettings, train

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(backbone_name)
    examples, _ = draw(load_examples(DATA, "auto"), steps * batch_size, 0.0, 0)
    settings = dataclasses.replace(
        TrainSettings(method=method, epochs=1, batch_size=batch_size, max_steps=steps, seed=0, save_every=10**6),
        **({"init_text": "table-to-text:"} if method == "prefix" else {}))
    times: list[float] = []

    def on_step(step, stop):
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / ("model" if method == "finetune" else "p.npz")
        result = train(backbone, examples, [], output, settings, progress=False, on_step=on_step)
    after_first = times[-1] - times[0]
    tokens_after_first = result.tokens - result.step_tokens[0]
    return {
        "method": method,
        "steps": result.step,
        "batch_size": batch_size,
        "first_step_s": times[0] - started,
        "steps_per_s": (len(times) - 1) / after_first,
        "tokens_per_s": tokens_after_first / after_first,
        "tokens": result.tokens,
        "trained_parameters": result.meta["parameters"]["trained"],
        "backbone_parameters": result.meta["parameters"]["backbone"],
        "peak_memory_mb": (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss_mb()),
        "memory_measure": "torch peak allocation (GPU)" if device == "cuda" else "process peak RSS (CPU)",
        "device": device,
    }


def write_report(results: list[dict], setup: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train-speed.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    base = next((r for r in results if r["method"] == "finetune"), None)
    lines = [f"# Training speed, {setup['backbone']}", "",
             f"Command: `{setup['command']}` at commit {setup['commit']}.", "",
             f"Machine: {setup['machine']}. {setup['steps']} optimizer steps of batch {setup['batch_size']} on E2E "
             "training examples, each method in its own process; rates after the first step.", "",
             "| method | trained parameters | steps/s | tokens/s | first step | peak memory | vs fine-tuning: speed, memory |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        versus = ""
        if base is not None and r is not base:
            versus = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x, {r['peak_memory_mb'] / base['peak_memory_mb']:.2f}x"
        lines.append(f"| {r['method']} | {r['trained_parameters']:,} | {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['first_step_s']:.1f} s | {r['peak_memory_mb']:.0f} MB | {versus} |")
    lines += ["", f"Peak memory: {results[0]['memory_measure']}."]
    md = RESULTS / "train-speed.md"
    md.write_text("\n".join(lines) + "\n")
    return md


@click.command()
@click.option("--backbone", default="smollm2-135m", show_default=True)
@click.option("--steps", default=12, show_default=True, type=click.IntRange(2))
@click.option("--batch-size", default=5, show_default=True, type=click.IntRange(1))
@click.option("--methods", default=",".join(METHODS), show_default=True)
@click.option("--threads", default=os.cpu_count(), show_default=True, type=click.IntRange(1))
@click.option("--worker", "worker_method", hidden=True)
def main(backbone, steps, batch_size, methods, threads, worker_method):
    """Training speed and peak memory of prefix-tuning, prompt-tuning and fine-tuning on the same
    data and machine."""
    if worker_method:
        print(json.dumps(worker(worker_method, backbone, steps, batch_size, threads)))
        return
    from prefixkit.benchmarks import commit
    from prefixkit.benchmarks.lowdata import machine_record

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise click.BadParameter(f"unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    setup = {"backbone": backbone, "steps": steps, "batch_size": batch_size, "threads": threads,
             "command": " ".join(["python benchmarks/train_speed.py", *sys.argv[1:]]), "commit": commit() or "?",
             **machine_record()}
    results = []
    for method in chosen:
        click.echo(f"training {steps} steps with {method} …", err=True)
        done = subprocess.run([sys.executable, __file__, "--worker", method, "--backbone", backbone, "--steps",
                               str(steps), "--batch-size", str(batch_size), "--threads", str(threads)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise click.ClickException(f"the {method} run failed: {done.stderr.strip().splitlines()[-1]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        md = write_report(results, setup)
    click.echo(md.read_text())


if __name__ == "__main__":
    main()
