"""pt-bench: the benchmarks as one command (`pt-bench latency`, `pt-bench parity`, `pt-bench load`,
`pt-bench prefixes`, `pt-bench train-speed`)."""

from __future__ import annotations

import click


class _Lazy(click.Group):
    """Imports a benchmark only when it is the one asked for (latency needs torch, load does not)."""

    commands_by_name = {"latency": "prefixkit.benchmarks.latency", "parity": "prefixkit.benchmarks.parity",
                        "load": "prefixkit.benchmarks.load", "prefixes": "prefixkit.benchmarks.prefixes",
                        "train-speed": "prefixkit.benchmarks.train_speed"}

    def list_commands(self, ctx):
        return sorted(self.commands_by_name)

    def get_command(self, ctx, name):
        import importlib

        module = self.commands_by_name.get(name)
        return None if module is None else importlib.import_module(module).main


@click.group(cls=_Lazy, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Measure prefixkit: latency against Hugging Face and PEFT, token parity with Hugging Face
    on a provider (CPU or CUDA), a server under load, a server over a store of many prefixes, or
    training speed and memory of prefix-tuning against fine-tuning."""
