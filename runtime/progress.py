"""Progress of long work (pt-train's steps, pt-eval's inputs), for people: how far, how fast
(steps or inputs a second, tokens a second) and how long is left.

On a terminal it is a tqdm bar. Anywhere else (a log file, a pipe, a CI job, a scheduler) a
bar is unreadable, so it is one line every `every_s` seconds and one at the end, e.g.

    prefix: 120/1000 steps (12%), 1.85 steps/s, 3,410 tokens/s, 1m05s elapsed, ETA 7m56s, loss 2.345
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

EVERY_S = 30.0  # seconds between two lines where the output is not a terminal


def duration(seconds: float) -> str:
    """12s, 8m10s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`update(n, tokens=..., **shown)` after each unit of work; `write(text)` for a message
    between updates; `close()` at the end. Rates count this run only: a resumed run starts at
    `initial` and its rate is not diluted by the steps done before."""

    def __init__(self, total: int, unit: str, desc: str = "", initial: int = 0, every_s: float = EVERY_S,
                 enabled: bool = True, stream: IO[str] | None = None, clock=time.perf_counter):
        self.total, self.unit, self.desc = total, unit, desc
        self.done = self.first = initial
        self.tokens = 0
        self.shown: dict[str, Any] = {}
        self.every_s, self.enabled, self.clock = every_s, enabled, clock
        self.stream = stream if stream is not None else sys.stderr
        self.started = self.last = clock()
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc or None, dynamic_ncols=True,
                            file=self.stream)

    def update(self, n: int = 1, tokens: int = 0, **shown: Any) -> None:
        self.done += n
        self.tokens += tokens
        self.shown.update(shown)
        if self.bar is not None:
            if self.tokens:
                shown = {**shown, "tok_s": f"{self.tokens / max(self.clock() - self.started, 1e-9):.0f}"}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
        elif self.enabled and self.clock() - self.last >= self.every_s:
            self._print(self.line())

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            self._print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and self.done > self.first:
            self._print(self.line())

    def line(self) -> str:
        elapsed = self.clock() - self.started
        ran = self.done - self.first
        rate = ran / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.done}/{self.total} {self.unit}s ({100 * self.done / max(self.total, 1):.0f}%)",
                 f"{rate:.2f} {self.unit}s/s"]
        if self.tokens:
            parts.append(f"{self.tokens / elapsed if elapsed > 0 else 0:,.0f} tokens/s")
        parts.append(f"{duration(elapsed)} elapsed")
        if self.done < self.total:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}" if rate > 0 else "ETA unknown")
        parts += [f"{key} {value}" for key, value in self.shown.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)
        self.last = self.clock()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
