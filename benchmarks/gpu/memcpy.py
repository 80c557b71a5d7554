"""How many Memcpy nodes ONNX Runtime puts into an export's graph on a provider: each one moves a
tensor between host and device memory on every run (a decode step is one run of the graph).

    python benchmarks/gpu/memcpy.py EXPORT [EXPORT ...] [--provider CUDAExecutionProvider] [--expect-none]

ONNX Runtime writes the graph it runs, after placing each node on a provider and inserting the
copies between them, to `optimized_model_filepath`; the Memcpy nodes are counted there. With
--expect-none it exits 1 unless every export named last has none (the fp16 fused export's
decode step must not copy).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import click


def memcpy_nodes(folder: Path, provider: str) -> dict[str, int]:
    import onnx
    import onnxruntime as ort

    from prefixkit.runtime.manifest import MODEL_FILE, load_manifest
    from prefixkit.runtime.session import checked_providers

    manifest = load_manifest(folder)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "placed.onnx")
        # the saved graph's weights beside it, not inlined past protobuf's 2 GB
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "placed.onnx.data")
        ort.InferenceSession(str(folder / MODEL_FILE), options,
                             providers=checked_providers([provider, "CPUExecutionProvider"], manifest))
        model = onnx.load(str(Path(tmp) / "placed.onnx"), load_external_data=False)
    kinds: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type.startswith("Memcpy"):
            kinds[node.op_type] = kinds.get(node.op_type, 0) + 1
    return {"total": sum(kinds.values()), **kinds}


@click.command()
@click.argument("exports", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--provider", default="CUDAExecutionProvider", show_default=True)
@click.option("--expect-none", is_flag=True, help="Exit 1 unless the last export named has no Memcpy node.")
def main(exports, provider, expect_none):
    counts = {str(folder): memcpy_nodes(folder, provider) for folder in exports}
    print(json.dumps({"provider": provider, "memcpy_nodes": counts}, indent=2))
    if expect_none and counts[str(exports[-1])]["total"]:
        print(f"{exports[-1]}: {counts[str(exports[-1])]['total']} Memcpy nodes on {provider}, expected none",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
