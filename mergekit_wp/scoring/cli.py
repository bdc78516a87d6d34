"""`mergekit-wp score CONFIG` and `mergekit-wp inspect SCOREMAP`: thin click layers."""

from __future__ import annotations

import click


@click.command("score")
@click.argument("config", type=click.Path(dir_okay=False))
@click.option(
    "--output",
    "-o",
    default=None,
    help="Output folder (overrides the config's `output`; an anchor file kept under "
    "the config's output folder is read and written under this one).",
)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (overrides the config).")
@click.option(
    "--dtype", default=None, help="float32, bfloat16, float16 or float64 (overrides the config)."
)
@click.option("--restart", is_flag=True, help="Drop saved partial results instead of resuming.")
def score(
    config: str, output: str | None, device: str | None, dtype: str | None, restart: bool
) -> None:
    """Score a specialized model's heads and neurons against its base (WP, WP-attr, AP, AP-attr)."""
    import yaml

    from mergekit_wp.scoring.config import parse_config, with_output
    from mergekit_wp.scoring.pipeline import score as run

    try:
        with open(config, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as err:
        raise click.UsageError(f"cannot read scoring config {config}: {err}") from None
    if isinstance(data, dict):
        data |= {k: v for k, v in {"device": device, "dtype": dtype}.items() if v is not None}
        data = with_output(data, output) if output else data
    try:
        result = run(parse_config(data, config), restart=restart)
    except (ValueError, OSError) as err:  # OSError: e.g. a Hub id that cannot be fetched offline
        raise click.UsageError(str(err)) from None
    if result.report_path is None:
        return  # not rank 0 of a data-parallel run
    for method, path in result.maps.items():
        click.echo(f"{method}: {path}")
    click.echo(f"report: {result.report_path}")
    click.echo("pictures:")
    for path in result.pictures:
        click.echo(f"  {path}")


@click.command("inspect")
@click.argument("scoremap", type=click.Path(dir_okay=False))
@click.option(
    "--top-k", "-k", default=20, show_default=True, help="How many heads and neurons to list."
)
def inspect(scoremap: str, top_k: int) -> None:
    """Print a score map's metadata, totals and top-k heads and neurons."""
    from mergekit_wp.scoremap import ScoreMapError, read_score_map
    from mergekit_wp.scoring.report import summary

    try:
        scores = read_score_map(scoremap)
    except ScoreMapError as err:
        raise click.UsageError(str(err)) from None
    click.echo(summary(scores, top_k))
