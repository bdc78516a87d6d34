"""`mergekit-wp merge RECIPE OUT`: mergekit-yaml with `wp` registered and its inputs checked
first."""

from __future__ import annotations

import difflib
import os
import shutil
from pathlib import Path

import click
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import registered_methods
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options
from pydantic import ValidationError

from mergekit_wp import register
from mergekit_wp.io import (
    check_model,
    check_output_dir,
    check_weights,
    publish_dir,
    staging_dir,
)
from mergekit_wp.merge_method import check_wp_recipe


def check_method(name: str) -> None:
    """ValueError listing the registered methods unless `name` is one."""
    known = sorted(m.spec.name for m in registered_methods())
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown merge_method {name!r}{hint} (known: {', '.join(known)})")


def load_recipe(
    recipe: str | os.PathLike, options: MergeOptions | None = None
) -> tuple[MergeConfiguration, str]:
    """Parse a mergekit recipe and check its method and models; a `wp` recipe is also planned."""
    register()  # the method names are checked against mergekit's registry, `wp` included
    source = Path(recipe).read_text(encoding="utf-8")
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(source))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise ValueError(f"key {where!r}: {first['msg']}") from None
    check_method(config.merge_method)
    for model in config.referenced_models():
        folder = check_model(model.model.path)
        check_weights(folder)
    check_wp_recipe(config, options)
    return config, source


def check_out_path(out_path: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder, if it may be written: empty or absent, or `overwrite` given."""
    out = check_output_dir(out_path)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"output folder {out} is not empty; pass --overwrite to replace it with the new "
            "merge, or choose another folder"
        )
    return out


def merge_recipe(
    recipe: str | os.PathLike,
    out_path: str | os.PathLike,
    options: MergeOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Run a mergekit recipe into `out_path`, every input checked before anything is written.

    The merge is written to a temporary folder next to `out_path` and swapped in when it is
    complete, so `out_path` never holds a half-written merge or old shards beside new ones.
    """
    options = options or MergeOptions()
    out = check_out_path(out_path, overwrite)
    config, source = load_recipe(recipe, options)
    tmp = staging_dir(out)
    try:
        run_merge(config, str(tmp), options=options, config_source=source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_dir(tmp, out)


@click.command("merge", cls=PrettyPrintHelp)
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False))
@click.argument("out_path", type=click.Path(file_okay=False))
@click.option("--overwrite", is_flag=True, help="Replace OUT_PATH if it is not empty.")
@add_merge_options
def merge(merge_options: MergeOptions, recipe: str, out_path: str, overwrite: bool) -> None:
    """Merge RECIPE (any mergekit method, `wp` included) into OUT_PATH; mergekit-yaml's options."""
    merge_options.apply_global_options()
    try:
        out = merge_recipe(recipe, out_path, merge_options, overwrite)
    except (ValueError, OSError, yaml.YAMLError) as err:  # the temporary folder is gone
        raise click.ClickException(f"{recipe}: {err}") from err
    click.echo(f"merged model: {out}")
