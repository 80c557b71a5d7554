"""The words every pt-* command uses for the same thing, and old spellings kept working.

  --backbone     a source model: a registry name, a Hugging Face model folder or a .gguf file
  --export       an export folder made by pt-export (pt-generate takes it as its argument)
  -o, --output   what the command writes (a prefix file, an export folder, a results folder)
  --progress-every  seconds between progress lines where the output is not a terminal

An option renamed to fit keeps its old spelling as a hidden alias: `old=("--backbone",)`.
"""

from __future__ import annotations

import click


class Renamed(click.Option):
    """A click option whose old spellings (`old`) still parse but are not shown in --help."""

    def __init__(self, *args, old: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.old = tuple(old)
        self.opts = [*self.opts, *self.old]

    def get_help_record(self, ctx: click.Context):
        shown, self.opts = self.opts, [o for o in self.opts if o not in self.old]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = shown


def progress_every(command):
    """--progress-every: where the output is not a terminal, a progress line every so many
    seconds (runtime/progress.py)."""
    from .progress import EVERY_S

    return click.option("--progress-every", type=click.FloatRange(min=0.1), default=EVERY_S, show_default=True,
                        metavar="SECONDS",
                        help="Seconds between progress lines where the output is not a terminal (a log).")(command)
