"""`mergekit-wp analyze CONFIG`: run the analyses a YAML asks for and say where the pictures are."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import click


@click.command("analyze")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--only", multiple=True, help="Run just this analysis (repeatable); it must be in the config."
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Report folder (overrides the config's `output`).",
)
def analyze(config: Path, only: tuple[str, ...], output: Path | None) -> None:
    """Run the analyses of CONFIG (one YAML in scoring/) into a report folder."""
    from mergekit_wp.analyses.analyze import run_analyses
    from mergekit_wp.analyses.config import load_config
    from mergekit_wp.config import replace

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        settings = load_config(config)
        if output is not None:
            settings = replace(settings, output=output)
        start = time.perf_counter()
        report = run_analyses(settings, list(only) or None, source=str(config))
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    click.echo(f"analyses done in {time.perf_counter() - start:.0f} s")
    for result in report.results:
        click.echo(f"  {result.name:13s} {result.seconds:6.1f} s  {result.summary}")
        for figure in result.figures:
            click.echo(f"    picture: {figure}")
    click.echo(f"report: {report.root / 'report.md'}")
    click.echo(f"pictures: {report.root / 'index.html'}")
