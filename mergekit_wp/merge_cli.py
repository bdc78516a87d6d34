"""`mergekit-wp merge RECIPE OUT`: mergekit-yaml with `wp` registered and its inputs checked first."""

from __future__ import annotations

import os
from pathlib import Path

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

from mergekit_wp.merge_method import check_wp_recipe


def load_recipe(
    recipe: str | os.PathLike, options: MergeOptions | None = None
) -> tuple[MergeConfiguration, str]:
    """Parse a mergekit recipe; a `wp` recipe is also planned and its inputs checked."""
    source = Path(recipe).read_text(encoding="utf-8")
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    check_wp_recipe(config, options)
    return config, source


def merge_recipe(
    recipe: str | os.PathLike, out_path: str | os.PathLike, options: MergeOptions | None = None
) -> Path:
    """Run a mergekit recipe into `out_path`; a `wp` recipe is checked before anything is written."""
    options = options or MergeOptions()
    config, source = load_recipe(recipe, options)
    run_merge(config, str(out_path), options=options, config_source=source)
    return Path(out_path)


@click.command("merge", cls=PrettyPrintHelp)
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@add_merge_options
def merge(merge_options: MergeOptions, recipe: str, out_path: str) -> None:
    """Merge RECIPE (any mergekit method, `wp` included) into OUT_PATH; mergekit-yaml's options."""
    merge_options.apply_global_options()
    try:
        config, source = load_recipe(recipe, merge_options)
    except (ValueError, yaml.YAMLError) as err:  # found before the merge starts: nothing written
        raise click.ClickException(f"{recipe}: {err}") from err
    run_merge(config, out_path, options=merge_options, config_source=source)
