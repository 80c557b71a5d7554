"""One vocabulary across the pt-* commands (runtime/cli_options.py): --backbone a source model,
--export an export folder, -o/--output what a command writes; renamed options keep their old
spelling, hidden from --help."""

from __future__ import annotations

import click
import pytest

from prefixkit.benchmarks.load import main as bench_load
from prefixkit.evaluation.cli import main as pt_eval
from prefixkit.exporter.cli import main as pt_export
from prefixkit.runtime.server import main as pt_serve
from prefixkit.training.cli import main as pt_train
from prefixkit.training.convert import main as pt_convert

# (command, arguments it needs besides the option, parameter name, new spelling, old spelling)
RENAMED = [
    (pt_serve, [], "backbone", "--export", "--backbone"),
    (pt_eval, [], "backbone", "--export", "--backbone"),
    (bench_load, [], "backbone", "--export", "--backbone"),
    (pt_export, ["tiny"], "out", "--output", "--out"),
    (pt_eval, [], "out", "--output", "--out"),
]


def help_text(command: click.Command) -> str:
    with click.Context(command, info_name=command.name) as ctx:
        return command.get_help(ctx)


@pytest.mark.parametrize("command, extra, name, new, old", RENAMED)
def test_a_renamed_option_parses_under_both_spellings_and_shows_only_the_new_one(command, extra, name, new, old,
                                                                                 tmp_path):
    for spelling in (new, old):
        ctx = command.make_context(command.name, [*extra, spelling, str(tmp_path)], resilient_parsing=True)
        assert ctx.params[name] == tmp_path, spelling
    text = help_text(command)
    assert new in text and f"{old} " not in text and f"{old}," not in text


def test_every_command_names_its_output_o_or_output():
    for command in (pt_train, pt_export, pt_eval, bench_load, pt_convert):
        short = {o for p in command.params for o in getattr(p, "opts", []) if o == "-o"}
        assert short == {"-o"}, command.name
        assert "--output" in help_text(command), command.name
