"""Run the analyses a config asks for, in a fixed order, into one report folder."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mergekit_wp.analyses.config import AnalysisConfig, AnalysisOptions
from mergekit_wp.analyses.report import AnalysisResult, Report
from mergekit_wp.config import validate

log = logging.getLogger(__name__)

# name -> module (its `run` and its `Options`). Order = run order: fidelity first so the exact map
# it times is reused.
ANALYSES: dict[str, str] = {
    name: f"mergekit_wp.analyses.{name}"
    for name in (
        "drift",
        "fidelity",
        "vocab",
        "ap_vs_wp",
        "kl_vs_anchor",
        "overlap",
        "hierarchy",
        "knockout",
        "fine_grained",
        "attention",
        "cross_task",
    )
}


def options_for(name: str, given: dict[str, Any], source: str = "config") -> AnalysisOptions:
    """The analysis's `Options` from the config's mapping; unknown analyses, options are errors."""
    if name not in ANALYSES:
        raise ValueError(f"{source}: unknown analysis {name!r}; known: {', '.join(ANALYSES)}")
    model: type[AnalysisOptions] = importlib.import_module(ANALYSES[name]).Options
    unknown = sorted(set(given) - set(model.model_fields))
    if unknown:
        raise ValueError(
            f"{source}: analysis {name!r} has no option(s) {unknown}; "
            f"known: {sorted(model.model_fields)}"
        )
    return validate(model, given, f"{source}: analysis {name!r}")


def run_analyses(
    config: AnalysisConfig, only: list[str] | None = None, study: Any = None, source: str = "config"
) -> Report:
    """Run the config's analyses (or the `only` subset) and write their JSON, PNGs and the index."""
    from mergekit_wp.analyses.study import Study

    names = [n for n in ANALYSES if n in config.analyses and (only is None or n in only)]
    for name in config.analyses:
        options_for(name, config.analyses[name], source)  # fail on a bad option before any work
    if only:
        missing = sorted(set(only) - set(config.analyses))
        if missing:
            raise ValueError(
                f"{source}: --only names analyses the config does not ask for: {missing}"
            )
    if config.threads:
        torch.set_num_threads(config.threads)
    report = Report(config.output)
    started = time.perf_counter()
    study = study or Study(config)
    for name in (n for n in ANALYSES if n in config.analyses):
        if name not in names:
            report.load_previous(name)
            continue
        module = importlib.import_module(ANALYSES[name])
        t0 = time.perf_counter()
        log.info("analysis %s", name)
        result: AnalysisResult = module.run(
            study, report, options_for(name, config.analyses[name], source)
        )
        result.seconds = time.perf_counter() - t0
        report.add(result)
        report.write_index(
            _header(config, study, time.perf_counter() - started)
        )  # partial results visible
    report.write_index(_header(config, study, time.perf_counter() - started))
    return report


def _header(config: AnalysisConfig, study: Any, seconds: float) -> dict[str, Any]:
    return {
        "base": config.base,
        "instruct": config.instruct,
        "tasks": ", ".join(config.tasks),
        "main task": config.main_task,
        "scorers": f"WP = {config.scores.wp}, AP = {config.scores.ap}",
        "examples": f"{config.examples} scoring / {config.eval_examples} behaviour per task, "
        f"max_new_tokens={config.max_new_tokens}",
        "device": config.device,
        "anchor layers": ", ".join(f"{t} {layer}" for t, layer in study.anchor_layers().items())
        or "none fitted",
        "total time": f"{seconds:.0f} s",
        "output": str(Path(config.output)),
    }
