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
from typing import Iterable, Sequence

import numpy as np

from .manifest import TOKENIZER_FILE
from .prefix import Prefix, load_prefix
from .cache import KVCache, SharedKVCache, new_cache, right_pad
from .device import DeviceLogits, DeviceSharedKVCache
from .session import ExportedBackbone
from .stops import stop_at
from .template import apply_template


NEG = np.float32(-1.0e9)  # what Hugging Face adds to rule a candidate out


@dataclasses.dataclass
class GenerationSettings:
    """How to generate; defaults as in Hugging Face `generate` where it has one."""

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    no_repeat_ngram_size: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] | None = None

    def check(self) -> "GenerationSettings":
        problems = []
        if self.max_new_tokens < 1:
            problems.append("max_new_tokens must be at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append("min_new_tokens must be between 0 and max_new_tokens")
        if self.num_beams < 1:
            problems.append("num_beams must be at least 1")
        if self.do_sample and self.num_beams > 1:
            problems.append("sampling works with num_beams 1")
        if not (0 < self.temperature < np.inf):
            problems.append("temperature must be above 0 and finite")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if not np.isfinite(self.length_penalty):
            problems.append("length_penalty must be finite")
        if self.seed is not None and not (isinstance(self.seed, (int, np.integer)) and self.seed >= 0):
            problems.append("seed must be a whole number of at least 0")
        if self.top_k < 0 or self.no_repeat_ngram_size < 0:
            problems.append("top_k and no_repeat_ngram_size must not be negative")
        if self.early_stopping not in (True, False, "never"):
            problems.append("early_stopping is true, false or 'never'")
        if problems:
            raise ValueError("; ".join(problems) + ".")
        return self


@dataclasses.dataclass
class Generation:
    """One row's result: the new token ids (eos included when generated) and, for beam search,
    the length-penalised sum of log-probabilities."""

    token_ids: list[int]
    score: float | None = None


@dataclasses.dataclass
class Completion:
    """One input's text result. finish_reason: "eos", "stop" (a stop string, cut off) or
    "length" (max_new_tokens reached)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prefix: str | None
    prompt_tokens: int
    score: float | None = None


@dataclasses.dataclass
class Prompt:
    """One input ready to generate from: its prefix, token ids and stop strings."""

    prefix: Prefix | None
    ids: list[int]
    stops: tuple[str, ...]


class Generator:
    """Generates for many rows at once, each with its own prefix (or none)."""

    continuous_batching = True  # rows may join a running batch between decode steps (pt-serve)

    def __init__(self, exported: ExportedBackbone):
        from tokenizers import Tokenizer

        self.exported = exported
        self.eos_token_ids = list(exported.manifest.eos_token_ids)
        self.pad_token_id = exported.manifest.pad_token_id
        self.tokenizer = Tokenizer.from_file(str(exported.folder / TOKENIZER_FILE))
        self.prefixes: dict[str, Prefix] = {}
        self._stop: tuple[str, ...] = ()

    def add_prefix(self, name: str, path) -> Prefix:
        """Load a prefix file once, checked against this backbone (shape and fingerprint)."""
        manifest = self.exported.manifest
        prefix = load_prefix(path, architecture=manifest.architecture, fingerprint=manifest.fingerprint)
        self.prefixes[name] = prefix
        return prefix

    def complete(
        self,
        requests: Sequence[tuple[str | None, str]],
        settings: GenerationSettings | None = None,
        **overrides,
    ) -> list[Completion]:
        """requests: (prefix name or None, input text). Each input goes through its prefix's
        prompt template (meta "template", "{input}" marking the input) and stops at the
        prefix's stop strings (meta "stop") as well as the settings' ones."""
        settings = dataclasses.replace(settings or GenerationSettings(), **overrides).check()
        prompts, names = [], []
        for name, text in requests:
            if name is not None and name not in self.prefixes:
                known = ", ".join(sorted(self.prefixes)) or "none"
                raise ValueError(f"unknown prefix '{name}'; loaded: {known}.")
            prompts.append(self.prepare(self.prefixes.get(name) if name is not None else None, text,
                                        settings.max_new_tokens, settings.stop))
            names.append(name)
        rows = [(p.prefix, p.ids) for p in prompts]
        # Rows of one call share the stop strings' union; each row's text is cut at its own.
        generations = self.generate(rows, settings, stops={s for p in prompts for s in p.stops})
        return [self.completion(g, p.stops, n, len(p.ids)) for g, p, n in zip(generations, prompts, names)]

    def prepare(self, prefix: Prefix | None, text: str, max_new_tokens: int, stops: Sequence[str] = ()) -> "Prompt":
        """One input as the backbone reads it: through the prefix's prompt template (meta
        "template", "{input}" marking the input), tokenised, checked to fit the backbone's
        positions with max_new_tokens, with the prefix's stop strings (meta "stop") after
        `stops`. A ValueError says in one sentence what does not fit."""
        meta = prefix.meta if prefix is not None else {}
        try:
            ids = self.tokenizer.encode(apply_template(meta.get("template"), text)).ids
        except (UnicodeEncodeError, TypeError) as e:
            raise ValueError(f"the input cannot be tokenised ({e}).") from None
        if not ids:
            raise ValueError("the input is empty and the prefix adds no text; give at least one token of input.")
        self.check_length(0 if prefix is None else prefix.prefix_len, len(ids), max_new_tokens)
        return Prompt(prefix, ids, tuple(s for s in (*stops, *meta.get("stop", ())) if s))

    def check_length(self, prefix_len: int, prompt_len: int, max_new_tokens: int) -> None:
        limit = self.exported.manifest.max_positions
        if prefix_len + prompt_len + max_new_tokens > limit:
            raise ValueError(
                f"the input is {prompt_len} tokens; with a prefix of {prefix_len} and max_new_tokens "
                f"{max_new_tokens} that needs {prefix_len + prompt_len + max_new_tokens} positions, but the "
                f"backbone takes {limit}. Shorten the input or lower max_new_tokens."
            )

    def completion(self, generation: Generation, stops: Sequence[str], name, prompt_tokens: int) -> Completion:
        """A row's text: decoded, cut at the first of its stop strings, with why it ended."""
        ids = generation.token_ids
        text = self.text(ids)
        cut = stop_at(text, stops)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        elif ids and ids[-1] in self.eos_token_ids:
            reason = "eos"
        else:
            reason = "length"
        return Completion(text, ids, reason, name, prompt_tokens, generation.score)

    def history(self, ids: Sequence[int]) -> list[int]:
        """The tokens before the first generated one that n-gram rules look at: the prompt."""
        return list(ids)

    def eos_for(self, settings: GenerationSettings) -> list[int]:
        """The token ids that end a row: the settings' own, else the backbone's."""
        return list(self.eos_token_ids if settings.eos_token_ids is None else settings.eos_token_ids)

    def text(self, ids: Sequence[int]) -> str:
        """Generated tokens as text (special tokens left out)."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def hits_stop(self, ids: Sequence[int], stops: Sequence[str]) -> bool:
        """Whether the text of generated tokens `ids` holds one of `stops`."""
        return bool(stops) and stop_at(self.text(ids), stops) >= 0

    def _stopped(self, ids) -> bool:
        return self.hits_stop(ids, self._stop)

    def generate(
        self,
        rows: Sequence[tuple[Prefix | None, Sequence[int]]],
        settings: GenerationSettings | None = None,
        stops: Iterable[str] = (),
        **overrides,
    ) -> list[Generation]:
        """rows: (prefix or None, prompt token ids). Greedy, sampling or beam search as
        `settings` (and keyword overrides of its fields) say; a row (a hypothesis) also ends
        where its text contains one of `stops`."""
        settings = dataclasses.replace(settings or GenerationSettings(), **overrides).check()
        eos = self.eos_for(settings)
        histories = [self.history(ids) for _, ids in rows]
        self._stop = tuple(sorted({s for s in stops if s}))
        try:
            # room for every row (every beam) to its last token from the start
            longest = max((0 if prefix is None else prefix.prefix_len) + len(ids) for prefix, ids in rows)
            logits, cache = self._prefill(rows, room=(len(rows) * settings.num_beams, longest + settings.max_new_tokens))
            if settings.num_beams == 1:
                return self._greedy(logits, cache, histories, settings, eos)
            cache.select(np.repeat(np.arange(len(rows)), settings.num_beams))
            if isinstance(logits, DeviceLogits):  # the prefill's logits, once, for every beam
                logits = DeviceLogits.from_host(self.exported, np.repeat(logits.numpy(), settings.num_beams, axis=0))
            else:
                logits = np.repeat(logits, settings.num_beams, axis=0)
            return self._beam_search(logits, cache, histories, settings, eos)
        finally:
            self._stop = ()

    def _prefill(self, rows, room: tuple[int, int] | None = None) -> tuple[np.ndarray, KVCache]:
        """Last-position logits [B, V] of every row and the cache after its prompt (with `room`,
        rows and positions, made at once where the cache is kept in place)."""
        exported = self.exported
        if exported.manifest.graph.padding == "left":
            batch = exported.batch(rows)
            logits, key, value = exported.forward(batch)
            return logits[:, -1].astype(np.float32), new_cache(exported, key, value, mask=batch.attention_mask)
        # GroupQueryAttention takes several new tokens after a non-empty cache one row at a time.
        if exported.searches_on_device:  # each row prefilled in its slot on the device
            cache = DeviceSharedKVCache(exported, room=room)
            first = [cache.join(prefix, ids) for prefix, ids in rows]
            if cache.logits is not None:
                return DeviceLogits(exported, cache.logits, 0, len(rows)), cache
            return DeviceLogits.from_host(exported, np.concatenate([f.numpy() for f in first])), cache
        alone = [exported.run_alone(prefix, ids) for prefix, ids in rows]
        key, value, lens = right_pad([cache for _, cache in alone])
        logits = np.stack([logits[-1] for logits, _ in alone]).astype(np.float32)
        return logits, new_cache(exported, key, value, lens=lens, room=room)

    def _greedy(self, logits, cache: KVCache, histories: list[list[int]], settings: GenerationSettings,
                eos: list[int]) -> list[Generation]:
        n = logits.shape[0]
        out = [[] for _ in range(n)]
        done = np.zeros(n, bool)
        rng = np.random.default_rng(settings.seed)
        for step in range(settings.max_new_tokens):
            seen = [h + o for h, o in zip(histories, out)] if settings.no_repeat_ngram_size else None
            next_ids = choose_tokens(logits, seen, step, settings, eos, rng)  # on the step's own logits
            next_ids = np.where(done, self.pad_token_id, next_ids)
            for b in np.flatnonzero(~done):
                out[b].append(int(next_ids[b]))
                done[b] = next_ids[b] in eos or self._stopped(out[b])
            if done.all() or step == settings.max_new_tokens - 1:
                break
            logits = cache.forward(next_ids)
        return [Generation(ids) for ids in out]

    def _beam_search(self, logits, cache: KVCache, histories: list[list[int]], settings: GenerationSettings,
                     eos: list[int]) -> list[Generation]:
        B, K, V = len(histories), settings.num_beams, logits.shape[-1]
        max_new_tokens, length_penalty = settings.max_new_tokens, settings.length_penalty
        early_stopping = settings.early_stopping
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
        # All beams of a request hold the same prefix and prompt, and beams with the same first
        # tokens the same cache for them: a reorder of the in-place cache copies only what follows.
        shared = isinstance(cache, SharedKVCache)
        prompt_lens = cache.lens.reshape(B, K).copy() if shared else None
        exps = None
        for step in range(max_new_tokens):
            seen = None
            if settings.no_repeat_ngram_size:
                seen = [histories[i // K] + run_seqs[i // K, i % K, :step].tolist() for i in range(B * K)]
            if isinstance(logits, DeviceLogits):  # the candidates chosen where the logits are
                rows, tokens = banned_tokens(seen, step, settings, eos, B * K)
                top_scores, top = logits.beams(run_scores.reshape(-1), rows * V + tokens, B, keep)
            else:
                exps = np.empty_like(logits) if exps is None else exps
                log_probs = _process(_log_softmax(logits, exps), seen, step, settings, eos, in_place=True)
                log_probs = log_probs.reshape(B, K, V)
                log_probs += run_scores[:, :, None]
                flat = log_probs.reshape(B, K * V)
                top = _topk(flat, keep)
                top_scores = np.take_along_axis(flat, top, axis=1)
            from_beam, tokens = top // V, top % V
            top_seqs = np.take_along_axis(run_seqs, from_beam[:, :, None], axis=1)
            top_seqs[:, :, step] = tokens
            hits = np.isin(tokens, eos) | (step + 1 >= max_new_tokens)
            if self._stop:  # a stop string ends a hypothesis as eos does
                hits |= np.array([[self._stopped(top_seqs[b, j, : step + 1]) for j in range(keep)] for b in range(B)])

            # Beams that go on: the best K continuations that did not stop.
            going = top_scores + hits.astype(np.float32) * NEG
            pick = _topk(going, K)
            previous = run_seqs
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
            same_before = 0
            if shared:  # positions up to the first token where a beam and its new parent differ
                ahead = previous[:, :, :step] == run_seqs[:, :, :step]  # run_seqs[:, :, :step]: the parents' tokens
                same_before = (prompt_lens + np.cumprod(ahead, axis=2).sum(axis=2)).reshape(-1)
            cache.select((np.arange(B)[:, None] * K + parents).reshape(-1), same_before=same_before)
            logits = cache.forward(run_seqs[:, :, step].reshape(-1))
        return [Generation(seqs[b, 0, : lens[b, 0]].tolist(), float(scores[b, 0])) for b in range(B)]


def banned_tokens(histories: list[list[int]] | None, step: int, settings: GenerationSettings, eos: list[int],
                  rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Hugging Face's logits processors that prefixkit supports, in its order, as the (row,
    token) pairs they rule out of `rows` rows at step `step`: no repeated n-gram (over each
    row's prompt + generated tokens, `histories`, needed only for it), at least
    min_new_tokens before eos."""
    n = settings.no_repeat_ngram_size
    pairs: list[tuple[int, int]] = []
    if n:
        for row, history in enumerate(histories):
            if len(history) + 1 < n:
                continue
            tail = tuple(history[len(history) - n + 1 :])
            banned = {history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i : i + n - 1]) == tail}
            pairs += [(row, token) for token in sorted(banned)]
    if step < settings.min_new_tokens:
        pairs += [(row, token) for row in range(rows) for token in eos]
    found = np.array(pairs, np.int64).reshape(-1, 2)
    return found[:, 0], found[:, 1]


def _process(scores: np.ndarray, histories: list[list[int]] | None, step: int, settings: GenerationSettings,
             eos: list[int], in_place: bool = False) -> np.ndarray:
    """The logits processors (banned_tokens) on host scores [B, V]: into `scores` itself where
    `in_place`, else a copy."""
    if not settings.no_repeat_ngram_size and step >= settings.min_new_tokens:
        return scores
    if not in_place:
        scores = scores.copy()
    rows, tokens = banned_tokens(histories, step, settings, eos, len(scores))
    scores[rows, tokens] = -np.inf
    return scores


def choose_tokens(logits: np.ndarray | DeviceLogits, histories: list[list[int]] | None, step: int,
                  settings: GenerationSettings, eos: list[int], rng: np.random.Generator | None = None) -> np.ndarray:
    """The next token of each row [B] from its logits [B, V] (host logits are changed in place):
    the logits processors, then the most likely token, or a sampled one where
    settings.do_sample. Logits left on the device give the most likely token there; sampling
    reads them on the host."""
    if isinstance(logits, DeviceLogits):
        if not settings.do_sample:
            rows, tokens = banned_tokens(histories, step, settings, eos, logits.rows)
            return logits.greedy(rows * logits.vocab + tokens)
        logits = logits.numpy()
    scores = _process(logits, histories, step, settings, eos, in_place=True)
    return _sample(scores, settings, rng) if settings.do_sample else scores.argmax(-1)


def _sample(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> np.ndarray:
    """One token per row from temperature-scaled logits, restricted to the top k and the
    top-p nucleus (at least one token is always kept).

    Each row's largest logit is subtracted before dividing by the temperature: the softmax is
    the same, and no temperature, however small, makes inf - inf (NaN) of the largest. A
    very small temperature so tends to the most likely token, as it should. A row whose logits
    are not all finite or -inf (NaN, +inf) raises ValueError."""
    finite_or_banned = np.isfinite(logits) | np.isneginf(logits)
    if not finite_or_banned.all() or not np.isfinite(logits.max(axis=-1)).all():
        raise ValueError("the backbone's logits are not finite; no token can be sampled")
    with np.errstate(over="ignore"):  # in float64: a temperature below fp32's range is not 0
        logits = (logits - logits.max(axis=-1, keepdims=True)).astype(np.float64) / settings.temperature
    if settings.top_k:
        kth = np.sort(logits, axis=-1)[:, -min(settings.top_k, logits.shape[-1])][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    if settings.top_p < 1.0:
        order = np.argsort(logits, axis=-1)  # ascending, as Hugging Face's TopPLogitsWarper
        sorted_logits = np.take_along_axis(logits, order, axis=-1)
        cumulative = np.cumsum(np.exp(_log_softmax(sorted_logits)), axis=-1)
        remove = cumulative <= 1 - settings.top_p
        remove[:, -1] = False
        np.put_along_axis(logits, order, np.where(remove, -np.inf, sorted_logits), axis=-1)
    probs = np.exp(_log_softmax(logits)).astype(np.float64)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs], np.int64)


def _log_softmax(logits: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """log softmax over the last axis, computed as PyTorch does: shifted = x - max, then
    shifted - log(sum(exp(shifted))). With `scratch` (an array like `logits`, for the
    exponentials), into `logits` itself: a beam search step's 5 x 49152 values then take no new
    memory."""
    shifted = np.subtract(logits, logits.max(axis=-1, keepdims=True), out=None if scratch is None else logits)
    shifted -= np.log(np.exp(shifted, out=scratch).sum(axis=-1, keepdims=True))
    return shifted


def _topk(values: np.ndarray, k: int, chunks: int = 64) -> np.ndarray:
    """Indices of the k largest per row, largest first (stable for equal values).

    A long row (beam search's K × V log-probabilities) is first narrowed to k strided chunks,
    those with the largest maxima: each of the k largest is at least the k-th largest value,
    so its chunk's maximum is too. Position i < chunks * M (M = n // chunks) is in chunk i % M,
    and the few positions past chunks * M are always kept: a partition over a few chunks instead
    of the whole row."""
    B, n = values.shape
    M = n // chunks
    if M > 4 * k:
        maxima = values[:, : chunks * M].reshape(B, chunks, M).max(axis=1)
        best = np.argpartition(-maxima, k - 1, axis=1)[:, :k]
        kept = (best[:, :, None] + M * np.arange(chunks)).reshape(B, -1)
        kept = np.sort(np.concatenate([kept, np.broadcast_to(np.arange(chunks * M, n), (B, n - chunks * M))], axis=1))
        return np.take_along_axis(kept, _topk(np.take_along_axis(values, kept, axis=1), k), axis=1)
    part = np.argpartition(-values, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(values, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
