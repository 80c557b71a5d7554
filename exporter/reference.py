"""PyTorch reference computations: what a prefix means in Hugging Face terms, as the export
parity check and the tests use it. Each is plain transformers, checked in the tests against
running prefix text and tokens as one sequence."""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from prefixkit.runtime.cache import token_positions


def kv_of_text(model, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Run the model over ids [1, P]; return its cache as key, value arrays [L, H, P, D].

    Every layer keeps all P positions, sliding-window layers too (the cache Hugging Face makes
    for such a model would keep only the window's last positions): a prefix is positions
    0..P-1 of every layer, and a window masks them as it masks any past position."""
    with torch.no_grad():
        cache = model(ids, use_cache=True, past_key_values=DynamicCache()).past_key_values
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
            position_ids=torch.from_numpy(token_positions(P, T))[None],
            use_cache=True,
        )
    return out.logits[0]


def hf_generate(model, prefix, ids: list[int], max_new_tokens: int, num_beams: int = 1, static: bool = False,
                **kw) -> list[int]:
    """Hugging Face generate with the prefix as past key values. generate feeds only the
    tokens after the cache, so the cached positions get placeholder ids, out of the vocabulary
    so that no n-gram of real tokens can match them (a prefix has no tokens); positions come
    from the attention mask and start at P. The cache is expanded per beam by hand. `static`:
    a StaticCache of the generation's length holds it (what a compiled forward needs)."""
    P = 0 if prefix is None else prefix.prefix_len
    input_ids = torch.tensor([[model.config.vocab_size + 1] * P + list(ids)], device=model.device)
    kwargs = dict(
        attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, num_beams=num_beams,
        do_sample=False, pad_token_id=model.generation_config.pad_token_id, **kw,
    )
    layers = [] if prefix is None else [
        (torch.from_numpy(np.asarray(k, np.float32)).to(model.device, model.dtype)[None].repeat_interleave(num_beams, 0),
         torch.from_numpy(np.asarray(v, np.float32)).to(model.device, model.dtype)[None].repeat_interleave(num_beams, 0))
        for k, v in zip(prefix.key, prefix.value)
    ]
    if static:
        from transformers import StaticCache

        cache = StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + max_new_tokens)
        for layer, (k, v) in enumerate(layers):
            cache.update(k, v, layer, {"cache_position": torch.arange(P, device=model.device)})
        kwargs["past_key_values"] = cache
    elif layers:
        kwargs["past_key_values"] = DynamicCache(ddp_cache_data=layers)
    with torch.no_grad():
        out = model.generate(input_ids, **kwargs)[0, input_ids.shape[1]:].tolist()
    eos = kw.get("eos_token_id", model.generation_config.eos_token_id)
    eos = [eos] if isinstance(eos, int) else eos
    first = min((out.index(e) for e in eos if e in out), default=None)
    return out if first is None else out[: first + 1]
