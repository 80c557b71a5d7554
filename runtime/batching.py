"""Dynamic batching across users: one worker thread decodes every waiting request's rows in one
batch, whatever their prefixes.

Greedy and sampled rows run continuously: a new row is prefilled by itself and joins the running
batch between two decode steps; a finished (or abandoned) row leaves at once. A long prompt is
prefilled a chunk at a time, one chunk between two decode steps, each chunk sized to take about
as long as a decode step: the rows already decoding go on at about half speed meanwhile, instead
of waiting for the whole prompt. The cache stays in
the layout the graph needs (right-padded for the fused graph, left-padded for the optimum graph);
joining pads the new row's cache into it. Beam search rows run as a group of requests with the
same settings, through `Generator.generate`, between decode steps.

A row's tokens do not depend on the other rows of its batch (the runtime's mixed-batch guarantee),
so a request served in a batch gets what it would get alone. Sampling draws from the request's
own generator, seeded by its `seed`.

A failure fails the rows it concerns and never the worker: an error while choosing one row's
token fails that row alone, an error in a forward pass the rows of that pass.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from typing import Callable, Sequence

import numpy as np

from .cache import new_cache
from .device import DeviceLogits, DeviceSharedKVCache
from .generate import GenerationSettings, Generator, banned_tokens, choose_tokens
from .prefix import Prefix
from .session import Prefill

log = logging.getLogger("prefixkit.batching")


class QueueFull(RuntimeError):
    """More rows are waiting than the server takes; try again shortly."""


class Stopped(RuntimeError):
    """The decode loop is not running (it stopped on an error it could not recover from)."""


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
    prefill: Prefill | None = None  # a long prompt on its way in, a chunk at a time

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
                 max_queue: int = 256, batching: bool = True, stats: BatchStats | None = None,
                 prefill_chunk: int = 256):
        """`prefill_chunk`: the most prompt tokens prefilled in one go; a longer prompt goes in
        chunks, between decode steps."""
        self.generator = generator
        self.prefill_chunk = max(2, prefill_chunk)
        self.max_rows = max_rows if batching else 1
        self.window_s = window_s if batching else 0.0
        self.max_queue = max_queue
        self.batching = batching
        self.stats = stats or BatchStats()
        self._queue: "queue.Queue[Row]" = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._closing = False
        self._pending: list[Row] = []  # taken from the queue, not yet started
        self._current: list[Row] = []  # being started
        self._running: list[Row] = []
        self._prefilling: list[Row] = []  # long prompts, a chunk between decode steps
        self._cache = None  # the running rows' cache (runtime/cache.py)
        self._step_s = 0.0  # how long the last decode step took
        self._token_s = 0.0  # how long the last prefill chunk took per token
        self.failure: str | None = None  # why the worker stopped, if it did
        self._thread = threading.Thread(target=self._work, name="prefixkit-batcher", daemon=True)
        self._thread.start()

    # -- intake --------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Rows accepted and not yet started: in the queue, or taken and waiting for room."""
        return self._waiting + len(self._pending)

    @property
    def active_rows(self) -> int:
        """Rows started and not finished: decoding, or prefilling a long prompt."""
        return len(self._running) + len(self._prefilling)

    @property
    def alive(self) -> bool:
        """Whether the decode loop runs; when it does not, `failure` says why."""
        return self.failure is None and (self._thread.is_alive() or self._closing)

    def submit(self, rows: Sequence[Row]) -> None:
        """Queue the rows, all or none: a refusal (full, closing, stopped, a bad seed) takes
        nothing from the queue's count."""
        for row in rows:  # before anything is counted
            if row.settings.do_sample and row.rng is None:
                row.rng = np.random.default_rng(row.settings.seed)
        with self._lock:
            if self._closing:
                raise QueueFull("the server is shutting down.")
            if not self.alive:
                raise Stopped(f"the decode loop stopped: {self.failure}")
            if self.queue_depth + len(rows) > self.max_queue:
                raise QueueFull(f"{self.queue_depth} rows are waiting (limit {self.max_queue}).")
            self._waiting += len(rows)
        for row in rows:
            self._queue.put(row)  # an unbounded queue: put does not fail

    def close(self, timeout: float | None = None) -> None:
        with self._lock:
            self._closing = True
        self._queue.put(None)  # wakes the worker
        self._thread.join(timeout)

    # -- worker --------------------------------------------------------------------------------
    def _take(self, block: bool, timeout: float = 0.5) -> Row | None:
        """The next queued row, or None (nothing came, or the wake-up of close())."""
        try:
            row = self._queue.get(block=block, timeout=timeout if block else None)
        except queue.Empty:
            return None
        if row is not None:
            with self._lock:
                self._waiting -= 1
                self._pending.append(row)
        return row

    def _work(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # never expected: say why, and answer every row we hold
            self.failure = f"{type(e).__name__}: {e}"
            log.exception("the decode loop stopped")
            with self._lock:
                held = self._held()
                while not self._queue.empty():
                    row = self._queue.get_nowait()
                    if row is not None:
                        held.append(row)
                self._pending, self._waiting = [], 0
            self._fail(held, self.failure)
            raise

    def _held(self) -> list[Row]:
        """Every row the worker has taken and not finished, each once."""
        rows = self._current + self._running + self._prefilling + self._pending
        return list({id(r): r for r in rows}.values())

    def _loop(self) -> None:
        while True:
            try:
                if not self._iteration():
                    return
            except Exception as e:  # a bug in the bookkeeping: fail the rows it held, go on
                log.exception("a decode iteration failed")
                with self._lock:
                    held, self._pending = self._held(), []
                self._fail(held, f"{type(e).__name__}: {e}")
                self._running, self._prefilling, self._cache, self._current = [], [], None, []

    def _iteration(self) -> bool:
        """Take what arrived, start what fits, one prefill chunk and one decode step; False when
        the worker is to end."""
        idle = not self._running and not self._prefilling and not self._pending
        row = self._take(block=idle)
        if row is None and idle:
            return not (self._closing and self._queue.empty())
        if idle and self.window_s:  # the first row of a new batch waits briefly for company
            deadline = time.perf_counter() + self.window_s
            while len(self._pending) < self.max_rows:
                left = deadline - time.perf_counter()
                if left <= 0 or self._take(block=True, timeout=left) is None:
                    break
        while self._take(block=False) is not None:  # what arrived meanwhile, without waiting
            pass
        self._start()
        if self._prefilling:
            self._prefill_chunk()
        if self._running:
            self._step()
        return True

    def _start(self) -> None:
        """Start what fits now, in order of arrival; the rest stays pending. Cancelled rows
        leave. Beam groups run whole, here."""
        for row in [r for r in self._pending if r.cancelled.is_set()]:
            self._unpend([row])
            self._finish(row, "cancelled")
            self._current = []
        beams = [r for r in self._pending if not self._continuous(r)]
        if beams and not (self.active_rows and not self.batching):
            # Requests with the same beam settings run as one group; running rows wait meanwhile.
            group = [r for r in beams if self._group_key(r) == self._group_key(beams[0])][: self.max_rows]
            self._unpend(group)
            self._run_beams(group)
            self._current = []
        for row in list(self._pending):
            if self._continuous(row) and self.active_rows < self.max_rows:
                self._unpend([row])
                self._join(row)
                self._current = []

    def _unpend(self, rows: list[Row]) -> None:
        """Take rows out of the pending list; they are `_current` until started."""
        with self._lock:
            self._pending = [r for r in self._pending if all(r is not x for x in rows)]
            self._current = list(rows)

    def _continuous(self, row: Row) -> bool:
        """Whether the row joins the running batch step by step; otherwise it runs in a group
        through generate() (beam search, and every row of an encoder-decoder backbone)."""
        return row.continuous and self.generator.continuous_batching

    def _group_key(self, row: Row):
        # Grouped greedy or sampled rows (encoder-decoder) share all settings, the seed included.
        return _beam_key(row) if row.settings.num_beams > 1 else row.settings

    def _run_beams(self, rows: list[Row]) -> None:
        try:
            generations = self.generator.generate([(r.prefix, r.prompt_ids) for r in rows], rows[0].settings,
                                                  stops={s for r in rows for s in r.stops})
            self._count_batch(rows, len(rows) * rows[0].settings.num_beams)
        except Exception as e:  # a failure answers these requests, never kills the worker
            self._fail(rows, str(e))
            return
        for row, generation in zip(rows, generations):
            row.token_ids, row.score = list(generation.token_ids), generation.score
            self._count_tokens(len(row.token_ids))
            reason = self.generator.completion(generation, row.stops, None, len(row.prompt_ids)).finish_reason
            self._finish(row, reason)

    def _join(self, row: Row) -> None:
        """Prefill the row alone and pad its cache into the running batch; a prompt longer than
        a chunk goes in chunks, between decode steps."""
        exported = self.generator.exported
        try:
            if len(row.prompt_ids) > self.prefill_chunk:
                row.prefill = Prefill(exported, row.prefix, row.prompt_ids, room=row.settings.max_new_tokens)
                self._prefilling.append(row)
                return
            if exported.searches_on_device:  # prefilled in its slot of the batch's cache, on the device
                if self._cache is None:
                    self._cache = DeviceSharedKVCache(exported, room=(self.max_rows, 0))
                logits = self._cache.join(row.prefix, row.prompt_ids)
            else:
                logits, (key, value) = exported.run_alone(row.prefix, row.prompt_ids)
        except Exception as e:
            self._fail([row], str(e))
            return
        self._count_batch([row])
        if exported.searches_on_device:
            self._running.append(row)
            self._choose(row, logits)
        else:
            self._enter(row, logits, key, value)

    def _prefill_chunk(self) -> None:
        """One chunk of the first long prompt: as many tokens as take about one decode step's
        time while rows are decoding (at most `prefill_chunk`), else `prefill_chunk`."""
        row = self._prefilling[0]
        if row.cancelled.is_set():
            self._prefilling.pop(0)
            self._finish(row, "cancelled")
            return
        tokens = self.prefill_chunk
        if self._running:  # about one step's time; a first chunk of 16 tokens measures the rate
            tokens = min(tokens, int(self._step_s / self._token_s) if self._token_s > 0 else 16)
        started, before = time.perf_counter(), row.prefill.done
        try:
            done = row.prefill.advance(tokens)
        except Exception as e:
            self._prefilling.pop(0)
            self._fail([row], str(e))
            return
        self._token_s = (time.perf_counter() - started) / (row.prefill.done - before)
        self._count_batch([row])
        if done:
            self._prefilling.pop(0)
            logits, (key, value) = row.prefill.result()
            row.prefill = None
            self._enter(row, logits, key, value)

    def _enter(self, row: Row, logits: np.ndarray, key: np.ndarray, value: np.ndarray) -> None:
        """A prefilled row joins the running batch and takes its first token."""
        exported = self.generator.exported
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

    def _choose(self, row: Row, logits: np.ndarray | DeviceLogits, token: int | None = None) -> None:
        """The row's next token from its logits [1, V] (or `token`, chosen already); an error
        here fails this row alone (it leaves at the next step)."""
        s = row.settings
        eos = self.generator.eos_for(s)
        try:
            if token is None:
                seen = [row.prompt_ids + row.token_ids] if s.no_repeat_ngram_size else None
                token = int(choose_tokens(logits, seen, len(row.token_ids), s, eos, row.rng)[0])
        except Exception as e:
            log.exception("choosing a token failed")
            row.error, row.finish_reason = f"choosing a token failed ({type(e).__name__}: {e})", "error"
            return
        row.token_ids.append(token)
        self._count_tokens(1)
        if row.on_token is not None:
            row.on_token(row)
        if token in eos:
            row.finish_reason = "eos"
        elif self.generator.hits_stop(row.token_ids, row.stops):
            row.finish_reason = "stop"
        elif len(row.token_ids) >= s.max_new_tokens:
            row.finish_reason = "length"

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
        started = time.perf_counter()
        try:
            logits = self._cache.forward(next_ids)  # [B, V]
        except Exception as e:
            self._fail(self._running, str(e))
            self._running, self._cache = [], None
            return
        self._step_s = time.perf_counter() - started
        self._count_batch(self._running)
        if isinstance(logits, DeviceLogits):
            tokens = self._choose_on_device(logits)
            # Sampled rows read the step's logits on the host, copied once for all of them.
            host = logits.numpy() if any(row.settings.do_sample for row in self._running) else None
            for i, row in enumerate(self._running):
                if row.settings.do_sample:
                    self._choose(row, host[i : i + 1])
                else:
                    self._choose(row, logits.row(i), None if tokens is None else int(tokens[i]))
            return
        for i, row in enumerate(self._running):
            self._choose(row, logits[i : i + 1])

    def _choose_on_device(self, logits: DeviceLogits) -> np.ndarray | None:
        """Every row's most likely token after its own logits processors, in one pass on the
        device (sampled rows' are ignored: they sample on the host); None where that fails, and
        each row then chooses alone."""
        banned = []
        for i, row in enumerate(self._running):
            s = row.settings
            seen = [row.prompt_ids + row.token_ids] if s.no_repeat_ngram_size else None
            _, tokens = banned_tokens(seen, len(row.token_ids), s, self.generator.eos_for(s), 1)
            banned.append(i * logits.vocab + tokens)
        try:
            return logits.greedy(np.concatenate(banned))
        except Exception:
            log.exception("choosing tokens on the device failed; each row chooses alone")
            return None

    def _finish(self, row: Row, reason: str) -> None:
        row.finish_reason = reason
        if row.on_done is not None:
            row.on_done(row)

    def _fail(self, rows: Sequence[Row], error: str) -> None:
        for row in rows:
            row.error = error
            self._finish(row, "error")

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


__all__ = ["Batcher", "BatchStats", "QueueFull", "Row", "Stopped"]
