"""Click commands `eval`, `bench` and `demo`: thin layers over harness, bench and demo."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click


def _parse_pairs(text: str | None, option: str) -> dict[str, str | int | float | bool]:
    """`a=1,b=x` -> {"a": 1, "b": "x"}, with lm-eval's value parsing (numbers, booleans)."""
    if not text:
        return {}
    from lm_eval.utils import simple_parse_args_string

    bad = [p for p in text.split(",") if p and "=" not in p]
    if bad:
        raise click.UsageError(f"{option}: {bad[0]!r} is not KEY=VALUE")
    return simple_parse_args_string(text)


def _limit(value: str | None) -> int | float | None:
    """An example count (10) or a fraction of each task (0.1), as lm-eval's --limit."""
    if value is None:
        return None
    number = float(value)
    return int(number) if number >= 1 and number.is_integer() else number


def _checked_limit(ctx: click.Context, param: click.Parameter, value: str | None):
    """--limit, checked while the options are parsed: before any model or task is loaded."""
    try:
        number = float(value) if value is not None else None
    except ValueError:
        number = float("nan")
    if number is not None and not (0 < number < 1 or (number >= 1 and number.is_integer())):
        raise click.BadParameter(
            f"{value!r} is neither a count of examples per task (a whole number >= 1) nor a "
            "fraction of each task (between 0 and 1)"
        )
    return _limit(value)


def default_out_dir(reference: str, suite: str) -> Path:
    """`out/eval/<model name>-<hash>-<suite>`: two models of one name get two folders."""
    digest = hashlib.sha256(reference.encode("utf-8")).hexdigest()[:8]
    return Path("out/eval") / f"{Path(reference).name}-{digest}-{suite}"


@click.command("eval")
@click.argument("model")
@click.option(
    "--suite",
    default="micro",
    show_default=True,
    help="Suite name in evals/ (paper, micro, humaneval-offline) or a suite YAML path.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    help="Folder for results.json and summary.csv "
    "[default: out/eval/<model>-<hash of its path>-<suite>].",
)
@click.option(
    "--limit",
    callback=_checked_limit,
    help="Examples per task (an int) or a fraction (0.1), as lm-eval's --limit.",
)
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True)
@click.option("--batch-size", help="Batch size (int or 'auto'); default from the suite.")
@click.option("--model-args", help="Extra lm-eval model args, KEY=VALUE,... (e.g. dtype=bfloat16).")
@click.option("--gen-kwargs", help="Generation overrides, KEY=VALUE,... (e.g. max_gen_toks=256).")
@click.option(
    "--chat-template/--no-chat-template",
    default=None,
    help="Force lm-eval's apply_chat_template on or off for every task.",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder of zoo JSONL files for the micro tasks [default: the zoo's].",
)
@click.option("--log-samples", is_flag=True, help="Also write lm-eval's per-example samples.")
@click.option(
    "--threads", type=int, help="torch CPU threads (1 is fastest for small models on shared cores)."
)
def eval_command(
    model,
    suite,
    out_dir,
    limit,
    backend,
    batch_size,
    model_args,
    gen_kwargs,
    chat_template,
    data_dir,
    log_samples,
    threads,
) -> None:
    """Evaluate MODEL (folder or hub id) on an lm-eval suite; write results and a summary row."""
    from mergekit_wp.evaluation.harness import evaluate_model
    from mergekit_wp.evaluation.suites import load_suite
    from mergekit_wp.io import check_model

    try:
        loaded = load_suite(suite)
        out_dir = out_dir or default_out_dir(check_model(model), loaded.name)
        size = int(batch_size) if batch_size and batch_size.isdigit() else batch_size
        report = evaluate_model(
            model,
            loaded,
            out_dir,
            limit=limit,
            backend=backend,
            batch_size=size,
            model_args=_parse_pairs(model_args, "--model-args"),
            gen_kwargs=_parse_pairs(gen_kwargs, "--gen-kwargs"),
            chat_template=chat_template,
            data_dir=data_dir,
            log_samples=log_samples,
            threads=threads,
        )
    except (ValueError, OSError) as err:  # OSError: e.g. a Hub id that cannot be fetched offline
        raise click.ClickException(str(err)) from None
    except AssertionError as err:  # lm-eval asserts some settings, e.g. a context too short
        raise click.ClickException(f"lm-eval refused the run: {err}") from None
    click.echo(report.summary_path.read_text(), nl=False)
    click.echo(
        f"results: {report.results_path}\nsummary: {report.summary_path} ({report.seconds:.1f} s)"
    )


@click.command("bench")
@click.argument("bench_file", type=click.Path(path_type=Path))
@click.option("--methods", help="Comma-separated subset of the bench's methods.")
@click.option("--combinations", help="Comma-separated subset, e.g. code+math,instruction+math.")
@click.option("--limit", help="Examples per task (overrides the bench's limit).")
@click.option(
    "--out", type=click.Path(path_type=Path), help="Output folder (overrides the bench's)."
)
def bench(bench_file, methods, combinations, limit, out) -> None:
    """Merge every expert combination with every method, evaluate, and write the Table-3 layout."""
    from mergekit_wp.evaluation.bench import run_bench

    try:
        result = run_bench(
            bench_file,
            methods=methods,
            combinations=combinations,
            limit=limit,  # checked by load_bench before any work
            out=out and out.resolve(),
        )
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    _print_result(result)


def _print_result(result) -> None:
    click.echo("")
    click.echo(result.paths["markdown"].read_text())
    for name, path in result.paths.items():
        click.echo(f"{name}: {path}")
    click.echo(
        "stage times: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
        + f" (total {sum(result.seconds.values()):.1f} s)"
    )


@click.command("demo")
@click.option("--limit", type=int, help="Examples per task [default: the demo's budgeted limit].")
@click.option("--out", type=click.Path(path_type=Path), help="Output folder [default: out/demo].")
def demo(limit, out) -> None:
    """Offline, on the micro zoo: score, merge the 4 combinations with every method, evaluate."""
    from mergekit_wp.evaluation.demo import run_demo

    click.echo(
        "demo: score the zoo's experts, merge 4 combinations x the methods of "
        "evals/bench-zoo.yml's `demo:`, evaluate the micro suite on the first examples of each task"
    )
    try:
        result = run_demo(limit=limit, out=out)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    _print_result(result)
    click.echo(f"chart: {result.paths['png']}")
