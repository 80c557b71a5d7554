"""What each training method optimises, and how it meets the frozen backbone.

Letters: B batch, P prefix length (virtual tokens), T tokens, L layers, H KV heads,
D head dim, E hidden size, k the width of the reparametrised prefix P'.

  prefix    PrefixEncoder: key/value [L, H, P, D] fed to every layer as past key values
            (Li & Liang 2021, sections 4.2-4.3); only the encoder trains.
  prompt    PromptEncoder: P virtual-token input embeddings [P, E] (embedding-only ablation,
            section 7.2); saved as the key/values the frozen model computes from them.
  finetune  every backbone weight trains; no prefix.

`PrefixLM` runs any of them over a right-padded batch with the design's conventions: real
tokens take positions P.., the mask covers prefix + tokens, loss on output tokens only.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from prefixkit.exporter.seq2seq import PrefixSeq2Seq, batched
from prefixkit.runtime.backbone import Architecture
from prefixkit.runtime.cache import token_positions

METHODS = ("prefix", "prompt", "finetune")
IGNORE = -100  # label of a position that carries no loss


class PrefixEncoder(nn.Module):
    """() -> key, value, each [L, H, P, D].

    Reparametrised (default): P' [P, k] -> Linear(k, k) -> Tanh -> Linear(k, L*2*H*D).
    Without it, the flattened key/values [P, L*2*H*D] are the parameter.

    `init_kv` (key, value [L, H, P, D], e.g. the frozen model's cache over real words,
    section 7.4) sets the starting prefix exactly: with the MLP, a fixed offset (init_kv minus
    the MLP's first output) is added, so the MLP keeps its usual initialisation and gradients.
    Random initialisation otherwise (N(0, 1) for P', as PEFT's prefix encoder).
    """

    def __init__(self, architecture: Architecture, prefix_len: int, mid_dim: int = 512,
                 reparam: bool = True, init_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        a = architecture
        self.shape = (prefix_len, a.n_layers, 2, a.n_kv_heads, a.head_dim)  # flat layout, as PEFT's
        width = a.n_layers * 2 * a.n_kv_heads * a.head_dim
        self.reparam = reparam
        init_flat = None if init_kv is None else self._flatten(*init_kv)
        if reparam:
            self.embedding = nn.Parameter(torch.randn(prefix_len, mid_dim))  # P'
            self.mlp = nn.Sequential(nn.Linear(mid_dim, mid_dim), nn.Tanh(), nn.Linear(mid_dim, width))
            offset = torch.zeros(prefix_len, width)
            if init_flat is not None:
                with torch.no_grad():
                    offset = init_flat - self.mlp(self.embedding)
            self.register_buffer("offset", offset)
        else:
            start = torch.randn(prefix_len, width) if init_flat is None else init_flat.clone()
            self.flat = nn.Parameter(start)

    def _flatten(self, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # [L, H, P, D] x2 -> [L, 2, H, P, D] -> [P, L, 2, H, D] -> [P, L*2*H*D]
        both = torch.stack([key, value], dim=1).permute(3, 0, 1, 2, 4)
        return both.reshape(self.shape[0], -1).float()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = self.mlp(self.embedding) + self.offset if self.reparam else self.flat  # [P, L*2*H*D]
        both = flat.view(self.shape).permute(1, 2, 3, 0, 4)  # [L, 2, H, P, D]
        return both[:, 0], both[:, 1]


class PromptEncoder(nn.Module):
    """() -> virtual-token embeddings [P, E], started from the embeddings of real tokens (the
    init text's, or tokens drawn at random from the vocabulary)."""

    def __init__(self, init_embeddings: torch.Tensor):
        super().__init__()
        self.embedding = nn.Parameter(init_embeddings.detach().clone().float())

    def forward(self) -> torch.Tensor:
        return self.embedding


class PrefixLM(nn.Module):
    """The frozen backbone with one method's trainable part; `forward(batch)` returns the summed
    negative log-likelihood of the output tokens and their count."""

    def __init__(self, backbone: nn.Module, method: str, trainable: nn.Module | None):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'; use one of {', '.join(METHODS)}.")
        self.backbone = backbone
        self.method = method
        self.trainable = trainable
        frozen = method != "finetune"
        for parameter in backbone.parameters():
            parameter.requires_grad_(not frozen)
        backbone.eval()  # no dropout: the backbone is a fixed function while a prefix learns

    @property
    def prefix_len(self) -> int:
        if self.method == "finetune":
            return 0
        return self.trainable.shape[0] if self.method == "prefix" else self.trainable.embedding.shape[0]

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T] (right-padded) -> logits [B, T, V] of the real tokens."""
        B, T = input_ids.shape
        P = self.prefix_len
        ones = torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([ones, attention_mask], dim=1)  # [B, P+T]
        if self.method == "prefix":
            key, value = self.trainable()  # [L, H, P, D]
            cache = DynamicCache(ddp_cache_data=[
                (k.unsqueeze(0).expand(B, -1, -1, -1), v.unsqueeze(0).expand(B, -1, -1, -1))
                for k, v in zip(key, value)
            ])
            positions = torch.from_numpy(token_positions(P, T)).to(input_ids.device).expand(B, T)
            out = self.backbone(input_ids=input_ids, past_key_values=cache, attention_mask=mask,
                                position_ids=positions, use_cache=True)
            return out.logits
        if self.method == "prompt":
            tokens = self.backbone.get_input_embeddings()(input_ids)  # [B, T, E]
            virtual = self.trainable().unsqueeze(0).expand(B, -1, -1).to(tokens.dtype)  # [B, P, E]
            positions = torch.from_numpy(token_positions(0, P + T)).to(input_ids.device).expand(B, P + T)
            out = self.backbone(inputs_embeds=torch.cat([virtual, tokens], dim=1), attention_mask=mask,
                                position_ids=positions, use_cache=False)
            return out.logits[:, P:]
        positions = torch.from_numpy(token_positions(0, T)).to(input_ids.device).expand(B, T)
        return self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                             use_cache=False).logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        """labels [B, T]: the input ids where the loss counts and IGNORE elsewhere (prompt,
        padding); as in Hugging Face, the token at t is scored from the logits at t-1."""
        logits = self.logits(input_ids, attention_mask)[:, :-1]  # [B, T-1, V]
        target = labels[:, 1:]
        nll = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return nll, (target != IGNORE).sum()

    @torch.no_grad()
    def prefix_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The key/values the runtime feeds as the initial cache: [L, H, P, D] float32 each.

        For `prompt`, the frozen model's cache over the virtual tokens at positions 0..P-1:
        with causal attention they see only each other, so this is exactly what the real tokens
        attended to during training."""
        if self.method == "prefix":
            key, value = self.trainable()
            return key.float().cpu().numpy().copy(), value.float().cpu().numpy().copy()
        if self.method == "prompt":
            virtual = self.trainable().unsqueeze(0)
            P = virtual.shape[1]
            out = self.backbone(inputs_embeds=virtual, position_ids=torch.from_numpy(token_positions(0, P))[None],
                                attention_mask=torch.ones(1, P, dtype=torch.long), use_cache=True)
            cache = out.past_key_values
            key = torch.stack([layer.keys[0] for layer in cache.layers])
            value = torch.stack([layer.values[0] for layer in cache.layers])
            return key.float().numpy().copy(), value.float().numpy().copy()
        raise ValueError("a fine-tuned model has no prefix; it is saved as a model folder.")

    def extra_arrays(self) -> dict[str, np.ndarray]:
        return {}  # a decoder-only prefix is key and value alone


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class Seq2SeqPrefixEncoder(nn.Module):
    """() -> {"encoder", "decoder", "cross"}: (key, value) [L, H, P, D] each — one reparametrised
    PrefixEncoder per attention of an encoder-decoder backbone, as the paper's BART prefixes
    (section 4.2): encoder self-attention, decoder self-attention, decoder cross-attention."""

    PARTS = ("encoder", "decoder", "cross")

    def __init__(self, architecture: Architecture, prefix_len: int, mid_dim: int = 512, reparam: bool = True):
        super().__init__()
        encoder = dataclasses.replace(architecture, n_layers=architecture.n_encoder_layers)
        self.parts = nn.ModuleDict({
            part: PrefixEncoder(encoder if part == "encoder" else architecture, prefix_len, mid_dim, reparam)
            for part in self.PARTS
        })
        self.shape = (prefix_len,)

    def forward(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {part: self.parts[part]() for part in self.PARTS}


class PrefixSeq2SeqLM(nn.Module):
    """An encoder-decoder backbone with a trainable Seq2SeqPrefixEncoder, taking the batches the
    trainer makes for decoder-only models: each row's prompt (labels IGNORE) becomes the source,
    its output tokens (labels set) the target, decoded from the decoder start token."""

    method = "prefix"

    def __init__(self, backbone: nn.Module, trainable: Seq2SeqPrefixEncoder):
        super().__init__()
        self.backbone = backbone
        self.trainable = trainable
        self.runner = PrefixSeq2Seq(backbone)
        for parameter in backbone.parameters():
            parameter.requires_grad_(False)
        backbone.eval()

    @property
    def prefix_len(self) -> int:
        return self.trainable.shape[0]

    def split(self, input_ids, attention_mask, labels):
        """The trainer's rows (prompt + output, right-padded) -> source ids and mask, decoder
        inputs and target labels, each right-padded."""
        B = input_ids.shape[0]
        is_output = labels != IGNORE
        is_source = attention_mask.bool() & ~is_output
        S, T = int(is_source.sum(1).max()), int(is_output.sum(1).max())
        pad = int(self.backbone.config.pad_token_id)
        source = torch.full((B, S), pad, dtype=torch.long, device=input_ids.device)
        source_mask = torch.zeros(B, S, dtype=torch.long, device=input_ids.device)
        target = torch.full((B, T), IGNORE, dtype=torch.long, device=input_ids.device)
        for b in range(B):
            s, t = input_ids[b][is_source[b]], input_ids[b][is_output[b]]
            source[b, : len(s)], source_mask[b, : len(s)], target[b, : len(t)] = s, 1, t
        start = torch.full((B, 1), self.runner.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
        decoder_inputs = torch.cat([start, target[:, :-1].clamp(min=0)], dim=1)
        return source, source_mask, decoder_inputs, target

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        source, source_mask, decoder_inputs, target = self.split(input_ids, attention_mask, labels)
        B, P = source.shape[0], self.prefix_len
        prefix_mask = torch.ones(B, P, dtype=torch.long, device=source.device)
        logits = self.runner(source, source_mask, decoder_inputs, batched(self.trainable(), B), prefix_mask)
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                          ignore_index=IGNORE, reduction="sum")
        return nll, (target != IGNORE).sum()

    @torch.no_grad()
    def prefix_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        key, value = self.trainable()["decoder"]
        return key.float().cpu().numpy().copy(), value.float().cpu().numpy().copy()

    @torch.no_grad()
    def extra_arrays(self) -> dict[str, np.ndarray]:
        """The encoder and cross-attention arrays of a format-2 prefix file."""
        parts = self.trainable()
        out = {}
        for part, name in (("encoder", "enc"), ("cross", "cross")):
            key, value = parts[part]
            out[f"{name}_key"], out[f"{name}_value"] = key.float().cpu().numpy().copy(), value.float().cpu().numpy().copy()
        return out
