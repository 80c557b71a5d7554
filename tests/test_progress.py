"""Progress lines where the output is not a terminal: how far, how fast and how long is left,
every so many seconds and at the end, with hand-computed rates."""

from __future__ import annotations

import io

from prefixkit.runtime.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_so_often_with_rates_and_time_left_then_one_at_the_end():
    clock, out = Clock(), io.StringIO()
    progress = Progress(1000, "step", "prefix", every_s=30, stream=out, clock=clock)
    assert progress.bar is None  # a StringIO is not a terminal
    for _ in range(40):  # 40 steps of 0.5 s, 120 tokens each: no line before 30 s
        clock.now += 0.5
        progress.update(1, tokens=120, loss="2.345")
    assert out.getvalue() == ""
    for _ in range(40):
        clock.now += 0.5
        progress.update(1, tokens=120, loss="2.100")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # at 30 s: 60 steps in 30 s = 2 steps/s, 240 tokens/s, 940 left = 470 s
    assert lines[0] == ("prefix: 60/1000 steps (6%), 2.00 steps/s, 240 tokens/s, 30s elapsed, ETA 7m50s, "
                        "loss 2.100")
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("prefix: 80/1000 steps (8%), 2.00 steps/s, 240 tokens/s, 40s elapsed")


def test_a_resumed_run_counts_its_own_rate_and_a_finished_one_has_no_time_left():
    clock, out = Clock(), io.StringIO()
    progress = Progress(100, "input", every_s=30, stream=out, clock=clock, initial=90)
    clock.now += 20
    progress.update(10)
    progress.close()
    assert out.getvalue() == "100/100 inputs (100%), 0.50 inputs/s, 20s elapsed\n"


def test_nothing_is_written_when_disabled_or_when_nothing_ran():
    out = io.StringIO()
    quiet = Progress(10, "step", stream=out, enabled=False)
    quiet.update(5)
    quiet.write("hello")
    quiet.close()
    Progress(10, "step", stream=out).close()
    assert out.getvalue() == ""


def test_durations_read_as_people_write_them():
    assert [duration(s) for s in (0, 12.4, 490, 3600 + 125, 36000)] == ["0s", "12s", "8m10s", "1h02m", "10h00m"]
