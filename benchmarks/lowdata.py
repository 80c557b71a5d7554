"""The paper's low-data experiment (section 6.3) on a backbone: prefix-tuning against full
fine-tuning on 50-500 E2E training examples, scored by pt-eval on held-out tables.

    python benchmarks/lowdata.py --data ../shared/data/e2e/devset.csv            # the full grid
    python benchmarks/lowdata.py --data ../shared/data/e2e/devset.csv --quick    # 50 and 100, one run each

Test tables are set aside first (seeded) and no training or dev draw touches them. Each run is
`pt-train` with `--limit SIZE --dev-fraction 0.3 --seed S` (prefix: `--init-text
"table-to-text:"`; finetune: `--method finetune`, then `pt-export` of the fine-tuned folder),
then `pt-eval` on the test tables. Every command is run as a user would type it and recorded.
Writes benchmarks/results/lowdata.json, lowdata.md and lowdata.png (BLEU and ROUGE-L against
training size, both methods, as the paper's Figure 3).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from prefixkit.training.data import split_e2e_csv

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent


def machine_record() -> dict:
    """Where a run trains: written beside its results, shown in the report."""
    import platform

    import torch

    if torch.cuda.is_available():
        where = f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores; torch {torch.__version__}"
        return {"machine": where, "trained_on": "cuda"}
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU; torch {torch.__version__}",
            "trained_on": "cpu"}


def machine_of(run_dir: Path) -> dict:
    """The machine_record() a run left beside its results, or {} for runs made before they did."""
    path = run_dir / "machine.json"
    return json.loads(path.read_text()) if path.exists() else {}


def run(command: list[str], log: list[dict]) -> float:
    started = time.perf_counter()
    click.echo("$ " + " ".join(command), err=True)
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - started
    log.append({"command": " ".join(command), "seconds": round(seconds, 1)})
    return seconds


@click.command()
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="E2E CSV to draw from (e.g. ../shared/data/e2e/devset.csv).")
@click.option("--backbone", default="smollm2-135m", show_default=True)
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=ROOT / "exports" / "smollm2-135m",
              show_default=True, help="The backbone's export (made with pt-export if missing).")
@click.option("--sizes", default="50,100,200,500", show_default=True)
@click.option("--runs", type=int, default=2, show_default=True, help="Draws (each its own seed) per size and method.")
@click.option("--methods", default="prefix,finetune", show_default=True)
@click.option("--test-tables", type=int, default=50, show_default=True)
@click.option("--num-beams", type=int, default=5, show_default=True)
@click.option("--quick", is_flag=True, help="Sizes 50 and 100, one run each.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "runs" / "lowdata",
              show_default=True)
@click.option("--keep-models", is_flag=True, help="Keep each fine-tuned model and its export (about 1.1 GB a run).")
@click.option("--no-score", is_flag=True, help="Train and generate only (pt-eval --no-score: no Java needed, e.g. "
              "on a GPU machine); run again with --rescore where Java is.")
@click.option("--rescore", is_flag=True, help="Score the runs a --no-score run left in --workdir, then report.")
@click.option("--name", default="lowdata", show_default=True,
              help="Results go to benchmarks/results/NAME.{json,md,png}.")
def main(data, backbone, export_dir, sizes, runs, methods, test_tables, num_beams, quick, workdir, keep_models,
         no_score, rescore, name):
    """Prefix-tuning against fine-tuning with 50-500 E2E examples (paper, section 6.3)."""
    sizes_list = [50, 100] if quick else [int(s) for s in sizes.split(",")]
    runs = 1 if quick else runs
    workdir.mkdir(parents=True, exist_ok=True)
    test_csv, pool_csv = workdir / "test.csv", workdir / "pool.csv"
    pool_tables = split_e2e_csv(data, test_tables, 12345, test_csv, pool_csv)
    log: list[dict] = []
    if not rescore and not (export_dir / "manifest.json").exists():
        run([str(BIN / "pt-export"), backbone, "--output", str(export_dir)], log)
    results = []
    for size in sizes_list:
        for r in range(runs):
            seed = 100 * size + r
            for method in methods.split(","):
                out = workdir / f"{method}-{size}-{seed}"
                scores_file = out / "eval" / "scores.json"
                if rescore and scores_file.exists() and json.loads(scores_file.read_text())["scores"] is None:
                    run([str(BIN / "pt-eval"), "--rescore", "-o", str(out / "eval")], [])
                if not scores_file.exists() and not rescore:
                    commands: list[dict] = []
                    train = [str(BIN / "pt-train"), str(pool_csv), "--backbone", backbone, "--limit", str(size),
                             "--dev-fraction", "0.3", "--seed", str(seed), "--quiet"]
                    if method == "prefix":
                        prefix = out / "prefix.npz"
                        train_seconds = run(train + ["--init-text", "table-to-text:", "-o", str(prefix)], commands)
                        evaluate = ["--export", str(export_dir), "--prefix", str(prefix)]
                    else:
                        model = out / "model"
                        train_seconds = run(train + ["--method", "finetune", "-o", str(model)], commands)
                        run([str(BIN / "pt-export"), str(model), "--output", str(out / "export")], commands)
                        evaluate = ["--export", str(out / "export")]
                    run([str(BIN / "pt-eval"), str(test_csv), *evaluate, "--num-beams", str(num_beams),
                         "--max-new-tokens", "60", "-o", str(out / "eval"), *(["--no-score"] if no_score else [])],
                        commands)
                    (out / "train_seconds.txt").write_text(f"{train_seconds:.1f}\n")
                    (out / "commands.json").write_text(json.dumps(commands, indent=1))
                    (out / "machine.json").write_text(json.dumps(machine_record()))
                    if method == "finetune" and not keep_models:
                        shutil.rmtree(out / "model", ignore_errors=True)
                        shutil.rmtree(out / "export", ignore_errors=True)
                if (out / "commands.json").exists():
                    log.extend(json.loads((out / "commands.json").read_text()))
                if not scores_file.exists():
                    continue
                scores = json.loads(scores_file.read_text())["scores"]
                if scores is None:
                    continue  # generated with --no-score, not yet rescored
                train_seconds = float((out / "train_seconds.txt").read_text())
                machine = machine_of(out)
                results.append({"method": method, "size": size, "seed": seed, "scores": scores,
                                "train_seconds": train_seconds, "trained_on": machine.get("trained_on", "?"),
                                "machine": machine.get("machine", "not recorded")})
    if no_score:
        click.echo(f"generated every run in {workdir}; score them with --rescore where Java is installed.", err=True)
        return
    report = {"rescored": rescore, "data": str(data), "test_tables": test_tables, "pool_tables": pool_tables,
              "backbone": backbone,
              "num_beams": num_beams, "quick": quick, "runs": results, "commands": log,
              "summary": summarise(results)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown(report))
    plot(report, RESULTS / f"{name}.png")
    click.echo(markdown(report), err=True)


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    for method in sorted({r["method"] for r in results}):
        for size in sorted({r["size"] for r in results}):
            runs = [r for r in results if r["method"] == method and r["size"] == size]
            if not runs:
                continue
            row = {"method": method, "size": size, "runs": len(runs)}
            for metric in runs[0]["scores"]:
                values = [r["scores"][metric] for r in runs]
                row[metric] = statistics.fmean(values)
                row[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row["train_seconds"] = statistics.fmean(r["train_seconds"] for r in runs)
            row["trained_on"] = "/".join(sorted({r["trained_on"] for r in runs}))
            rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = [f"# Low-data E2E ({report['backbone']}): prefix-tuning against fine-tuning", "",
             f"Test: {report['test_tables']} held-out tables of {report['data']}; {report['num_beams']} beams. "
             f"Mean (std) over runs.", "",
             "| method | size | runs | BLEU | NIST | METEOR | ROUGE-L | CIDEr | train s | trained on |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        cells = [f"{row[m]:.4f} ({row[m + '_std']:.4f})" for m in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")]
        lines.append(f"| {row['method']} | {row['size']} | {row['runs']} | " + " | ".join(cells)
                     + f" | {row['train_seconds']:.0f} | {row['trained_on']} |")
    machines = sorted({f"{r['trained_on']}: {r['machine']}" for r in report["runs"]})
    lines += ["", "Trained on (generation always ran on ONNX Runtime's CPU provider):", ""]
    lines += [f"- {m}" for m in machines]
    rescored = (" (runs made with --no-score were scored afterwards with `pt-eval --rescore -o RUN/eval`, since "
                "METEOR needs Java)") if report.get("rescored") else ""
    lines += ["", f"Commands, in order{rescored}:", ""]
    lines += [f"    {c['command']}   # {c['seconds']} s" for c in report["commands"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        click.echo("matplotlib is not installed (the bench extra); no chart.", err=True)
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, label in zip(axes, ("BLEU", "ROUGE_L"), ("BLEU", "ROUGE-L")):
        for method, style in (("prefix", "o-"), ("finetune", "s--")):
            rows = [r for r in report["summary"] if r["method"] == method]
            if rows:
                ax.errorbar([r["size"] for r in rows], [r[metric] for r in rows],
                            yerr=[r[metric + "_std"] for r in rows], fmt=style, label=method, capsize=3)
        ax.set_xscale("log")
        sizes = sorted({r["size"] for r in report["summary"]})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training examples")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
