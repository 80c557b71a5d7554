"""Encoder-decoder backbones (BART, T5), torch-free: encode once per request, then decode with
beam search, rows of different prefixes in one batch.

An export holds two graphs (see prefixkit.exporter.seq2seq for the conventions):
  encoder.onnx  source tokens + encoder and cross prefixes -> cross-attention key/values
  decoder.onnx  one step: new token, position, self-attention cache (the decoder prefix,
                left-padded, then the tokens so far), cross key/values -> logits, new cache
Prefixes of different lengths are left-padded to the batch's longest under a prefix mask;
source tokens are right-padded. Decoding, beam search included, is the decoder-only
Generator's: only the prefill and the cache differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .cache import token_positions
from .generate import Generator
from .manifest import SEQ2SEQ_FILES, Manifest, ManifestError, load_manifest
from .prefix import Prefix
from .session import checked_providers, open_session


class ExportedSeq2Seq:
    """An encoder-decoder export folder loaded into two ONNX Runtime sessions."""

    shares_cache_buffers = False

    def __init__(self, folder: str | os.PathLike, providers: Sequence[str] | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder)
        if self.manifest.graph.kind != "seq2seq":
            raise ManifestError(f"{self.folder}: not an encoder-decoder export ({self.manifest.graph.kind}).")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.encoder, self.decoder = (
            open_session(self.folder / name, options, checked_providers(providers), self.manifest.fingerprint)
            for name in SEQ2SEQ_FILES
        )
        self.decoder_inputs = {i.name for i in self.decoder.get_inputs()}
        a = self.manifest.architecture
        self.heads, self.head_dim = a.n_kv_heads, a.head_dim
        self.dtype = np.dtype(self.manifest.dtype)

    @property
    def architecture(self):
        return self.manifest.architecture

    def encode(self, rows: Sequence[tuple[Prefix | None, Sequence[int]]]) -> "Seq2SeqCache":
        """Every row's source encoded with its prefix; the cache the first decode step reads."""
        a = self.architecture
        B = len(rows)
        P = max([1] + [p.prefix_len for p, _ in rows if p is not None])  # one masked slot when none has one
        S = max(len(ids) for _, ids in rows)
        ids = np.full((B, S), self.manifest.pad_token_id, np.int64)
        mask = np.zeros((B, S), np.int64)
        prefix_mask = np.zeros((B, P), np.int64)
        shape = (B, self.heads, P, self.head_dim)
        enc_k, enc_v = (np.zeros((a.n_encoder_layers, *shape), self.dtype) for _ in range(2))
        dec_k, dec_v, cross_k, cross_v = (np.zeros((a.n_layers, *shape), self.dtype) for _ in range(4))
        for b, (prefix, tokens) in enumerate(rows):
            ids[b, : len(tokens)], mask[b, : len(tokens)] = tokens, 1
            if prefix is None:
                continue
            n = prefix.prefix_len  # left-padded: the real prefix ends where the tokens begin
            prefix_mask[b, P - n :] = 1
            for target, source in ((enc_k, prefix.enc_key), (enc_v, prefix.enc_value), (dec_k, prefix.key),
                                   (dec_v, prefix.value), (cross_k, prefix.cross_key), (cross_v, prefix.cross_value)):
                target[:, b, :, P - n :] = source
        cross_key, cross_value = self.encoder.run(None, {
            "input_ids": ids, "attention_mask": mask, "prefix_mask": prefix_mask, "prefix_key": enc_k,
            "prefix_value": enc_v, "cross_prefix_key": cross_k, "cross_prefix_value": cross_v,
        })
        lens = prefix_mask.sum(axis=1)  # real positions each row's decoder cache holds
        return Seq2SeqCache(self, dec_k, dec_v, prefix_mask, lens, cross_key, cross_value,
                            np.concatenate([prefix_mask, mask], axis=1))

    def step(self, cache: "Seq2SeqCache", next_ids: np.ndarray) -> np.ndarray:
        n = len(next_ids)
        self_mask = np.concatenate([cache.mask, np.ones((n, 1), np.int64)], axis=1)
        feed = {"input_ids": next_ids.reshape(n, 1).astype(np.int64), "positions": token_positions(cache.lens, 1),
                "past_key": cache.key, "past_value": cache.value, "self_mask": self_mask,
                "cross_key": cache.cross_key, "cross_value": cache.cross_value, "cross_mask": cache.cross_mask}
        logits, cache.key, cache.value = self.decoder.run(None, {k: v for k, v in feed.items()
                                                                 if k in self.decoder_inputs})
        cache.mask, cache.lens = self_mask, cache.lens + 1
        return logits[:, -1].astype(np.float32)


class Seq2SeqCache:
    """N rows' decoder state: self-attention cache key/value [Ld, N, H, T, D] with its mask
    [N, T], the next position [N], and the cross-attention key/values [Ld, N, H, C, D] with
    their mask [N, C]. `select` serves beam expansion and reordering."""

    def __init__(self, exported, key, value, mask, lens, cross_key, cross_value, cross_mask):
        self.exported = exported
        self.key, self.value, self.mask, self.lens = key, value, mask, lens
        self.cross_key, self.cross_value, self.cross_mask = cross_key, cross_value, cross_mask
        self.source = np.arange(len(lens))  # the request each row decodes for

    def __len__(self) -> int:
        return self.key.shape[1]

    def select(self, rows: np.ndarray, same_before: int = 0) -> None:
        self.key, self.value = self.key[:, rows], self.value[:, rows]
        self.mask, self.lens = self.mask[rows], self.lens[rows]
        source = self.source[rows]
        # The cross-attention arrays depend only on the request: a beam reorder, which keeps every
        # row within its request's beams, leaves them as they are (the largest copy saved).
        if len(source) != len(self.source) or not np.array_equal(source, self.source):
            self.cross_key, self.cross_value = self.cross_key[:, rows], self.cross_value[:, rows]
            self.cross_mask = self.cross_mask[rows]
        self.source = source

    def forward(self, next_ids: np.ndarray) -> np.ndarray:
        """One decode step: next_ids [N] -> logits [N, V] float32."""
        return self.exported.step(self, next_ids)


class Seq2SeqGenerator(Generator):
    """The Generator over an encoder-decoder export: prompts go to the encoder, the decoder
    starts from the backbone's decoder start token; everything else is shared."""

    continuous_batching = False  # the server runs its rows as groups through generate()

    def __init__(self, exported: ExportedSeq2Seq):
        super().__init__(exported)
        start = exported.manifest.decoder_start_token_id
        self.decoder_start = int(start if start is not None else self.pad_token_id)

    def check_length(self, prefix_len: int, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.exported.manifest.max_positions
        if prompt_len > limit:
            raise ValueError(f"the input is {prompt_len} tokens, but the encoder takes {limit}. Shorten the input.")
        if prefix_len + max_new_tokens + 1 > limit:
            raise ValueError(
                f"a prefix of {prefix_len} and max_new_tokens {max_new_tokens} need {prefix_len + max_new_tokens + 1} "
                f"decoder positions, but the backbone takes {limit}. Lower max_new_tokens."
            )

    def history(self, ids: Sequence[int]) -> list[int]:
        return [self.decoder_start]  # n-gram rules look at the decoder's tokens, as Hugging Face's

    def _prefill(self, rows, room=None):  # the decoder's cache is not kept in place: no room to make
        cache = self.exported.encode(rows)
        return cache.forward(np.full(len(rows), self.decoder_start, np.int64)), cache
