"""`mergekit-wp zoo build | info | path`: a thin layer over mergekit_wp.zoo."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mergekit_wp import zoo as Z


@click.group()
def zoo() -> None:
    """The micro zoo: base, instruct, math and code models trained offline."""


@zoo.command()
# --out is required: the packaged zoo is tracked, and a build without a folder would replace it.
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Models folder (required; name the packaged zoo, mergekit_wp/zoo/models, to rebuild it).",
)
@click.option(
    "--data-out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Data folder (default: OUT/data, or the packaged data when OUT is the packaged zoo).",
)
@click.option("--quick", is_flag=True, help="Tiny smoke build: a few steps, tiny models.")
@click.option(
    "--scale",
    type=float,
    default=1.0,
    help="Multiply every training stage's steps (budget trade-off; 1 = the plan).",
)
@click.option("--no-gates", is_flag=True, help="Skip measuring the gates.")
@click.option(
    "--gates-only", is_flag=True, help="Only re-measure the gates of the models already in OUT."
)
@click.option(
    "--gate-sample",
    type=int,
    default=None,
    help="Held-out prompts per task for the gates; 0 = all (default: the plan's).",
)
def build(
    out: Path,
    data_out: Path | None,
    quick: bool,
    scale: float,
    no_gates: bool,
    gates_only: bool,
    gate_sample: int | None,
) -> None:
    """Rebuild the zoo from seeds on CPU and measure its gates."""
    import dataclasses

    from mergekit_wp.zoo.build import QUICK_PLAN, BuildPlan, build_zoo, remeasure
    from mergekit_wp.zoo.gates import table

    plan = QUICK_PLAN if quick else BuildPlan()
    if scale != 1.0:
        plan = plan.scaled(scale)
    if gate_sample is not None:
        plan = dataclasses.replace(plan, gate_sample=gate_sample or None)
    models = out
    packaged = models.resolve() == Z.MODELS_DIR.resolve()
    data = data_out or (Z.DATA_DIR if packaged else models / "data")
    if gates_only:
        if not (models / "gates.json").exists():
            raise click.UsageError(f"{models / 'gates.json'} is missing; build the zoo first")
        record = remeasure(models, data, plan.gate_sample)
    else:
        record = build_zoo(models, data, plan, measure=not no_gates)
        click.echo(f"built {models} in {record['train_seconds']['total']:.0f} s")
    if "scores" in record:
        click.echo(table(record["scores"]))


@zoo.command()
@click.option(
    "--models",
    type=click.Path(path_type=Path, exists=True),
    default=None,
    help="Models folder (default: the packaged zoo).",
)
def info(models: Path | None) -> None:
    """Print the gates table recorded at build time."""
    from mergekit_wp.zoo.gates import table

    path = (models or Z.MODELS_DIR) / "gates.json"
    if not path.exists():
        raise click.UsageError(f"{path} is missing; run `mergekit-wp zoo build` first")
    record = json.loads(path.read_text())
    plan = record["plan"]
    click.echo(
        f"models: {path.parent}  parameters: {record['parameters']:,}  shape: {plan['shape']}"
    )
    click.echo(
        "build seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in record["train_seconds"].items())
    )
    if "scores" not in record:
        click.echo("gates were not measured (built with --no-gates)")
        return
    click.echo(f"held-out sample per task: {record['gate_sample_per_task'] or 'all'}")
    click.echo(table(record["scores"]))
    for gate, ok in record["verdicts"].items():
        click.echo(f"  {gate:<12} {'PASS' if ok else 'FAIL'}  {record['gates'].get(gate, '')}")


@zoo.command()
@click.argument("name", type=click.Choice(Z.MODEL_NAMES))
def path(name: str) -> None:
    """Print the folder of zoo model NAME."""
    try:
        click.echo(Z.model_path(name))
    except FileNotFoundError as error:
        raise click.UsageError(str(error)) from error
