"""Decoding over an exported backbone, torch-free: rows with different prefixes in one batch,
greedy or beam search.

The cache follows the layout the graph needs (manifest `graph.padding`):
  left   (optimum graph): the prefill batch is left-padded; each step appends a column to the
         mask and the new token's position is counted from it.
  right  (fused GroupQueryAttention graph): each row is prefilled alone; decoding runs on
         right-padded caches whose valid lengths the mask states as a count.
Beam search expands each row's cache, prefix included, per beam and gathers the whole cache on
every reorder. Its rules are those of Hugging Face `generate` (transformers 4.57), so both
produce the same tokens from the same logits.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .prefix import Prefix
from .session import BatchInputs, ExportedBackbone, positions_from_mask

NEG = np.float32(-1.0e9)  # what Hugging Face adds to rule a candidate out


@dataclasses.dataclass
class Generation:
    """One row's result: the new token ids (eos included when generated) and, for beam search,
    the length-penalised sum of log-probabilities."""

    token_ids: list[int]
    score: float | None = None


class _Cache:
    """The running cache of N rows: key, value [L, N, H, S, D] and what says which positions
    are real (a mask [N, S] for left padding, lengths [N] for right padding)."""

    def __init__(self, key: np.ndarray, value: np.ndarray, mask: np.ndarray | None, lens: np.ndarray | None):
        self.key, self.value, self.mask, self.lens = key, value, mask, lens

    def step(self, next_ids: np.ndarray) -> BatchInputs:
        n = len(next_ids)
        if self.mask is not None:
            mask = np.concatenate([self.mask, np.ones((n, 1), np.int64)], axis=1)
            positions = positions_from_mask(mask, 1)
        else:
            width = self.key.shape[3] + 1
            mask = (np.arange(width)[None] < (self.lens + 1)[:, None]).astype(np.int64)
            positions = self.lens.reshape(n, 1)
        return BatchInputs(
            input_ids=next_ids.reshape(n, 1).astype(np.int64), attention_mask=mask, position_ids=positions,
            past_key=self.key, past_value=self.value,
            prefix_lens=np.zeros(n, np.int64), token_lens=np.ones(n, np.int64),
        )

    def advance(self, inputs: BatchInputs, key: np.ndarray, value: np.ndarray) -> None:
        self.key, self.value = key, value
        if self.mask is not None:
            self.mask = inputs.attention_mask
        else:
            self.lens = self.lens + 1

    def select(self, rows: np.ndarray) -> None:
        """Keep rows `rows` (any order, repeats allowed): beam expansion and reordering."""
        self.key, self.value = self.key[:, rows], self.value[:, rows]
        if self.mask is not None:
            self.mask = self.mask[rows]
        else:
            self.lens = self.lens[rows]


class Generator:
    """Generates for many rows at once, each with its own prefix (or none)."""

    def __init__(self, exported: ExportedBackbone):
        self.exported = exported
        self.eos_token_ids = list(exported.manifest.eos_token_ids)
        self.pad_token_id = exported.manifest.pad_token_id

    def generate(
        self,
        rows: Sequence[tuple[Prefix | None, Sequence[int]]],
        max_new_tokens: int = 64,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        eos_token_ids: Sequence[int] | None = None,
    ) -> list[Generation]:
        """rows: (prefix or None, prompt token ids). Greedy with num_beams=1, else beam search.
        eos_token_ids: the tokens that end a row (default: the backbone's). early_stopping: as in
        Hugging Face — True stops a row once it has num_beams finished hypotheses, False (the
        default) stops when the best running beam can no longer beat them, "never" runs on."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if num_beams < 1:
            raise ValueError("num_beams must be at least 1")
        eos = list(self.eos_token_ids if eos_token_ids is None else eos_token_ids)
        logits, cache = self._prefill(rows)
        if num_beams == 1:
            return self._greedy(logits, cache, max_new_tokens, eos)
        cache.select(np.repeat(np.arange(len(rows)), num_beams))
        logits = np.repeat(logits, num_beams, axis=0)
        return self._beam_search(logits, cache, len(rows), num_beams, max_new_tokens, length_penalty, early_stopping, eos)

    def _prefill(self, rows) -> tuple[np.ndarray, _Cache]:
        """Last-position logits [B, V] of every row and the cache after its prompt."""
        exported = self.exported
        if exported.manifest.graph.padding == "left":
            batch = exported.batch(rows)
            logits, key, value = exported.forward(batch)
            return logits[:, -1].astype(np.float32), _Cache(key, value, batch.attention_mask, None)
        # GroupQueryAttention takes several new tokens after a non-empty cache one row at a time.
        last, caches = [], []
        for row in rows:
            batch = exported.batch([row])
            logits, key, value = exported.forward(batch)
            last.append(logits[0, -1].astype(np.float32))
            caches.append(batch.row_cache(key, value, 0))
        lens = np.array([k.shape[2] for k, _ in caches], np.int64)
        L, H, _, D = caches[0][0].shape
        key = np.zeros((L, len(rows), H, int(lens.max()), D), caches[0][0].dtype)
        value = np.zeros_like(key)
        for b, (k, v) in enumerate(caches):
            key[:, b, :, : lens[b]], value[:, b, :, : lens[b]] = k, v
        return np.stack(last), _Cache(key, value, None, lens)

    def _forward_step(self, cache: _Cache, next_ids: np.ndarray) -> np.ndarray:
        inputs = cache.step(next_ids)
        logits, key, value = self.exported.forward(inputs)
        cache.advance(inputs, key, value)
        return logits[:, -1].astype(np.float32)

    def _greedy(self, logits: np.ndarray, cache: _Cache, max_new_tokens: int, eos: list[int]) -> list[Generation]:
        n = logits.shape[0]
        out = [[] for _ in range(n)]
        done = np.zeros(n, bool)
        for step in range(max_new_tokens):
            next_ids = np.where(done, self.pad_token_id, logits.argmax(-1))
            for b in np.flatnonzero(~done):
                out[b].append(int(next_ids[b]))
            done |= np.isin(next_ids, eos)
            if done.all() or step == max_new_tokens - 1:
                break
            logits = self._forward_step(cache, next_ids)
        return [Generation(ids) for ids in out]

    def _beam_search(self, logits, cache, B, K, max_new_tokens, length_penalty, early_stopping, eos) -> list[Generation]:
        V = logits.shape[-1]
        keep = max(2, 1 + len(eos)) * K
        top_mask = np.arange(keep) < K
        run_seqs = np.zeros((B, K, max_new_tokens), np.int64)
        run_scores = np.zeros((B, K), np.float32)
        run_scores[:, 1:] = NEG  # all beams start equal: only the first may expand
        seqs = np.full((B, K, max_new_tokens), self.pad_token_id, np.int64)
        scores = np.full((B, K), NEG, np.float32)
        lens = np.zeros((B, K), np.int64)
        finished = np.zeros((B, K), bool)
        can_improve = np.ones((B, 1), bool)
        for step in range(max_new_tokens):
            log_probs = _log_softmax(logits).reshape(B, K, V) + run_scores[:, :, None]
            flat = log_probs.reshape(B, K * V)
            top = _topk(flat, keep)
            top_scores = np.take_along_axis(flat, top, axis=1)
            from_beam, tokens = top // V, top % V
            top_seqs = np.take_along_axis(run_seqs, from_beam[:, :, None], axis=1)
            top_seqs[:, :, step] = tokens
            hits = np.isin(tokens, eos) | (step + 1 >= max_new_tokens)

            # Beams that go on: the best K continuations that did not stop.
            going = top_scores + hits.astype(np.float32) * NEG
            pick = _topk(going, K)
            run_seqs = np.take_along_axis(top_seqs, pick[:, :, None], axis=1)
            run_scores = np.take_along_axis(going, pick, axis=1)
            parents = np.take_along_axis(from_beam, pick, axis=1)

            # Hypotheses that end here join the finished ones if they rank among the best K.
            just = hits & top_mask[None]
            candidate = top_scores / np.float32((step + 1) ** length_penalty)
            full = finished.all(axis=1, keepdims=True) & (early_stopping is True)
            candidate = candidate + full * NEG + (~can_improve) * NEG + (~just) * NEG
            merged_scores = np.concatenate([scores, candidate.astype(np.float32)], axis=1)
            best = _topk(merged_scores, K)
            seqs = np.take_along_axis(np.concatenate([seqs, top_seqs], axis=1), best[:, :, None], axis=1)
            lens = np.take_along_axis(np.concatenate([lens, np.full((B, keep), step + 1)], axis=1), best, axis=1)
            finished = np.take_along_axis(np.concatenate([finished, just], axis=1), best, axis=1)
            scores = np.take_along_axis(merged_scores, best, axis=1)

            generated = step + 1
            best_len = max_new_tokens if early_stopping == "never" and length_penalty > 0 else generated
            best_running = run_scores[:, :1] / np.float32(best_len**length_penalty)
            worst_finished = np.where(finished, scores.min(axis=1, keepdims=True), NEG)
            can_improve &= (best_running > worst_finished).any(axis=-1, keepdims=True)
            if not (can_improve.any() and not (finished.all() and early_stopping is True) and not hits.all()):
                break
            cache.select((np.arange(B)[:, None] * K + parents).reshape(-1))
            logits = self._forward_step(cache, run_seqs[:, :, step].reshape(-1))
        return [Generation(seqs[b, 0, : lens[b, 0]].tolist(), float(scores[b, 0])) for b in range(B)]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (stable for equal values)."""
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(values, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
