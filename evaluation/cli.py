"""pt-eval: generate over a test set with the runtime and score it with the field's metrics."""

from __future__ import annotations

import dataclasses
import datetime
import json
import random
import time
from pathlib import Path

import click

from prefixkit.runtime.cli_options import Renamed, progress_every
from prefixkit.runtime.files import atomic_write
from prefixkit.runtime.manifest import FINETUNE_RECORD
from prefixkit.runtime.template import apply_template
from prefixkit.training.data import FORMATS, DataError, load_examples, tables

from .metrics import by_group, data_to_text_scores, e2e_scores, rouge_scores

# The categories of WebNLG 2017's training data; its test set adds five unseen ones.
WEBNLG_SEEN = ("Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
               "SportsTeam", "University", "WrittenWork")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("data", type=click.Path(exists=True, path_type=Path), required=False)
@click.option("--export", "backbone", cls=Renamed, old=("--backbone",),
              type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Export folder (pt-export) of the backbone, or of a fine-tuned model.")
@click.option("--prefix", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The prefix to evaluate; without it, the model alone (e.g. a fine-tuned export).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto")
@click.option("--metrics", type=click.Choice(["auto", "e2e", "webnlg", "dart", "rouge"]), default="auto",
              help="auto: e2e for E2E CSV, webnlg for WebNLG XML, dart otherwise; rouge: ROUGE-1/2/L "
                   "(summarisation, as the paper's BART experiments).")
@click.option("--limit", type=int, default=None, help="Evaluate on this many inputs (tables), drawn with --seed.")
@click.option("--seed", type=int, default=0)
@click.option("--template", default=None,
              help="Prompt template [default: the prefix's, a fine-tuned model's record, or '{input}'].")
@click.option("--num-beams", type=int, default=5)
@click.option("--length-penalty", type=float, default=1.0)
@click.option("--max-new-tokens", type=int, default=64)
@click.option("--no-repeat-ngram-size", type=int, default=0)
@click.option("--batch-size", type=int, default=8, help="Inputs generated together.")
@click.option("--seen-categories", default=",".join(WEBNLG_SEEN),
              help="WebNLG categories counted as seen (comma-separated); the others are unseen.")
@click.option("--threads", type=int, default=None)
@click.option("--no-score", is_flag=True,
              help="Only generate (no Java needed); score later with --rescore, e.g. on another machine.")
@click.option("--rescore", is_flag=True, help="Score the generations a --no-score run left in --output (DATA and "
              "--export are not needed then).")
@click.option("-o", "--output", "out", cls=Renamed, old=("--out",), type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for generations.jsonl, scores.json and summary.md.")
@progress_every
def main(data, backbone, prefix, fmt, metrics, limit, seed, template, num_beams, length_penalty, max_new_tokens,
         no_repeat_ngram_size, batch_size, seen_categories, threads, no_score, rescore, out, progress_every):
    """Generate for every input of DATA and score the outputs against all its references.

    \b
    pt-eval e2e_test.csv --export exports/smollm2-135m --prefix e2e.npz -o results/e2e
    pt-eval webnlg/dev --export exports/smollm2-135m --prefix webnlg.npz -o results/webnlg
    """
    if rescore:
        return _rescore(out)
    if data is None or backbone is None:
        raise click.UsageError("DATA and --export are needed (except with --rescore).")
    from prefixkit.runtime.generate import GenerationSettings
    from prefixkit.runtime.prefix import PrefixFileError
    from prefixkit.runtime import load
    from prefixkit.runtime.progress import Progress

    try:
        examples = load_examples(data, fmt)
        groups = list(tables(examples).values())
        if limit is not None:
            random.Random(seed).shuffle(groups)
            groups = groups[:limit]
        generator = load(backbone, threads=threads)
        exported = generator.exported
        meta = {}
        if prefix is not None:
            meta = generator.add_prefix("evaluated", prefix).meta
        template = template or meta.get("template") or _finetune_template(exported) or "{input}"
        settings = GenerationSettings(max_new_tokens=max_new_tokens, num_beams=num_beams,
                                      length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size).check()
    except (DataError, PrefixFileError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    kind = metrics if metrics != "auto" else {"e2e": "e2e", "webnlg": "webnlg"}.get(_format_of(data, fmt), "dart")
    name = "evaluated" if prefix is not None else None
    if prefix is not None and template != meta.get("template"):
        generator.prefixes[name].meta["template"] = template
    outputs: list[str] = []
    started = time.perf_counter()
    bar = Progress(len(groups), "input", "generating", every_s=progress_every)
    try:
        for start in range(0, len(groups), batch_size):
            chunk = groups[start:start + batch_size]
            if prefix is None:
                requests = [(None, apply_template(template, g[0].input)) for g in chunk]
            else:
                requests = [(name, g[0].input) for g in chunk]
            try:
                completions = generator.complete(requests, settings)
            except ValueError as e:
                raise click.ClickException(str(e)) from None
            outputs += [c.text.strip() for c in completions]
            bar.update(len(chunk), tokens=sum(len(c.token_ids) for c in completions))
    finally:
        bar.close()
    generating = time.perf_counter() - started
    references = [[e.output for e in g] for g in groups]
    report = {
        "scores": None,
        "by_split": {},
        "inputs": len(groups),
        "references": sum(len(r) for r in references),
        "data": {"source": str(data), "format": _format_of(data, fmt), "limit": limit, "seed": seed},
        "settings": {**dataclasses.asdict(settings), "template": template, "metrics": kind,
                     "batch_size": batch_size, "seen_categories": seen_categories},
        "backbone": {"folder": str(backbone), "fingerprint": exported.manifest.fingerprint,
                     "dtype": exported.manifest.dtype, "quantization": exported.manifest.quantization},
        "prefix": {"file": str(prefix), "meta": {k: v for k, v in meta.items() if k != "losses"}} if prefix else None,
        "generation_seconds": round(generating, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = [{"input": g[0].input, "output": output, "references": refs, **({"category": g[0].category}
                                                                          if g[0].category else {})}
            for g, output, refs in zip(groups, outputs, references)]
    out.mkdir(parents=True, exist_ok=True)
    if no_score:
        _write(out, report, rows)
        click.echo(f"wrote {len(rows)} generations to {out / 'generations.jsonl'}; score them with "
                   f"`pt-eval --rescore -o {out}` where Java is installed.", err=True)
        return
    _score(report, rows)
    _write(out, report, rows)
    click.echo(summary(report), err=True)


def _rescore(out: Path) -> None:
    """Score the generations a `--no-score` run left in OUT."""
    try:
        report = json.loads((out / "scores.json").read_text(encoding="utf-8"))
        rows = [json.loads(line) for line in (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError) as e:
        raise click.ClickException(f"{out}: no generations of a pt-eval run to score ({e}).") from None
    if len(rows) != report.get("inputs"):
        raise click.ClickException(f"{out}: generations.jsonl has {len(rows)} rows, scores.json says "
                                   f"{report.get('inputs')} inputs.")
    _score(report, rows)
    _write(out, report, rows)
    click.echo(summary(report), err=True)


def _score(report: dict, rows: list[dict]) -> None:
    """Fill report["scores"], report["by_split"] and each row's per-input scores."""
    kind = report["settings"]["metrics"]
    outputs = [r["output"] for r in rows]
    references = [r["references"] for r in rows]
    click.echo(f"scoring {len(outputs)} outputs ({kind} metrics) …", err=True)
    if kind == "e2e":
        corpus, per_input = e2e_scores(outputs, references)
        grouped = {}
    elif kind == "rouge":
        corpus, per_input = rouge_scores(outputs, references)
        grouped = {}
    else:
        lowercase = kind == "webnlg"

        def scorer(h, r):
            return data_to_text_scores(h, r, lowercase=lowercase)

        corpus, per_input = scorer(outputs, references)
        grouped = {}
        if kind == "webnlg":
            seen = {c.strip() for c in report["settings"]["seen_categories"].split(",") if c.strip()}
            labels = ["seen" if r.get("category") in seen else "unseen" for r in rows]
            grouped = by_group(labels, scorer, outputs, references)
    report["scores"], report["by_split"] = corpus, grouped
    for i, row in enumerate(rows):
        row["scores"] = {k: v[i] for k, v in per_input.items()}


def _write(out: Path, report: dict, rows: list[dict]) -> None:
    with atomic_write(out / "generations.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with atomic_write(out / "scores.json", "w") as f:
        f.write(json.dumps(report, indent=2, ensure_ascii=False))
    if report["scores"] is not None:
        with atomic_write(out / "summary.md", "w") as f:
            f.write(summary(report))


def _format_of(data: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if data.is_dir() or data.suffix.lower() == ".xml":
        return "webnlg"
    return {".csv": "e2e", ".jsonl": "jsonl", ".json": "dart"}.get(data.suffix.lower(), "jsonl")


def _finetune_template(exported) -> str | None:
    record = Path(exported.manifest.source.get("path", "")) / FINETUNE_RECORD
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8")).get("template")
    return None


def summary(report: dict) -> str:
    s = report["settings"]
    lines = [f"# pt-eval: {report['data']['source']}", "",
             f"{report['inputs']} inputs, {report['references']} references; {s['num_beams']} beams, length penalty "
             f"{s['length_penalty']}, at most {s['max_new_tokens']} new tokens; template {s['template']!r}; "
             f"prefix {report['prefix']['file'] if report['prefix'] else 'none'}.", "",
             "| split | " + " | ".join(report["scores"]) + " |", "|---|" + "---|" * len(report["scores"])]
    rows = [("all", report["scores"])] + sorted(report["by_split"].items())
    for name, scores in rows:
        lines.append(f"| {name} | " + " | ".join(f"{scores.get(k, float('nan')):.4f}" for k in report["scores"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
