"""`mergekit-wp data ifeval | gsm8k | mbpp`: write the JSONL files the scoring configs read."""

from __future__ import annotations

import json
from pathlib import Path

import click

_OUT = click.Path(dir_okay=False, path_type=Path)
_LOCAL = click.option(
    "--from",
    "local",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read this copy of the split's parquet file instead of the hub (no network needed).",
)


def _write(out: Path, rows: list[dict]) -> None:
    """JSON lines, written to a temporary file and renamed: no half-written file on failure."""
    from mergekit_wp.io import atomic_write_text

    atomic_write_text(out, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


@click.group("data")
def data() -> None:
    """Build scoring data: paired IFEval prompts (offline), GSM8K and MBPP prompts (hub)."""


@data.command("ifeval")
@click.argument("out", type=_OUT, default="data/ifeval-paired.jsonl")
@click.option(
    "--instruction",
    "-i",
    "instructions",
    multiple=True,
    help="An IFEval instruction id of lm-eval's registry, or a short name of the "
    "paper's six; repeat for several (default: the paper's six).",
)
@click.option(
    "--per-task",
    default=200,
    show_default=True,
    help="Rows per instruction; scoring splits them into extraction / evaluation halves.",
)
@click.option(
    "--seed", default=0, show_default=True, help="Draws requests and instruction arguments."
)
def ifeval(out: Path, instructions: tuple[str, ...], per_task: int, seed: int) -> None:
    """Paired IFEval prompts (with / without the instruction) over the shipped neutral requests."""
    from mergekit_wp.prompts.ifeval import paired_rows
    from mergekit_wp.scoring.data import IFEVAL_TASKS

    try:
        rows = paired_rows(instructions or list(IFEVAL_TASKS.values()), per_task, seed)
        _write(out, rows)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    ids = dict.fromkeys(r["instruction_id_list"][0] for r in rows)
    click.echo(f"{out}: {len(rows)} pairs, {per_task} for each of {', '.join(ids)}")


def _from_hub(name: str, out: Path, local: Path | None) -> None:
    from mergekit_wp.prompts.hub import HUB_SOURCES, hub_rows

    try:
        rows = hub_rows(name, local)
        _write(out, rows)
    except (ValueError, OSError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{out}: {len(rows)} rows from {local or HUB_SOURCES[name].repo}")


@data.command("gsm8k")
@click.argument("out", type=_OUT, default="data/gsm8k-train.jsonl")
@_LOCAL
def gsm8k(out: Path, local: Path | None) -> None:
    """GSM8K's train split (openai/gsm8k, main) as JSONL: question, answer."""
    _from_hub("gsm8k", out, local)


@data.command("mbpp")
@click.argument("out", type=_OUT, default="data/mbpp-train.jsonl")
@_LOCAL
def mbpp(out: Path, local: Path | None) -> None:
    """MBPP's train split (google-research-datasets/mbpp, full) as HumanEval-schema stubs."""
    _from_hub("mbpp", out, local)
