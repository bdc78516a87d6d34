"""Run the analyses a config asks for, in a fixed order, into one report folder."""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from mergekit_wp.analyses.config import AnalysisConfig
from mergekit_wp.analyses.report import AnalysisResult, Report

log = logging.getLogger(__name__)

# name -> (module, defaults). Order = run order: fidelity first so the exact map it times is reused.
ANALYSES: dict[str, tuple[str, dict[str, Any]]] = {
    "drift": ("mergekit_wp.analyses.drift", {}),
    "fidelity": ("mergekit_wp.analyses.fidelity", {"top_heads": 20, "top_neurons": 1000, "tasks": "main"}),
    "vocab": ("mergekit_wp.analyses.vocab", {"top_tokens": 10, "neurons": 5, "layers": None, "tasks": "all"}),
    "ap_vs_wp": ("mergekit_wp.analyses.ap_vs_wp", {"top_heads": 20, "top_neurons": 200, "tasks": "main"}),
    "kl_vs_anchor": (
        "mergekit_wp.analyses.kl_vs_anchor",
        {"top_heads": 20, "top_neurons": 200, "method": "wp", "tasks": "main"},
    ),
    "overlap": ("mergekit_wp.analyses.overlap", {"targets": 20, "suppliers": 200, "k": [1000], "tasks": "all",
                                                     "null_control": False}),
    "hierarchy": (
        "mergekit_wp.analyses.hierarchy",
        {"targets": 20, "suppliers": 200, "supplier_kinds": ["neuron"], "tau_w": 0.0, "tau_link": 0.0,
         "execution_heads": 5, "execution_neurons": 20, "draw_edges": 60, "tasks": "main"},
    ),
    "knockout": (
        "mergekit_wp.analyses.knockout",
        {"heads": [1, 2, 5, 10, 20], "neuron_fractions": [0.01, 0.02, 0.05], "methods": ["ap", "wp", "random", "union"],
         "regions": ["upstream", "downstream"], "modes": ["knockout", "restore"], "top_fraction": 0.05,
         "union": True, "ladder": True, "tasks": "main"},
    ),
    "fine_grained": (
        "mergekit_wp.analyses.fine_grained",
        {"collapse_fractions": [0.001, 0.005, 0.01, 0.02, 0.05], "part_fractions": [0.01, 0.05],
         "method": "wp_attr", "tasks": "all"},
    ),
    "attention": ("mergekit_wp.analyses.attention", {"top_heads": 10, "tasks": "all"}),
    "cross_task": (
        "mergekit_wp.analyses.cross_task",
        {"top_heads": 20, "top_neurons": 200, "methods": ["wp", "ap"], "restore_neurons": 2000,
         "restore_method": "wp"},
    ),
}


def options_for(name: str, given: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """The analysis's defaults updated by the config's options; unknown names and keys are errors."""
    if name not in ANALYSES:
        raise ValueError(f"{source}: unknown analysis {name!r}; known: {', '.join(ANALYSES)}")
    defaults = ANALYSES[name][1]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{source}: analysis {name!r} has no option(s) {unknown}; known: {sorted(defaults)}")
    options = {**defaults, **given}
    if options.get("tasks", "all") not in ("all", "main"):
        raise ValueError(f"{source}: analysis {name!r}: `tasks` must be 'all' or 'main'; got {options['tasks']!r}")
    return options


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
            raise ValueError(f"{source}: --only names analyses the config does not ask for: {missing}")
    if config.threads:
        torch.set_num_threads(config.threads)
    report = Report(config.output)
    started = time.perf_counter()
    study = study or Study(config)
    for name in (n for n in ANALYSES if n in config.analyses):
        if name not in names:
            report.load_previous(name)
            continue
        module = importlib.import_module(ANALYSES[name][0])
        t0 = time.perf_counter()
        log.info("analysis %s", name)
        result: AnalysisResult = module.run(study, report, options_for(name, config.analyses[name], source))
        result.seconds = time.perf_counter() - t0
        report.add(result)
        report.write_index(_header(config, study, time.perf_counter() - started))  # partial results visible
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
        "anchor layers": ", ".join(f"{t} {layer}" for t, layer in study.anchor_layers().items()) or "none fitted",
        "total time": f"{seconds:.0f} s",
        "output": str(Path(config.output)),
    }
