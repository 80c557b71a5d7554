"""The paper's extrapolation experiment (section 6.4) on WebNLG 2017: train on some categories,
score on held-out entries of those (seen) and of categories never trained on (unseen),
prefix-tuning against full fine-tuning.

    python benchmarks/extrapolation.py --webnlg ../shared/data/webnlg2017

WebNLG 2017's own unseen categories exist only in its test set, which is not among our data, so
the split is made inside the ten training categories: --seen (five by default) are trained on,
the other five are unseen. Training draws --train-tables entries of the seen categories from
the training set (all their references); the test set is --test-per-split entries of each
split from the development set. Each method is `pt-train` (prefix: `--init-text
"triples-to-text:"`), `pt-export` for the fine-tuned model, then `pt-eval --seen-categories`.
Writes benchmarks/results/extrapolation.json and extrapolation.md.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path

import click

from prefixkit.benchmarks.lowdata import machine_of, machine_record, run
from prefixkit.training.data import webnlg_entries, write_webnlg_entries

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BIN = Path(sys.executable).parent
CATEGORIES = ("Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
              "SportsTeam", "University", "WrittenWork")


@click.command()
@click.option("--webnlg", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="WebNLG 2017 folder with train/ and dev/.")
@click.option("--backbone", default="smollm2-135m", show_default=True)
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=ROOT / "exports" / "smollm2-135m",
              show_default=True)
@click.option("--seen", default="Airport,Astronaut,Building,Food,SportsTeam", show_default=True,
              help="Categories trained on; the rest of the ten are unseen.")
@click.option("--train-tables", type=int, default=150, show_default=True)
@click.option("--test-per-split", type=int, default=50, show_default=True)
@click.option("--methods", default="prefix,finetune", show_default=True)
@click.option("--num-beams", type=int, default=5, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=ROOT / "runs" / "extrapolation",
              show_default=True)
@click.option("--no-score", is_flag=True,
              help="Train and generate only (no Java needed); then --rescore where Java is.")
@click.option("--rescore", is_flag=True, help="Score what a --no-score run left in --workdir, then report.")
def main(webnlg, backbone, export_dir, seen, train_tables, test_per_split, methods, num_beams, seed, workdir,
         no_score, rescore):
    """Seen against unseen WebNLG categories, prefix-tuning against fine-tuning (paper, section 6.4)."""
    seen_set = [c.strip() for c in seen.split(",")]
    unknown = set(seen_set) - set(CATEGORIES)
    if unknown:
        raise click.BadParameter(f"not WebNLG 2017 training categories: {sorted(unknown)}", param_hint="--seen")
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = [e for e in webnlg_entries(webnlg / "train") if e.get("category") in seen_set]
    rng.shuffle(train)
    dev = webnlg_entries(webnlg / "dev")
    rng.shuffle(dev)
    test = ([e for e in dev if e.get("category") in seen_set][:test_per_split]
            + [e for e in dev if e.get("category") not in seen_set][:test_per_split])
    train_xml, test_xml = workdir / "train.xml", workdir / "test.xml"
    write_webnlg_entries(train[:train_tables], train_xml)
    write_webnlg_entries(test, test_xml)
    log: list[dict] = []
    if not rescore and not (export_dir / "manifest.json").exists():
        run([str(BIN / "pt-export"), backbone, "--output", str(export_dir)], log)
    results = {}
    for method in methods.split(","):
        out = workdir / method
        scores_file = out / "eval" / "scores.json"
        if rescore and scores_file.exists() and json.loads(scores_file.read_text())["scores"] is None:
            run([str(BIN / "pt-eval"), "--rescore", "-o", str(out / "eval")], [])
        if not scores_file.exists():
            commands: list[dict] = []
            train_cmd = [str(BIN / "pt-train"), str(train_xml), "--backbone", backbone, "--dev-fraction", "0.1",
                         "--seed", str(seed), "--quiet"]
            if method == "prefix":
                seconds = run(train_cmd + ["--init-text", "triples-to-text:", "-o", str(out / "prefix.npz")], commands)
                evaluate = ["--export", str(export_dir), "--prefix", str(out / "prefix.npz")]
            else:
                seconds = run(train_cmd + ["--method", "finetune", "-o", str(out / "model")], commands)
                run([str(BIN / "pt-export"), str(out / "model"), "--output", str(out / "export")], commands)
                evaluate = ["--export", str(out / "export")]
            run([str(BIN / "pt-eval"), str(test_xml), *evaluate, "--num-beams", str(num_beams),
                 "--max-new-tokens", "80", "--seen-categories", ",".join(seen_set), "-o", str(out / "eval"),
                 *(["--no-score"] if no_score else [])], commands)
            (out / "run.json").write_text(json.dumps({"train_seconds": round(seconds, 1), "commands": commands}))
            (out / "machine.json").write_text(json.dumps(machine_record()))
            shutil.rmtree(out / "model", ignore_errors=True)
            shutil.rmtree(out / "export", ignore_errors=True)
        if no_score:
            continue
        record = json.loads((out / "run.json").read_text())
        log += record["commands"]
        report = json.loads(scores_file.read_text())
        machine = machine_of(out)
        results[method] = {"all": report["scores"], **report["by_split"], "train_seconds": record["train_seconds"],
                           "machine": machine.get("machine", "not recorded")}
    if no_score:
        click.echo(f"generated in {workdir}; score with --rescore where Java is installed.", err=True)
        return
    train_examples = sum(len([x for x in e.iter("lex") if (x.text or "").strip()]) for e in train[:train_tables])
    report = {"rescored": rescore, "webnlg": str(webnlg), "backbone": backbone, "seen": seen_set,
              "unseen": [c for c in CATEGORIES if c not in seen_set], "train_tables": train_tables,
              "train_examples": train_examples, "test_per_split": test_per_split, "num_beams": num_beams,
              "seed": seed, "results": results, "commands": log}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "extrapolation.json").write_text(json.dumps(report, indent=2))
    (RESULTS / "extrapolation.md").write_text(markdown(report))
    click.echo(markdown(report), err=True)


def markdown(report: dict) -> str:
    lines = [f"# Extrapolation on WebNLG 2017 ({report['backbone']}): prefix-tuning against fine-tuning", "",
             f"Trained on {report['train_tables']} entries ({report['train_examples']} references) of the seen "
             f"categories {', '.join(report['seen'])}; tested on {report['test_per_split']} development entries "
             f"of those (S) and {report['test_per_split']} of the unseen {', '.join(report['unseen'])} (U); "
             f"{report['num_beams']} beams, lowercased BLEU.", "",
             "| method | BLEU S | BLEU U | BLEU A | METEOR S | METEOR U | METEOR A | TER S | TER U | TER A | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, r in report["results"].items():
        cells = [f"{r[split][metric]:.4f}" for metric in ("BLEU", "METEOR", "TER")
                 for split in ("seen", "unseen", "all")]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} |")
    trained = "; ".join(f"{method}: {r['machine']}" for method, r in report["results"].items())
    rescored = (" (runs made with --no-score were scored afterwards with `pt-eval --rescore -o RUN/eval`, since "
                "METEOR needs Java)") if report.get("rescored") else ""
    lines += ["", f"TER: lower is better. Trained on: {trained} (generation on ONNX Runtime's CPU provider).", "",
              f"Commands, in order{rescored}:", ""]
    lines += [f"    {c['command']}   # {c['seconds']} s" for c in report["commands"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
