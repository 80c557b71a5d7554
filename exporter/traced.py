"""prefixkit's own decoder-only graph: the Hugging Face model's forward, traced with torch.onnx,
with its attention masks built in the graph from the runtime's inputs.

For the families whose other graphs do not reproduce PyTorch: Gemma 2 (soft-capped attention,
sliding-window layers) and Gemma 3 (sliding and full layers, each with its own rotary base).
Optimum's export builds the sliding masks from cache indices, which a batch with padding
inside its rows (the runtime's [pad, prefix, pad, prompt] layout) breaks, and the model
builder's graph differs beyond rounding. Here the model's own code runs every operation, and
only the masks are ours, from positions:

- a key is seen by a query where its mask entry is 1 and its position (the count of ones
  before it) is at most the query's;
- a sliding-window layer also needs query position − key position < the window, as Hugging
  Face's sliding mask has it for an unpadded row.

Positions rather than indices make a padded row equal the row alone. The interface is
optimum's (input_ids, attention_mask, position_ids, past_key_values.N.key/value → logits,
present.N.key/value), so the runtime runs it as it runs optimum's graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from prefixkit.runtime.backbone import Architecture
from prefixkit.runtime.manifest import MODEL_FILE

OPSET = 17


def masks(attention_mask: torch.Tensor, position_ids: torch.Tensor, window: int | None) -> dict[str, torch.Tensor]:
    """Additive masks [B, 1, T, S] for full and sliding-window layers, from the mask [B, S]
    over past and new tokens and the new tokens' positions [B, T] (the rule above)."""
    key_positions = attention_mask.cumsum(-1) - 1  # as runtime/cache.py's positions_from_mask
    query = position_ids[:, None, :, None]
    keys = key_positions[:, None, None, :]
    seen = attention_mask.bool()[:, None, None, :] & (keys <= query)
    near = seen if window is None else seen & (query - keys < window)
    zero = torch.zeros((), dtype=torch.float32)
    lowest = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
    return {"full_attention": torch.where(seen, zero, lowest), "sliding_attention": torch.where(near, zero, lowest)}


class TracedDecoder(nn.Module):
    """The backbone's forward with optimum's inputs and outputs, past and present flattened
    as (key 0, value 0, key 1, ...), each [B, H, S, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers
        self.window = getattr(model.config, "sliding_window", None)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        # No config: every layer keeps all its positions; the masks do the windowing.
        cache = DynamicCache()
        for layer in range(self.n_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.model(input_ids=input_ids, attention_mask=masks(attention_mask, position_ids, self.window),
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def export_traced(model: nn.Module, architecture: Architecture, folder: Path) -> None:
    """Write folder/model.onnx: `model`'s forward traced (eager attention, where soft-capping
    lives), batch, new tokens and past positions left open."""
    L, H, D = architecture.n_layers, architecture.n_kv_heads, architecture.head_dim
    B, P, T = 2, 3, 5
    inputs = ["input_ids", "attention_mask", "position_ids"]
    outputs = ["logits"]
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "positions"},
            "position_ids": {0: "batch", 1: "tokens"}, "logits": {0: "batch", 1: "tokens"}}
    for layer in range(L):
        for part in ("key", "value"):
            past, present = f"past_key_values.{layer}.{part}", f"present.{layer}.{part}"
            inputs.append(past)
            outputs.append(present)
            axes[past] = {0: "batch", 2: "past"}
            axes[present] = {0: "batch", 2: "positions"}
    example = (
        torch.ones(B, T, dtype=torch.int64),
        torch.ones(B, P + T, dtype=torch.int64),
        torch.arange(P, P + T).repeat(B, 1),
        *(torch.zeros(B, H, P, D) for _ in range(2 * L)),
    )
    folder.mkdir(parents=True, exist_ok=True)
    implementation = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            torch.onnx.export(TracedDecoder(model), example, str(folder / MODEL_FILE), input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    finally:
        model.config._attn_implementation = implementation
