"""pt-train: learn a prefix for a frozen backbone from (input, output) data."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from prefixkit.runtime.cli_options import progress_every

from .data import FORMATS, DataError, draw, load_examples, summary
from .modules import METHODS
from .trainer import DEFAULT_LR, TrainingError, TrainSettings


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Where the prefix (.npz) goes; for --method finetune, a model folder.")
@click.option("--backbone", default="smollm2-135m",
              help="Registry name, Hugging Face model folder or .gguf file (fetched the first time).")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="auto",
              help="Data format; auto goes by extension (.jsonl, .csv = E2E, .xml or folder = WebNLG, .json = DART).")
@click.option("--method", type=click.Choice(METHODS), default="prefix",
              help="prefix: key/values in every layer (the paper); prompt: input embeddings only; "
                   "finetune: all weights (a baseline).")
@click.option("--prefix-len", type=int, default=10, help="Virtual tokens (ignored with --init-text).")
@click.option("--init-text", default=None,
              help="Start the prefix from the frozen model's key/values over these words, e.g. 'table-to-text:'; "
                   "the prefix is then as long as their tokens.")
@click.option("--mid-dim", type=int, default=512, help="k: width of P' and of the reparametrisation MLP.")
@click.option("--reparam/--no-reparam", default=True, help="Train P' through the MLP (the paper) or the key/values directly.")
@click.option("--template", default="{input}\n",
              help="Prompt template joining input and output; {input} marks the input. Stored in the prefix.")
@click.option("--stop", multiple=True, help="Stop string stored in the prefix (repeatable); eos always stops.")
@click.option("--limit", type=int, default=None, help="Train on N examples drawn by table (the low-data setting).")
@click.option("--dev-fraction", type=float, default=0.1,
              help="Dev split: with --limit, this fraction of N extra examples; otherwise this fraction of the tables.")
@click.option("--dev-data", type=click.Path(exists=True, path_type=Path), default=None,
              help="A separate dev file instead of --dev-fraction.")
@click.option("--seed", type=int, default=0, help="Seeds the draw, the initialisation and the data order.")
@click.option("--epochs", type=int, default=5)
@click.option("--batch-size", type=int, default=5, help="Examples per step and process.")
@click.option("--grad-accum", type=int, default=1, help="Batches accumulated per optimizer step.")
@click.option("--lr", type=float, default=None,
              help=f"Peak learning rate [default: {DEFAULT_LR['prefix']} for prefix/prompt, {DEFAULT_LR['finetune']} for finetune].")
@click.option("--warmup-ratio", type=float, default=0.1, help="Share of the steps spent warming up linearly.")
@click.option("--weight-decay", type=float, default=0.0)
@click.option("--patience", type=int, default=2, help="Epochs without a better dev loss before stopping early.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--save-every", type=int, default=50, help="Optimizer steps between checkpoints.")
@click.option("--checkpoint-dir", type=click.Path(path_type=Path), default=None,
              help="[default: OUTPUT.checkpoint beside the output]")
@click.option("--resume", is_flag=True, help="Continue the interrupted run whose checkpoint is there.")
@click.option("--threads", type=int, default=None, help="CPU threads for PyTorch [default: all cores].")
@click.option("--quiet", is_flag=True, help="No progress bar or lines.")
@progress_every
def main(data, output, backbone, fmt, method, prefix_len, init_text, mid_dim, reparam, template, stop, limit,
         dev_fraction, dev_data, seed, epochs, batch_size, grad_accum, lr, warmup_ratio, weight_decay, patience,
         max_steps, save_every, checkpoint_dir, resume, threads, quiet, progress_every):
    """Train a prefix on DATA against a frozen backbone and write it to --output.

    \b
    pt-train e2e.csv --limit 200 --init-text "table-to-text:" -o e2e.npz
    pt-train pairs.jsonl --backbone ./my-hf-model -o user42.npz
    accelerate launch --multi_gpu --num_processes 4 -m prefixkit.training.cli pairs.jsonl -o user42.npz
    (data-parallel; on CPUs set ACCELERATE_USE_CPU=1 as well)

    Ctrl-C saves a checkpoint; run the same command with --resume to continue.
    """
    import torch

    from prefixkit.exporter.backbones import BackboneError, load_backbone

    if threads:
        torch.set_num_threads(threads)
    settings = TrainSettings(
        method=method, prefix_len=prefix_len, init_text=init_text, mid_dim=mid_dim, reparam=reparam,
        template=template, stop=list(stop), epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        warmup_ratio=warmup_ratio, weight_decay=weight_decay, patience=patience, max_steps=max_steps, seed=seed,
        save_every=save_every,
    )
    if method != "finetune" and output.suffix != ".npz":
        raise click.UsageError(f"--output {output}: a prefix file ends in .npz.")
    try:
        settings.check()
        examples = load_examples(data, fmt)
        if dev_data is not None:
            train_examples, _ = draw(examples, limit, 0.0, seed)
            dev_examples = load_examples(dev_data, fmt)
        else:
            train_examples, dev_examples = draw(examples, limit, dev_fraction, seed)
        data_summary = summary(data, fmt, train_examples, dev_examples, limit=limit, seed=seed,
                               dev_fraction=None if dev_data else dev_fraction,
                               dev_source=str(dev_data) if dev_data else None)
        loaded = load_backbone(backbone)
        from .trainer import train

        result = train(loaded, train_examples, dev_examples, output, settings, resume=resume,
                       checkpoint_dir=checkpoint_dir, data_summary=data_summary, backbone_name=backbone,
                       progress=not quiet, progress_every=progress_every)
    except (DataError, TrainingError, BackboneError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    if result.interrupted:
        sys.exit(130)
    meta = result.meta
    losses = meta["losses"]
    parts = [f"wrote {output}", f"{result.step} steps in {meta['seconds']:.0f} s"]
    if losses["dev_before"] is not None:
        parts.append(f"dev loss {losses['dev_before']:.3f} -> best {losses['dev_best']:.3f}")
    if method != "finetune":
        p = meta["parameters"]
        parts.append(f"prefix {p['prefix']:,} values ({100 * p['prefix'] / p['backbone']:.3f}% of the backbone)")
    click.echo("; ".join(parts) + ".", err=True)


if __name__ == "__main__":
    main()
