"""Stop strings: the one place that says where a text stops, how many stop strings a request
or a prefix may carry, and how much of a growing text may be sent before it is known not to
end in one.

A stop string ends generation when the decoded text contains it; the text is cut before its
first occurrence (Hugging Face's `stop_strings`, OpenAI's `stop`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

MAX_STOPS = 16  # per request, and per prefix
MAX_STOP_CHARS = 256


def check_stops(stops: Iterable[str] | str | None, what: str = "stop") -> tuple[str, ...]:
    """`stops` as a tuple without empty strings, or a ValueError in one sentence when they are
    not strings or exceed the limits."""
    if stops is None:
        return ()
    if isinstance(stops, str):
        stops = (stops,)
    if not isinstance(stops, (list, tuple)):
        raise ValueError(f"{what} must be a list of strings, not {type(stops).__name__}.")
    if not all(isinstance(s, str) for s in stops):
        raise ValueError(f"{what} must be a list of strings.")
    stops = tuple(s for s in stops if s)
    if len(stops) > MAX_STOPS:
        raise ValueError(f"{what} has {len(stops)} strings; at most {MAX_STOPS} are allowed.")
    longest = max((len(s) for s in stops), default=0)
    if longest > MAX_STOP_CHARS:
        raise ValueError(f"{what} has a string of {longest} characters; at most {MAX_STOP_CHARS} characters are allowed.")
    return stops


def stop_at(text: str, stops: Sequence[str]) -> int:
    """Where the text stops: the index of the first stop string in it, or -1."""
    return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def sendable(text: str, stops: Sequence[str]) -> str:
    """The part of a growing text that can be sent now: before any stop string, without a
    trailing incomplete character, and holding back an ending that may grow into a stop string."""
    cut = stop_at(text, stops)
    if cut >= 0:
        return text[:cut]
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return text[: len(text) - hold]
