"""`make demo`: fetch the default backbone and show what it writes for a sample E2E table.

No prefix yet: this is the frozen backbone alone, prompted through its chat template, the
baseline a trained prefix has to beat. Later steps add training, export and serving.
"""

from __future__ import annotations

import sys
import time

import click

# A meaning representation from the E2E NLG Challenge dev set (Novikova et al., 2017; CC BY-SA 4.0).
SAMPLE_TABLE = (
    "name[Aromi], eatType[coffee shop], food[English], customer rating[3 out of 5], "
    "area[riverside], familyFriendly[yes]"
)
INSTRUCTION = "Write one sentence for a restaurant guide that uses every field of this table:\n{table}"


@click.command()
@click.option("--backbone", default="smollm2-135m", show_default=True,
              help="Registry name, Hugging Face model folder or .gguf file.")
@click.option("--table", default=SAMPLE_TABLE, show_default=True, help="An E2E meaning representation.")
@click.option("--max-new-tokens", default=60, show_default=True, type=click.IntRange(1, 1024))
def main(backbone: str, table: str, max_new_tokens: int) -> None:
    """Fetch BACKBONE (once) and print a greedy generation for TABLE."""
    import torch

    from prefixkit.exporter import BackboneError, load_backbone

    started = time.perf_counter()
    try:
        loaded = load_backbone(backbone)
    except BackboneError as e:
        raise click.ClickException(str(e)) from None
    loaded_s = time.perf_counter() - started
    tok, model = loaded.tokenizer, loaded.model
    prompt = INSTRUCTION.format(table=table)
    if tok.chat_template:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt")
    else:
        ids = tok(prompt + "\n", return_tensors="pt").input_ids

    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    generate_s = time.perf_counter() - started
    new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True).strip()

    arch = loaded.architecture
    click.echo(f"backbone  {backbone} ({arch.model_type}, {arch.n_layers} layers, {arch.n_kv_heads} KV heads, "
               f"head_dim {arch.head_dim}) from {loaded.path}")
    click.echo(f"          fingerprint {loaded.fingerprint[:22]}…, loaded in {loaded_s:.1f} s")
    click.echo(f"table     {table}")
    click.echo(f"output    {text}")
    click.echo(f"          {len(new)} tokens in {generate_s:.2f} s ({len(new) / generate_s:.1f} tokens/s, "
               "PyTorch, greedy, no prefix yet)")


if __name__ == "__main__":
    sys.exit(main())
