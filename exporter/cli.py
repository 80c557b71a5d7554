"""pt-export: write a backbone to ONNX once, for the runtime."""

from __future__ import annotations

from pathlib import Path

import click

from prefixkit.runtime.cli_options import Renamed

from .backbones import DEFAULT_BACKBONE, REGISTRY, BackboneError
from .onnx_export import DTYPES, GRAPHS, QUANTIZATIONS, ExportError, export_backbone


def default_out(backbone: str, quantize: str | None, dtype: str) -> Path:
    name = backbone if backbone in REGISTRY else Path(backbone).expanduser().resolve().stem
    suffix = f"-{quantize}" if quantize else ("-fp16" if dtype == "fp16" else "")
    return Path("exports") / f"{name}{suffix}"


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("backbone", default=DEFAULT_BACKBONE)
@click.option("-o", "--output", "out", cls=Renamed, old=("--out",), type=click.Path(file_okay=False, path_type=Path),
              help="Export folder. Default: exports/NAME, with -QUANTIZE (-int4, -int4-a16, ...) or -fp16 appended.")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS),
              help="Weight quantisation (block 32), the output projection included; -a16 / -a8: prefixkit's "
                   "CPU kernel also rounds activations to 16- / 8-bit integers (faster, not exact; see the README).")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="fp16 is for GPU execution providers; parity is checked where the CPU can run it.")
@click.option("--graph", type=click.Choice(GRAPHS), default="auto", show_default=True,
              help="fused: ONNX Runtime GenAI's GroupQueryAttention graph (Llama-family, fp32/int4/int8); "
                   "optimum: optimum-onnx's export (every supported backbone, fp16); traced: prefixkit's own (Gemma 2 "
                   "and 3); auto: traced for Gemma, else fused where it applies, else optimum.")
@click.option("--optimize/--no-optimize", default=True, show_default=True,
              help="Save ONNX Runtime's offline graph optimisations with the model.")
@click.option("--force", is_flag=True, help="Export again even if the output folder already holds this export.")
def main(backbone: str, out: Path | None, quantize: str | None, dtype: str, graph: str, optimize: bool,
         force: bool) -> None:
    """Export BACKBONE (registry name, Hugging Face folder or .gguf file; default
    smollm2-135m) to ONNX with past-key-value inputs: model.onnx, manifest.json and
    tokenizer.json, checked against PyTorch with mixed prefixes in a padded batch.

    Any prefix trained against the same backbone works with the export."""
    out = out or default_out(backbone, quantize, dtype)
    try:
        manifest = export_backbone(backbone, out, quantize=quantize, dtype=dtype, optimize=optimize, force=force,
                                   graph=graph)
    except (BackboneError, ExportError) as e:
        raise click.ClickException(str(e)) from None
    size = manifest.source.get("model_bytes", 0) / 1e6
    parity = manifest.parity
    rel = f"{parity['relative']:.1e}" if "relative" in parity else "not checked"
    click.echo(f"{out}  {manifest.graph.kind}  {size:.0f} MB  parity {rel}  fingerprint {manifest.fingerprint[:22]}…")


if __name__ == "__main__":
    main()
