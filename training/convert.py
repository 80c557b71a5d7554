"""pt-convert: a PEFT prefix-tuning adapter as a prefix file for its backbone.

PEFT keeps a prefix-tuning adapter as `adapter_config.json` and the prompt encoder's weights;
with `prefix_projection` the saved weights are already the MLP's output. PEFT's own
`get_prompt` turns them into the past key/values it feeds the model, once, here: those are the
prefix, [L, H, P, D] per key and value, checked against the backbone's KV heads and head size
(PEFT has sized prefixes by attention heads for some families), and written with the backbone's
fingerprint like any pt-train prefix.

    pt-convert path/to/peft-adapter -o user42.npz [--backbone NAME_OR_FOLDER]
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np


class ConvertError(ValueError):
    """An adapter that cannot become a prefix file; the message says why."""


def convert_peft(adapter: str | Path, output: str | Path, backbone: str | None = None,
                 template: str | None = None) -> Path:
    """Write `adapter`'s prefix to `output`; `backbone` defaults to the adapter's base model."""
    import torch
    from peft import PeftConfig, PeftModel

    from prefixkit.exporter.backbones import load_backbone, say
    from prefixkit.runtime.prefix import Prefix, make_meta, save_prefix
    from prefixkit.runtime.template import check_template

    adapter = Path(adapter)
    try:
        config = PeftConfig.from_pretrained(str(adapter))
    except (OSError, ValueError) as e:
        raise ConvertError(f"{adapter} is not a PEFT adapter folder ({str(e).splitlines()[0][:200]}).") from None
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    if kind != "PREFIX_TUNING":
        raise ConvertError(f"{adapter} is a {kind} adapter; pt-convert takes PEFT prefix tuning (PREFIX_TUNING).")
    if template is not None:
        check_template(template)
    source = backbone or config.base_model_name_or_path
    if not source:
        raise ConvertError(f"{adapter} names no base model; give it with --backbone.")
    loaded = load_backbone(source)
    say(f"running the adapter's prefix encoder once ({config.num_virtual_tokens} virtual tokens)")
    model = PeftModel.from_pretrained(loaded.model, str(adapter)).eval()
    with torch.no_grad():
        prompt = model.get_prompt(batch_size=1)
    if hasattr(prompt, "layers"):  # a transformers Cache
        pairs = [(layer.keys, layer.values) for layer in prompt.layers]
    else:  # the legacy form: per layer (key, value) or one stacked tensor per layer
        pairs = [(layer[0], layer[1]) for layer in prompt]
    key = np.stack([k[0].float().numpy() for k, _ in pairs])
    value = np.stack([v[0].float().numpy() for _, v in pairs])
    a = loaded.architecture
    want = (a.n_layers, a.n_kv_heads, config.num_virtual_tokens, a.head_dim)
    if key.shape != want or value.shape != want:
        raise ConvertError(
            f"the adapter's key/values are {list(key.shape)} per key and value, but {source} takes "
            f"[layers {a.n_layers}, KV heads {a.n_kv_heads}, positions {config.num_virtual_tokens}, head size "
            f"{a.head_dim}]; the adapter was made for another backbone, or sized by attention heads."
        )
    meta = make_meta(loaded.fingerprint, config.num_virtual_tokens, method="prefix",
                     backbone=str(source), converted_from={"peft_adapter": str(adapter), "peft_type": kind},
                     **({"template": template} if template is not None else {}))
    return save_prefix(output, Prefix(key, value, meta))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("adapter", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The prefix file to write (.npz).")
@click.option("--backbone", default=None,
              help="The adapter's base model: registry name, Hub id, folder or .gguf [default: the adapter's own].")
@click.option("--template", default=None, help="Prompt template to store with the prefix, '{input}' marking the input.")
def main(adapter: Path, output: Path, backbone: str | None, template: str | None) -> None:
    """Turn a PEFT prefix-tuning adapter into a prefix file for its backbone.

    \b
    pt-convert path/to/peft-adapter -o user42.npz
    pt-serve --export exports/smollm2-135m --prefix user42.npz
    """
    from prefixkit.exporter.backbones import BackboneError

    if output.suffix != ".npz":
        raise click.UsageError(f"--output {output}: a prefix file ends in .npz.")
    try:
        path = convert_peft(adapter, output, backbone, template)
    except (ConvertError, BackboneError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    print(f"wrote {path}", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
