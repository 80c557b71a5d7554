"""Encoder-decoder backbones (BART, T5) with a prefix in each of their three attentions
(Li & Liang 2021, section 4.2: z = [PREFIX; x; PREFIX'; y]).

Hugging Face's encoders take no past key/values and its cross-attention cache cannot be
pre-filled, so `PrefixSeq2Seq` runs the model's own weights through one forward written here,
used for training, for the export and as the PyTorch reference. With empty prefixes it equals
the Hugging Face forward; with a decoder prefix only, Hugging Face with that prefix as past
(tests/test_seq2seq.py checks both).

Letters: B batch, S source tokens, T target tokens, P prefix length (padded to the batch's
longest; the prefix mask [B, P] says which slots are real), Le/Ld encoder/decoder layers,
H heads, D head dim. Stacked key/values are [L, B, H, length, D].

Conventions shared with the runtime:
- prefixes are left-padded to the batch's P, source tokens right-padded, so every row's real
  prefix ends where its tokens begin; T5's relative positions then match the row alone.
- encoder tokens take positions 0.. (BART's learned positions, as Hugging Face does);
  decoder tokens take positions from the row's own decoder prefix length P (as Hugging Face
  does with the prefix as past), passed as `positions`.
- cross-attention attends to [cross prefix; encoder states] under [prefix mask; source mask].
"""

from __future__ import annotations

import torch
from torch import nn

from prefixkit.runtime.backbone import Architecture
from prefixkit.runtime.cache import token_positions

MIN = torch.finfo(torch.float32).min


def additive(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 key mask [B, K] (or [B, T, K]) -> an additive float mask [B, 1, 1|T, K]."""
    allowed = mask.to(torch.bool)
    if allowed.dim() == 2:
        allowed = allowed[:, None, None, :]
    else:
        allowed = allowed[:, None]
    return torch.where(allowed, torch.zeros((), dtype=torch.float32), torch.full((), MIN, dtype=torch.float32))


def prefix_parts(prefix) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A format-2 Prefix as the forward's parts: {"encoder", "decoder", "cross"} -> (key, value),
    each [L, H, P, D]."""
    arrays = {"encoder": (prefix.enc_key, prefix.enc_value), "decoder": (prefix.key, prefix.value),
              "cross": (prefix.cross_key, prefix.cross_value)}
    return {part: tuple(torch.from_numpy(x) for x in kv) for part, kv in arrays.items()}


def batched(parts: dict, B: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One prefix's parts ([L, H, P, D]) for every row of a batch: [L, B, H, P, D], no copy."""
    return {part: tuple(x[:, None].expand(-1, B, -1, -1, -1) for x in kv) for part, kv in parts.items()}


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, S, _ = x.shape
    return x.view(B, S, n_heads, -1).transpose(1, 2)


def _attend(q, k, v, mask, bias=None, scale: float | None = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, H, K, D], additive mask [B, 1, T|1, K] -> [B, T, H*D]."""
    scores = torch.matmul(q, k.transpose(2, 3))
    if scale is not None:
        scores = scores * scale
    if bias is not None:
        scores = scores + bias
    scores = scores + mask
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    out = torch.matmul(weights, v).transpose(1, 2)
    return out.reshape(out.shape[0], out.shape[1], -1)


def _prefixed_attention(projections, x, past_key, past_value, n_heads, mask, bias=None, scale=None):
    """Self-attention of x [B, T, E] over [past; x]: projections (q, k, v, out) -> the output
    [B, T, E] and the keys and values it attended to, [B, H, past+T, D] each."""
    q_proj, k_proj, v_proj, out_proj = projections
    k = torch.cat([past_key, _heads(k_proj(x), n_heads)], dim=2)
    v = torch.cat([past_value, _heads(v_proj(x), n_heads)], dim=2)
    return out_proj(_attend(_heads(q_proj(x), n_heads), k, v, mask, bias=bias, scale=scale)), k, v


def _bart_embed(stack, input_ids, positions):
    """BART's token and learned position embeddings (its table shifted by `offset`), then its
    embedding norm."""
    h = stack.embed_tokens(input_ids) + nn.functional.embedding(positions + stack.embed_positions.offset,
                                                                stack.embed_positions.weight)
    return stack.layernorm_embedding(h)


def _bart_feed_forward(layer, h):
    return layer.final_layer_norm(h + layer.fc2(layer.activation_fn(layer.fc1(h))))


def _t5_position_bias(stack, new: int, past: int, device):
    """T5's relative-position bias [1, H, new, past + new] for `new` positions after `past` (the
    prefix takes the first ones); the stack's first block holds the bucket table."""
    first = stack.block[0].layer[0].SelfAttention
    return first.compute_bias(new, past + new, cache_position=torch.arange(past, past + new, device=device))


def _projections(attention) -> tuple:
    """(q, k, v, out) of a BART or a T5 attention module."""
    if hasattr(attention, "q_proj"):
        return attention.q_proj, attention.k_proj, attention.v_proj, attention.out_proj
    return attention.q, attention.k, attention.v, attention.o


class PrefixSeq2Seq(nn.Module):
    """A BART or T5 `...ForConditionalGeneration` model, run with prefixes (always in eval mode:
    the backbone is a fixed function while a prefix learns)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.config = model.config
        a = Architecture.from_config(model.config.to_dict())  # refuses other families, unequal heads
        self.family = "bart" if a.model_type == "bart" else "t5"
        self.n_heads, self.head_dim = a.n_heads, a.head_dim
        self.n_enc_layers, self.n_dec_layers = a.n_encoder_layers, a.n_layers

    # -- the self-attention both stacks share ---------------------------------------------------
    def _bart_self_attention(self, layer, h, past_key, past_value, mask):
        """A BART layer's self-attention with `past` before its own keys, residual and norm:
        (h, key, value), key/value [B, H, Tp + T, D]."""
        a = layer.self_attn
        out, k, v = _prefixed_attention(_projections(a), h, past_key, past_value, self.n_heads, mask, scale=a.scaling)
        return layer.self_attn_layer_norm(h + out), k, v

    def _t5_self_attention(self, block, h, past_key, past_value, mask, bias):
        """A T5 block's self-attention (pre-norm, relative-position bias) with `past` before its
        own keys, and the residual: (h, key, value)."""
        a, norm = block.layer[0].SelfAttention, block.layer[0].layer_norm
        out, k, v = _prefixed_attention(_projections(a), norm(h), past_key, past_value, self.n_heads, mask, bias=bias)
        return h + out, k, v

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, input_ids, attention_mask, prefix_key, prefix_value, prefix_mask) -> torch.Tensor:
        """input_ids, attention_mask [B, S] (right-padded); prefix key/value [Le, B, H, P, D],
        prefix_mask [B, P] -> encoder states [B, S, E]."""
        keys_mask = additive(torch.cat([prefix_mask, attention_mask], dim=1))
        P, S = prefix_key.shape[3], input_ids.shape[1]
        if self.family == "bart":
            enc = self.model.model.encoder
            h = _bart_embed(enc, input_ids, torch.arange(S, device=input_ids.device)[None])
            for i, layer in enumerate(enc.layers):
                h, _, _ = self._bart_self_attention(layer, h, prefix_key[i], prefix_value[i], keys_mask)
                h = _bart_feed_forward(layer, h)
            return h
        enc = self.model.encoder
        h = enc.embed_tokens(input_ids)
        bias = _t5_position_bias(enc, S, P, input_ids.device)
        for i, block in enumerate(enc.block):
            h, _, _ = self._t5_self_attention(block, h, prefix_key[i], prefix_value[i], keys_mask, bias)
            h = block.layer[1](h)  # T5LayerFF: h + FF(norm(h))
        return enc.final_layer_norm(h)

    def cross(self, states, prefix_key, prefix_value) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states [B, S, E] and the cross prefix [Ld, B, H, P, D] -> the cross-attention
        keys and values every decode step reads: [Ld, B, H, P+S, D] each."""
        keys, values = [], []
        for i in range(self.n_dec_layers):
            if self.family == "bart":
                a = self.model.model.decoder.layers[i].encoder_attn
                k, v = a.k_proj(states), a.v_proj(states)
            else:
                a = self.model.decoder.block[i].layer[1].EncDecAttention
                k, v = a.k(states), a.v(states)
            keys.append(torch.cat([prefix_key[i], _heads(k, self.n_heads)], dim=2))
            values.append(torch.cat([prefix_value[i], _heads(v, self.n_heads)], dim=2))
        return torch.stack(keys), torch.stack(values)

    # -- decoder -------------------------------------------------------------------------------
    def decode(self, input_ids, positions, past_key, past_value, self_mask, cross_key, cross_value, cross_mask):
        """input_ids, positions [B, T]; past key/value [Ld, B, H, Tp, D] (the decoder prefix,
        left-padded, then the tokens so far); self_mask [B, Tp+T]; cross key/value
        [Ld, B, H, C, D] with cross_mask [B, C] -> logits [B, T, V], present key/value
        [Ld, B, H, Tp+T, D]."""
        B, T = input_ids.shape
        Tp = past_key.shape[3]
        key_slots = torch.arange(Tp + T, device=input_ids.device)
        causal = key_slots[None, :] <= (Tp + torch.arange(T, device=input_ids.device))[:, None]  # [T, Tp+T]
        self_add = additive(self_mask[:, None, :].to(torch.bool) & causal[None])
        cross_add = additive(cross_mask)
        presents_k, presents_v = [], []
        if self.family == "bart":
            dec = self.model.model.decoder
            h = _bart_embed(dec, input_ids, positions)
            for i, layer in enumerate(dec.layers):
                h, k, v = self._bart_self_attention(layer, h, past_key[i], past_value[i], self_add)
                presents_k.append(k)
                presents_v.append(v)
                c = layer.encoder_attn
                q = _heads(c.q_proj(h), self.n_heads)
                h = layer.encoder_attn_layer_norm(
                    h + c.out_proj(_attend(q, cross_key[i], cross_value[i], cross_add, scale=c.scaling)))
                h = _bart_feed_forward(layer, h)
            logits = self.model.lm_head(h) + self.model.final_logits_bias
        else:
            dec = self.model.decoder
            h = dec.embed_tokens(input_ids)
            bias = _t5_position_bias(dec, T, Tp, input_ids.device)
            for i, block in enumerate(dec.block):
                h, k, v = self._t5_self_attention(block, h, past_key[i], past_value[i], self_add, bias)
                presents_k.append(k)
                presents_v.append(v)
                c, norm = block.layer[1].EncDecAttention, block.layer[1].layer_norm
                q = _heads(c.q(norm(h)), self.n_heads)
                h = h + c.o(_attend(q, cross_key[i], cross_value[i], cross_add))
                h = block.layer[2](h)
            h = dec.final_layer_norm(h)
            if self.config.tie_word_embeddings:
                h = h * (self.config.d_model ** -0.5)
            logits = self.model.lm_head(h)
        return logits, torch.stack(presents_k), torch.stack(presents_v)

    # -- whole ---------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask, decoder_input_ids, prefix: dict | None = None,
                prefix_mask=None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V]. prefix: {"encoder", "decoder", "cross"} -> (key, value)
        each [L, B, H, P, D], with prefix_mask [B, P]; None runs the bare backbone."""
        B = input_ids.shape[0]
        if prefix is None:
            prefix = self.empty_prefix(B, input_ids.device)
            prefix_mask = torch.zeros(B, 0, dtype=torch.long, device=input_ids.device)
        states = self.encode(input_ids, attention_mask, *prefix["encoder"], prefix_mask)
        cross_key, cross_value = self.cross(states, *prefix["cross"])
        cross_mask = torch.cat([prefix_mask, attention_mask], dim=1)
        T = decoder_input_ids.shape[1]
        P_rows = prefix_mask.sum(dim=1).cpu().numpy()
        positions = torch.from_numpy(token_positions(P_rows, T)).to(input_ids.device)
        self_mask = torch.cat([prefix_mask, torch.ones(B, T, dtype=prefix_mask.dtype, device=input_ids.device)], dim=1)
        logits, _, _ = self.decode(decoder_input_ids, positions, *prefix["decoder"], self_mask,
                                   cross_key, cross_value, cross_mask)
        return logits

    def empty_prefix(self, B: int, device=None, P: int = 0) -> dict:
        def zeros(layers):
            z = torch.zeros(layers, B, self.n_heads, P, self.head_dim, device=device)
            return z, z.clone()
        return {"encoder": zeros(self.n_enc_layers), "decoder": zeros(self.n_dec_layers),
                "cross": zeros(self.n_dec_layers)}

    @property
    def decoder_start_token_id(self) -> int:
        return int(self.config.decoder_start_token_id)


# -- export ----------------------------------------------------------------------------------------
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ENCODER_INPUTS = ["input_ids", "attention_mask", "prefix_mask", "prefix_key", "prefix_value",
                  "cross_prefix_key", "cross_prefix_value"]
ENCODER_OUTPUTS = ["cross_key", "cross_value"]
DECODER_INPUTS = ["input_ids", "positions", "past_key", "past_value", "self_mask", "cross_key", "cross_value",
                  "cross_mask"]
DECODER_OUTPUTS = ["logits", "present_key", "present_value"]


class _EncoderGraph(nn.Module):
    """Source tokens and the encoder and cross prefixes -> the cross-attention key/values
    [Ld, B, H, P+S, D] (encoded once per request)."""

    def __init__(self, model: PrefixSeq2Seq):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask, prefix_mask, prefix_key, prefix_value, cross_prefix_key,
                cross_prefix_value):
        states = self.m.encode(input_ids, attention_mask, prefix_key, prefix_value, prefix_mask)
        return self.m.cross(states, cross_prefix_key, cross_prefix_value)


class _DecoderGraph(nn.Module):
    def __init__(self, model: PrefixSeq2Seq):
        super().__init__()
        self.m = model

    def forward(self, input_ids, positions, past_key, past_value, self_mask, cross_key, cross_value, cross_mask):
        return self.m.decode(input_ids, positions, past_key, past_value, self_mask, cross_key, cross_value,
                             cross_mask)


def example_inputs(m: PrefixSeq2Seq, B: int = 2, S: int = 5, P: int = 3, T: int = 1, Tp: int = 4):
    """Small inputs of the graphs' shapes (tracing and tests)."""
    g = torch.Generator().manual_seed(0)
    H, D, Le, Ld = m.n_heads, m.head_dim, m.n_enc_layers, m.n_dec_layers
    V = m.config.vocab_size

    def kv(L, n):
        return torch.randn(L, B, H, n, D, generator=g)

    ones = torch.ones(B, S, dtype=torch.long)
    encoder = (torch.randint(3, V, (B, S), generator=g), ones, torch.ones(B, P, dtype=torch.long),
               kv(Le, P), kv(Le, P), kv(Ld, P), kv(Ld, P))
    decoder = (torch.randint(3, V, (B, T), generator=g), torch.from_numpy(token_positions([Tp] * B, T)),
               kv(Ld, Tp), kv(Ld, Tp), torch.ones(B, Tp + T, dtype=torch.long), kv(Ld, P + S), kv(Ld, P + S),
               torch.ones(B, P + S, dtype=torch.long))
    return encoder, decoder


def export_graphs(model: nn.Module, folder, opset: int = 17) -> None:
    """Write encoder.onnx and decoder.onnx for a BART or T5 model into `folder`."""
    import warnings
    from pathlib import Path

    folder = Path(folder)
    m = PrefixSeq2Seq(model)
    encoder_args, decoder_args = example_inputs(m)
    kv = {1: "batch", 3: "prefix"}
    encoder_axes = {"input_ids": {0: "batch", 1: "source"}, "attention_mask": {0: "batch", 1: "source"},
                    "prefix_mask": {0: "batch", 1: "prefix"}, "prefix_key": kv, "prefix_value": kv,
                    "cross_prefix_key": kv, "cross_prefix_value": kv,
                    "cross_key": {1: "batch", 3: "cross"}, "cross_value": {1: "batch", 3: "cross"}}
    past = {1: "batch", 3: "past"}
    cross = {1: "batch", 3: "cross"}
    decoder_axes = {"input_ids": {0: "batch", 1: "new"}, "positions": {0: "batch", 1: "new"},
                    "past_key": past, "past_value": past, "self_mask": {0: "batch", 1: "total"},
                    "cross_key": cross, "cross_value": cross, "cross_mask": {0: "batch", 1: "cross"},
                    "logits": {0: "batch", 1: "new"}, "present_key": {1: "batch", 3: "total"},
                    "present_value": {1: "batch", 3: "total"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_EncoderGraph(m), encoder_args, str(folder / ENCODER_FILE), input_names=ENCODER_INPUTS,
                          output_names=ENCODER_OUTPUTS, dynamic_axes=encoder_axes, opset_version=opset,
                          dynamo=False)
        torch.onnx.export(_DecoderGraph(m), decoder_args, str(folder / DECODER_FILE), input_names=DECODER_INPUTS,
                          output_names=DECODER_OUTPUTS, dynamic_axes=decoder_axes, opset_version=opset,
                          dynamo=False)


# -- parity ----------------------------------------------------------------------------------------
def check_parity(model: nn.Module, exported, steps: int = 4) -> dict:
    """The export against `PrefixSeq2Seq` in PyTorch: three rows in one batch, with random
    prefixes of lengths 10 and 3 and none, sources of different lengths (padding in both),
    decoded `steps` tokens with teacher forcing. Returns the largest absolute logit difference
    and that relative to the largest logit, as the decoder-only check does."""
    import numpy as np

    from prefixkit.runtime.prefix import Prefix

    m = PrefixSeq2Seq(model)
    g = torch.Generator().manual_seed(0)
    a = exported.architecture

    def kv(L, P):
        return (torch.randn(L, a.n_kv_heads, P, a.head_dim, generator=g) * 0.5).numpy()

    prefixes = [None]
    for P in (10, 3):
        prefixes.append(Prefix(kv(a.n_layers, P), kv(a.n_layers, P), {"prefix_len": P}, enc_key=kv(a.n_encoder_layers, P),
                               enc_value=kv(a.n_encoder_layers, P), cross_key=kv(a.n_layers, P),
                               cross_value=kv(a.n_layers, P)))
    V = a.vocab_size
    sources = [torch.randint(3, V, (n,), generator=g).tolist() for n in (9, 4, 6)]
    rows = list(zip([prefixes[1], prefixes[0], prefixes[2]], sources))
    targets = torch.randint(3, V, (len(rows), steps), generator=g)
    start = int(model.config.decoder_start_token_id)
    cache = exported.encode(rows)
    got = [cache.forward(np.full(len(rows), start, np.int64))]
    for t in range(steps - 1):
        got.append(cache.forward(targets[:, t].numpy()))
    got = np.stack(got, axis=1)  # [B, steps, V]
    worst, scale = 0.0, 0.0
    with torch.no_grad():
        for b, (prefix, source) in enumerate(rows):  # each row alone in PyTorch, unpadded
            ids = torch.tensor([source])
            decoder_ids = torch.cat([torch.tensor([[start]]), targets[b : b + 1, : steps - 1]], dim=1)
            if prefix is None:
                want = m(ids, torch.ones_like(ids), decoder_ids)
            else:
                want = m(ids, torch.ones_like(ids), decoder_ids, batched(prefix_parts(prefix), 1),
                         torch.ones(1, prefix.prefix_len, dtype=torch.long))
            want = want[0].numpy()
            worst = max(worst, float(np.abs(got[b] - want).max()))
            scale = max(scale, float(np.abs(want).max()))
    return {"max_abs": worst, "relative": worst / scale, "rows": "prefix 10 / none / prefix 3, in one batch",
            "steps": steps}
