"""PyTorch reference computations: what a prefix means in Hugging Face terms, as the export
parity check and the tests use it. Each is plain transformers, checked in the tests against
running prefix text and tokens as one sequence."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache


def kv_of_text(model, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Run the model over ids [1, P]; return its cache as key, value arrays [L, H, P, D]."""
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    keys = np.stack([layer.keys[0].numpy() for layer in cache.layers])
    values = np.stack([layer.values[0].numpy() for layer in cache.layers])
    return keys, values


def logits_after_prefix(model, key: np.ndarray | None, value: np.ndarray | None, ids: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] for ids [1, T] with a prefix [L, H, P, D] given as past key values:
    positions start at P and the attention mask covers prefix + tokens (the design's rule).
    Without a prefix (key None), plain logits of ids."""
    if key is None:
        with torch.no_grad():
            return model(ids).logits[0]
    P, T = key.shape[2], ids.shape[1]
    cache = DynamicCache(
        ddp_cache_data=[
            (torch.from_numpy(np.asarray(k, np.float32))[None], torch.from_numpy(np.asarray(v, np.float32))[None])
            for k, v in zip(key, value)
        ]
    )
    with torch.no_grad():
        out = model(
            ids,
            past_key_values=cache,
            attention_mask=torch.ones(1, P + T, dtype=torch.long),
            position_ids=torch.arange(P, P + T)[None],
            use_cache=True,
        )
    return out.logits[0]
