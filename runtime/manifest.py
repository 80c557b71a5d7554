"""The export manifest (`exports/NAME/manifest.json`): what the runtime needs to know of an
exported backbone without torch, written once by pt-export.

Formats: 2 is written; 1 is read too. A format 1 manifest lacks graph.logits, graph.attention
and graph.weights_beside, which then take the values those exports had (FORMAT_1_GRAPH), and
may hold graph.prefill, which nothing reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from .backbone import Architecture
from .files import atomic_write

MANIFEST_VERSION = 2  # the format written
READ_VERSIONS = (1, 2)
FORMAT_1_GRAPH = {"logits": "all", "attention": "", "weights_beside": False}
MODEL_FILE = "model.onnx"
SEQ2SEQ_FILES = ("encoder.onnx", "decoder.onnx")  # an encoder-decoder export's two graphs
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FINGERPRINT_METADATA = "prefixkit.fingerprint"  # also stamped into model.onnx's metadata
ATTENTION_KERNEL = "prefixkit.Attention"  # GraphSpec.attention of graphs that use it
# GraphSpec.attention of fp32 fused graphs whose attention that kernel does not take (a sliding
# window, separate q, k, v); "" in fp32 fused exports made before the kernel.
ATTENTION_GQA = "com.microsoft.GroupQueryAttention"
WEIGHTS_SUFFIX = ".data"  # a graph's weights file beside it: model.onnx.data
# pt-train --method finetune writes this beside the fine-tuned model (its training record);
# pt-eval reads it from the folder an export was made from.
FINETUNE_RECORD = "prefixkit-finetune.json"


class ManifestError(ValueError):
    """An export folder that cannot be used; the message names it and the problem."""


@dataclasses.dataclass
class GraphSpec:
    """The ONNX graph's interface. Past and present names take {layer}."""

    # "optimum-decoder-with-past", "genai-gqa" (fused GroupQueryAttention), "prefixkit-traced"
    # (exporter/traced.py: optimum's interface) or "seq2seq"
    kind: str
    inputs: list[str]
    outputs: list[str]
    # How rows of different lengths share a batch. "left": caches and tokens left-padded,
    # positions as an input. "right": GroupQueryAttention reads each row's length from the
    # mask's count, so caches are right-padded, and a prefill after a non-empty cache (the
    # prefix) runs one row at a time.
    padding: str = "left"
    past_key: str = "past_key_values.{layer}.key"
    past_value: str = "past_key_values.{layer}.value"
    present_key: str = "present.{layer}.key"
    present_value: str = "present.{layer}.value"
    opset: int = 0
    # "last": logits [B, 1, V], each row's last position only (what generation reads); "all":
    # every position (encoder-decoder graphs).
    logits: str = "all"
    # "prefixkit.Attention": the fused graph's GroupQueryAttention nodes are prefixkit's operator
    # (its CPU kernel where the library is registered, the node itself elsewhere); "" in other
    # graphs (format 1 quantised exports say it in quantization.attention_nodes).
    attention: str = ""
    # Whether each graph file's weights are in the file of its name + WEIGHTS_SUFFIX beside it,
    # or inside it.
    weights_beside: bool = False


@dataclasses.dataclass
class Manifest:
    fingerprint: str  # of the backbone the graph was exported from
    architecture: Architecture
    graph: GraphSpec
    dtype: str  # "float32" or "float16": the past/present and logits type
    quantization: dict[str, Any] | None  # None, or {"method": "int4"|"int8"|"int4-a16"|..., ...}
    optimization: dict[str, Any]
    eos_token_ids: list[int]
    pad_token_id: int
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None  # encoder-decoder backbones: the decoder's first token
    parity: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    created: str = ""
    format: int = MANIFEST_VERSION

    @property
    def max_positions(self) -> int:
        return self.architecture.max_positions

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """From a manifest's JSON, of any format in READ_VERSIONS (KeyError where a field
        its format has is missing)."""
        data = dict(data)
        graph = dict(data["graph"])
        if data["format"] == 1:
            graph = {**FORMAT_1_GRAPH, **graph}
            graph.pop("prefill", None)
        for name in FORMAT_1_GRAPH:
            if name not in graph:
                raise KeyError(f"graph.{name}")
        data["architecture"] = Architecture(**data["architecture"])
        data["graph"] = GraphSpec(**graph)
        data["format"] = MANIFEST_VERSION  # read into this format's fields
        return cls(**data)


def save_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_FILE
    with atomic_write(path, "w") as f:
        json.dump(manifest.to_dict(), f, indent=2, ensure_ascii=False)
        f.write("\n")
    return path


def load_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check an export folder's manifest; the model and tokenizer must be there."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"{folder}: not an exported backbone (no {MANIFEST_FILE}); create one with pt-export."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e}); export the backbone again.") from None
    if not isinstance(data, dict) or data.get("format") not in READ_VERSIONS:
        version = data.get("format") if isinstance(data, dict) else None
        raise ManifestError(
            f"{path}: manifest format {version!r} is not one this prefixkit reads "
            f"(it reads formats {', '.join(map(str, READ_VERSIONS))}); export the backbone again with this version."
        )
    try:
        manifest = Manifest.from_dict(data)
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{path}: incomplete manifest ({e}); export the backbone again.") from None
    graphs = SEQ2SEQ_FILES if manifest.graph.kind == "seq2seq" else (MODEL_FILE,)
    weights = [name + WEIGHTS_SUFFIX for name in graphs] if manifest.graph.weights_beside else []
    for name in (*graphs, *weights, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise ManifestError(f"{folder}: {name} is missing; export the backbone again.")
    return manifest
