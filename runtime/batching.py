"""Dynamic batching across users: one worker thread decodes every waiting request's rows in one
batch, whatever their prefixes.

Greedy and sampled rows run continuously: a new row is prefilled by itself and joins the running
batch between two decode steps; a finished (or abandoned) row leaves at once. The cache stays in
the layout the graph needs (right-padded for the fused graph, left-padded for the optimum graph);
joining pads the new row's cache into it. Beam search rows run as a group of requests with the
same settings, through `Generator.generate`, between decode steps.

A row's tokens do not depend on the other rows of its batch (the runtime's mixed-batch guarantee),
so a request served in a batch gets what it would get alone. Sampling draws from the request's
own generator, seeded by its `seed`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np

from .generate import GenerationSettings, Generator, _process, _sample, new_cache
from .prefix import Prefix


class QueueFull(RuntimeError):
    """More rows are waiting than the server takes; try again shortly."""


@dataclasses.dataclass(eq=False)
class Row:
    """One prompt of one request: its prefix, prompt ids and settings, and where results go.

    `on_token(row)` is called from the worker after each new token; `on_done(row)` once, with
    `token_ids` and `finish_reason` set ("eos", "stop", "length", "cancelled" or "error")."""

    prefix: Prefix | None
    prompt_ids: list[int]
    settings: GenerationSettings
    stops: tuple[str, ...] = ()
    on_token: Callable[["Row"], None] | None = None
    on_done: Callable[["Row"], None] | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    score: float | None = None
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)
    rng: np.random.Generator | None = None

    @property
    def continuous(self) -> bool:
        return self.settings.num_beams == 1


@dataclasses.dataclass
class BatchStats:
    """What the metrics report: `on_batch(rows, prefixes)` after each forward pass, with the rows it
    decoded and how many different prefixes (the bare backbone counting as one) they carried."""

    on_batch: Callable[[int, int], None] | None = None
    on_tokens: Callable[[int], None] | None = None


class Batcher:
    """Owns the worker thread. `submit(rows)` queues rows (all or none); `close()` stops intake and
    waits until every queued and running row is finished."""

    def __init__(self, generator: Generator, max_rows: int = 32, window_s: float = 0.01,
                 max_queue: int = 256, batching: bool = True, stats: BatchStats | None = None):
        self.generator = generator
        self.max_rows = max_rows if batching else 1
        self.window_s = window_s if batching else 0.0
        self.max_queue = max_queue
        self.batching = batching
        self.stats = stats or BatchStats()
        self._queue: "queue.Queue[Row]" = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._closing = False
        self._running: list[Row] = []
        self._cache = None  # SharedKVCache or _Cache of the running rows
        self._thread = threading.Thread(target=self._work, name="prefixkit-batcher", daemon=True)
        self._thread.start()

    # -- intake --------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Rows accepted and not yet started."""
        return self._waiting

    def _started(self, n: int = 1) -> None:
        with self._lock:
            self._waiting -= n

    @property
    def active_rows(self) -> int:
        return len(self._running)

    def submit(self, rows: Sequence[Row]) -> None:
        with self._lock:
            if self._closing:
                raise QueueFull("the server is shutting down.")
            if self._waiting + len(rows) > self.max_queue:
                raise QueueFull(f"{self._waiting} rows are waiting (limit {self.max_queue}).")
            self._waiting += len(rows)
        for row in rows:
            if row.settings.do_sample:
                row.rng = np.random.default_rng(row.settings.seed)
            self._queue.put(row)

    def close(self, timeout: float | None = None) -> None:
        with self._lock:
            self._closing = True
        self._queue.put(None)  # wakes the worker
        self._thread.join(timeout)

    # -- worker --------------------------------------------------------------------------------
    def _take(self, block: bool) -> Row | None:
        try:
            row = self._queue.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return None
        return row

    def _work(self) -> None:
        pending: list[Row] = []  # taken from the queue, not yet started
        while True:
            idle = not self._running and not pending
            row = self._take(block=idle)
            if row is None and idle:
                if self._closing and self._queue.empty():
                    return
                continue
            if row is not None:
                pending.append(row)
            if idle and self.window_s:  # the first row of a new batch waits briefly for company
                deadline = time.perf_counter() + self.window_s
                while len(pending) < self.max_rows:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    try:
                        more = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if more is None:
                        continue
                    pending.append(more)
            while True:  # drain what arrived meanwhile, without waiting
                more = self._take(block=False)
                if more is None:
                    break
                pending.append(more)
            pending = [r for r in pending if not self._dropped(r)]
            pending = self._start(pending)
            if self._running:
                self._step()

    def _dropped(self, row: Row) -> bool:
        if row.cancelled.is_set():
            self._started()
            self._finish(row, "cancelled")
            return True
        return False

    def _start(self, pending: list[Row]) -> list[Row]:
        """Start what fits now; return the rest. Beam groups run whole, here."""
        beams = [r for r in pending if not self._continuous(r)]
        if beams and not (self._running and not self.batching):
            # Requests with the same beam settings run as one group; running rows wait meanwhile.
            group = [r for r in beams if self._group_key(r) == self._group_key(beams[0])][: self.max_rows]
            self._run_beams(group)
            pending = [r for r in pending if r not in group]
        rest = []
        for row in pending:
            if self._continuous(row) and len(self._running) < self.max_rows:
                self._join(row)
            else:
                rest.append(row)
        return rest

    def _continuous(self, row: Row) -> bool:
        """Whether the row joins the running batch step by step; otherwise it runs in a group
        through generate() (beam search, and every row of an encoder-decoder backbone)."""
        return row.continuous and self.generator.continuous_batching

    def _group_key(self, row: Row):
        # Grouped greedy or sampled rows (encoder-decoder) share all settings, the seed included.
        return _beam_key(row) if row.settings.num_beams > 1 else row.settings

    def _run_beams(self, rows: list[Row]) -> None:
        self._started(len(rows))
        try:
            generations = self.generator.generate([(r.prefix, r.prompt_ids) for r in rows], rows[0].settings,
                                                  stops={s for r in rows for s in r.stops})
            self._count_batch(rows, len(rows) * rows[0].settings.num_beams)
        except Exception as e:  # a failure answers these requests, never kills the worker
            for row in rows:
                row.error = str(e)
                self._finish(row, "error")
            return
        for row, generation in zip(rows, generations):
            row.token_ids, row.score = list(generation.token_ids), generation.score
            self._count_tokens(len(row.token_ids))
            reason = self.generator.completion(generation, row.stops, None, len(row.prompt_ids)).finish_reason
            self._finish(row, reason)

    def _join(self, row: Row) -> None:
        """Prefill the row alone and pad its cache into the running batch."""
        exported = self.generator.exported
        self._started()
        try:
            logits, (key, value) = exported.run_alone(row.prefix, row.prompt_ids)
        except Exception as e:
            row.error = str(e)
            self._finish(row, "error")
            return
        self._count_batch([row])
        if self._cache is None:
            S = key.shape[2]
            left = exported.manifest.graph.padding == "left"
            self._cache = new_cache(exported, key[:, None], value[:, None],
                                    mask=np.ones((1, S), np.int64) if left else None,
                                    lens=None if left else np.array([S], np.int64))
        else:
            self._cache.append(key, value)
        self._running.append(row)
        self._choose(row, logits[-1:].astype(np.float32))  # its first token, from the prefill

    def _choose(self, row: Row, logits: np.ndarray) -> None:
        s = row.settings
        eos = list(self.generator.eos_token_ids if s.eos_token_ids is None else s.eos_token_ids)
        seen = [row.prompt_ids + row.token_ids] if s.no_repeat_ngram_size else None
        scores = _process(logits, seen, len(row.token_ids), s, eos)
        token = int(_sample(scores, s, row.rng)[0]) if s.do_sample else int(scores[0].argmax())
        row.token_ids.append(token)
        self._count_tokens(1)
        if row.on_token is not None:
            row.on_token(row)
        if token in eos:
            row.finish_reason = "eos"
        elif self._hit_stop(row):
            row.finish_reason = "stop"
        elif len(row.token_ids) >= s.max_new_tokens:
            row.finish_reason = "length"

    def _hit_stop(self, row: Row) -> bool:
        if not row.stops:
            return False
        text = self.generator.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        return any(s in text for s in row.stops if s)

    def _step(self) -> None:
        """Retire finished rows, then one decode step for the rest."""
        keep = []
        for i, row in enumerate(self._running):
            if row.cancelled.is_set():
                row.finish_reason = "cancelled"
            if row.finish_reason is not None:
                self._finish(row, row.finish_reason)
            else:
                keep.append(i)
        if len(keep) < len(self._running):
            self._running = [self._running[i] for i in keep]
            if not keep:
                self._cache = None
                return
            self._cache.select(np.array(keep))
        next_ids = np.array([row.token_ids[-1] for row in self._running], np.int64)
        try:
            logits = self._cache.forward(next_ids)  # [B, V]
        except Exception as e:
            for row in self._running:
                row.error = str(e)
                self._finish(row, "error")
            self._running, self._cache = [], None
            return
        self._count_batch(self._running)
        for i, row in enumerate(self._running):
            self._choose(row, logits[i : i + 1])

    def _finish(self, row: Row, reason: str) -> None:
        row.finish_reason = reason
        if row.on_done is not None:
            row.on_done(row)

    def _count_batch(self, rows: list[Row], n: int | None = None) -> None:
        if self.stats.on_batch:
            self.stats.on_batch(len(rows) if n is None else n, len({id(r.prefix) for r in rows}))

    def _count_tokens(self, n: int) -> None:
        if self.stats.on_tokens:
            self.stats.on_tokens(n)


def _beam_key(row: Row) -> tuple:
    s = row.settings
    return (s.num_beams, s.length_penalty, s.early_stopping, s.no_repeat_ngram_size, s.min_new_tokens,
            s.max_new_tokens, s.eos_token_ids)


__all__ = ["Batcher", "BatchStats", "QueueFull", "Row"]
