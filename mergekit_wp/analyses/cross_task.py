"""Cross-task structure (Fig. 13, 14): shared top components across tasks; restore one task's
neurons, test all.

Overlap: intersection counts of the top-k heads and top-k neurons (upstream, anchor utility) of
every pair of tasks. Transfer: restore the top-n upstream WP neurons of task A into the base and
measure every task B, as accuracy and as correction rate (acc - base_B) / (instruct_B - base_B).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt

from mergekit_wp.analyses.config import AnalysisOptions
from mergekit_wp.analyses.knockout import select
from mergekit_wp.analyses.ranking import top_k
from mergekit_wp.analyses.report import AnalysisResult, Report, matrix_panel
from mergekit_wp.components import Component


def intersection_counts(selections: dict[str, list[Component]]) -> list[list[int]]:
    """`[i][j]` = |top(task_i) ∩ top(task_j)|; the diagonal is each task's own k."""
    tasks = list(selections)
    sets = {t: set(selections[t]) for t in tasks}
    return [[len(sets[a] & sets[b]) for b in tasks] for a in tasks]


def _diagonal_means(rate: list[list[float]]) -> tuple[float, float]:
    """Mean correction rate on the diagonal (own task) and off it, skipping undefined (NaN)
    cells.
    """
    own = [r[i] for i, r in enumerate(rate) if not math.isnan(r[i])]
    other = [v for i, r in enumerate(rate) for j, v in enumerate(r) if i != j and not math.isnan(v)]
    mean = lambda xs: sum(xs) / len(xs) if xs else math.nan
    return mean(own), mean(other)


class Options(AnalysisOptions):
    top_heads: int = 20
    top_neurons: int = 200
    methods: Sequence[str] = ("wp", "ap")
    restore_neurons: int = 2000
    restore_method: str = "wp"


def run(study, report: Report, options: Options) -> AnalysisResult:
    tasks = study.tasks
    k_heads, k_neurons = options.top_heads, options.top_neurons
    methods = list(options.methods)
    counts: dict = {}
    for method in methods:
        counts[method] = {}
        for kind, k in (("head", k_heads), ("neuron", k_neurons)):
            sel = {
                t: top_k(
                    study.scores(t, method).heads
                    if kind == "head"
                    else study.scores(t, method).neurons,
                    k,
                    kind,
                    study.region_mask(kind, "upstream", t),
                )
                for t in tasks
            }
            counts[method][kind] = intersection_counts(sel)
    n = options.restore_neurons
    transfer, rate = [], []
    for source in tasks:
        chosen = select(study, source, "neuron", "upstream", options.restore_method, n)
        row = [study.restore_accuracy(target, chosen) for target in tasks]
        transfer.append(row)
        rate.append(
            [
                (acc - study.base_accuracy(t)) / gap
                if (gap := study.instruct_accuracy(t) - study.base_accuracy(t))
                else math.nan
                for acc, t in zip(row, tasks)
            ]
        )
    short = [t[:10] for t in tasks]
    fig, axes = plt.subplots(len(methods), 2, figsize=(9, 4 * len(methods)), squeeze=False)
    for i, method in enumerate(methods):
        matrix_panel(
            axes[i, 0],
            counts[method]["head"],
            short,
            short,
            f"{method}: top-{k_heads} heads shared",
            "d",
        )
        matrix_panel(
            axes[i, 1],
            counts[method]["neuron"],
            short,
            short,
            f"{method}: top-{k_neurons} neurons shared",
            "d",
        )
    fig.tight_layout()
    figures = [report.figure("cross_task", fig, "overlap_counts")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    matrix_panel(
        axes[0], transfer, short, short, f"restore top-{n} neurons of row task: accuracy", ".2f"
    )
    matrix_panel(axes[1], rate, short, short, "correction rate", ".2f")
    for ax in axes:
        ax.set(ylabel="neurons from", xlabel="tested on")
    fig.tight_layout()
    figures.append(report.figure("cross_task", fig, "transfer"))
    own, other = _diagonal_means(rate)
    off = [
        counts[methods[0]]["neuron"][i][j]
        for i in range(len(tasks))
        for j in range(len(tasks))
        if i != j
    ]
    summary = (
        f"Mean pairwise shared top-{k_neurons} neurons ({methods[0]}): "
        f"{sum(off) / max(len(off), 1):.1f} of {k_neurons}; restoring a task's top-{n} upstream "
        f"WP neurons: mean correction rate on its own task {own:.2f} vs {other:.2f} on the others "
        "(tasks whose base and instruct differ)."
    )
    data = {
        "tasks": tasks,
        "counts": counts,
        "restore_accuracy": transfer,
        "correction_rate": rate,
        "restore_neurons": n,
    }
    return AnalysisResult(
        "cross_task", "Cross-task structure (Fig. 13, 14)", data, figures, summary
    )
