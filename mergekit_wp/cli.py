"""`mergekit-wp`: a thin click layer over the Python API; each subcommand lives with its
subsystem."""

from __future__ import annotations

import importlib

import click

from mergekit_wp import register

# name -> "module:attribute"; imported on first use so `mergekit-wp zoo path` stays quick.
_COMMANDS = {
    "merge": "mergekit_wp.merge_cli:merge",
    "zoo": "mergekit_wp.zoo.cli:zoo",
    "data": "mergekit_wp.prompts.cli:data",
    "score": "mergekit_wp.scoring.cli:score",
    "inspect": "mergekit_wp.scoring.cli:inspect",
    "eval": "mergekit_wp.evaluation.cli:eval_command",
    "bench": "mergekit_wp.evaluation.cli:bench",
    "demo": "mergekit_wp.evaluation.cli:demo",
    "analyze": "mergekit_wp.analyses.cli:analyze",
}

# Subcommands that run mergekit's merge: `wp` and `widen` are registered before they start.
_MERGING = {"merge", "bench", "demo"}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=_LazyGroup)
@click.version_option(package_name="mergekit-wp")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Weight Patching scores and mechanism-aware merging for MergeKit."""
    if ctx.invoked_subcommand in _MERGING:
        register()
