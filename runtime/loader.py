"""`load(folder)`: the generator for any export folder, decoder-only or encoder-decoder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

from .generate import Generator
from .manifest import load_manifest


def load(folder: str | os.PathLike, prefixes: Mapping[str, str | os.PathLike] | None = None,
         providers: Sequence[str] | None = None, threads: int | None = None) -> Generator:
    """The generator for an export folder, with the named prefix files loaded (each checked
    against the backbone). Its `exported` is the loaded export.

    providers: ONNX Runtime execution providers, in order of preference (default: the CPU's).
    threads: ONNX Runtime's intra-op threads (default: all cores)."""
    from .seq2seq import ExportedSeq2Seq, Seq2SeqGenerator
    from .session import ExportedBackbone

    if load_manifest(Path(folder)).graph.kind == "seq2seq":
        generator = Seq2SeqGenerator(ExportedSeq2Seq(folder, providers=providers, threads=threads))
    else:
        generator = Generator(ExportedBackbone(folder, providers=providers, threads=threads))
    for name, path in (prefixes or {}).items():
        generator.add_prefix(name, path)
    return generator
