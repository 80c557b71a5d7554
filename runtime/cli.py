"""pt-generate: generate with an exported backbone and any number of prefixes, torch-free."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .generate import GenerationSettings
from .manifest import ManifestError
from .prefix import PrefixFileError
from .loader import load


def _requests(inputs: tuple[str, ...], input_file, names: list[str]) -> list[tuple[str | None, str]]:
    """Each input line, with every --prefix (or none); a JSON line {"input": ..., "prefix": ...}
    names its own prefix."""
    if inputs:
        lines = list(inputs)
    else:
        stream = input_file if input_file is not None else sys.stdin
        if stream is sys.stdin and sys.stdin.isatty():
            raise click.UsageError("give inputs as arguments, with --input-file, or on standard input.")
        lines = [line.rstrip("\n") for line in stream if line.strip()]
    requests = []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
                requests.append((item.get("prefix"), str(item["input"])))
                continue
            except (json.JSONDecodeError, KeyError, AttributeError):
                raise click.UsageError(f"input line {number} looks like JSON but is not {{\"input\": ..., \"prefix\": ...}}.")
        requests.extend((name, line) for name in (names or [None]))
    return requests


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1)
@click.option("--prefix", "prefix_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A prefix file (.npz); repeat for several. Each is named by its file name without .npz; "
                   "every input is generated with every prefix.")
@click.option("--input-file", type=click.File("r", encoding="utf-8"),
              help="Inputs, one per line (default: standard input).")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(1))
@click.option("--min-new-tokens", default=0, show_default=True, type=click.IntRange(0))
@click.option("--num-beams", default=1, show_default=True, type=click.IntRange(1), help="1 is greedy (or sampling).")
@click.option("--length-penalty", default=1.0, show_default=True, help="Beam scores are divided by length ** this.")
@click.option("--early-stopping", type=click.Choice(["false", "true", "never"]), default="false", show_default=True)
@click.option("--no-repeat-ngram-size", default=0, show_default=True, type=click.IntRange(0))
@click.option("--sample", is_flag=True, help="Sample instead of taking the most likely token.")
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0))
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--seed", type=int, help="Seed for --sample.")
@click.option("--stop", multiple=True, help="Stop when the output contains this string (repeatable); it is cut off.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Rows decoded together.")
@click.option("--threads", type=click.IntRange(1), help="ONNX Runtime threads (default: all cores).")
@click.option("--provider", "providers", multiple=True,
              help="ONNX Runtime execution provider, in order of preference (repeatable; default: "
                   "$PREFIXKIT_PROVIDERS, else CPUExecutionProvider). CUDA and TensorRT need prefixkit[gpu].")
def main(export, inputs, prefix_files, input_file, max_new_tokens, min_new_tokens, num_beams, length_penalty,
         early_stopping, no_repeat_ngram_size, sample, temperature, top_k, top_p, seed, stop, batch_size,
         threads, providers) -> None:
    """Generate with the exported backbone EXPORT (a pt-export folder) for each INPUT, or each
    line of --input-file or standard input. Writes one JSON object per line: input, prefix,
    text, token_ids, finish_reason, score."""
    settings = GenerationSettings(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams,
        length_penalty=length_penalty, early_stopping={"false": False, "true": True}.get(early_stopping, "never"),
        no_repeat_ngram_size=no_repeat_ngram_size, do_sample=sample, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, stop=tuple(stop),
    )
    try:
        settings.check()
        generator = load(export, providers=providers or None, threads=threads)
        names = []
        for path in prefix_files:
            generator.add_prefix(path.stem, path)
            names.append(path.stem)
        requests = _requests(inputs, input_file, names)
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            started = time.perf_counter()
            completions = generator.complete(chunk, settings)
            seconds = time.perf_counter() - started
            for (name, text), c in zip(chunk, completions):
                record = {"input": text, "prefix": name, "text": c.text, "token_ids": c.token_ids,
                          "finish_reason": c.finish_reason, "score": c.score, "batch_seconds": round(seconds, 4)}
                click.echo(json.dumps(record, ensure_ascii=False))
    except (ManifestError, PrefixFileError, ValueError) as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
