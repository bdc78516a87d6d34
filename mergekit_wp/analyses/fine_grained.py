"""Fine-grained neurons (Fig. 9, 10): collapse under growing knockout; gate / up / down rankings.

Collapse: knockout of the top WP neurons upstream vs downstream, at a fine grid of fractions.
Parts: rank upstream neurons by the gate-only, up-only, down-only and gate+up parts of the WP-attr
score and compare with the full-unit ranking (top-k overlap and accuracy when restoring the top-k).
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch

from mergekit_wp.analyses.config import AnalysisOptions, Tasks
from mergekit_wp.analyses.knockout import behaviour, neuron_counts, select
from mergekit_wp.analyses.ranking import overlap, top_k
from mergekit_wp.analyses.report import AnalysisResult, Report

PART_RANKINGS = {
    "full": ("gate", "up", "down"),
    "gate+up": ("gate", "up"),
    "gate": ("gate",),
    "up": ("up",),
    "down": ("down",),
}


def part_scores(parts: dict[str, torch.Tensor], names: tuple[str, ...]) -> torch.Tensor:
    """Sum of the named neuron parts `[L, I]` (the full unit is gate + up + down)."""
    missing = [n for n in names if n not in parts]
    if missing:
        raise ValueError(
            f"fine-grained neurons need score-map parts {missing}; "
            "score with wp_attr (it keeps parts)"
        )
    return sum(parts[n].double() for n in names)


def collapse(study, task: str, fractions: list[float], method: str) -> dict:
    counts = neuron_counts(study, fractions)
    inst = study.instruct_accuracy(task)
    out = {"k": counts, "instruct": inst}
    for region in ("upstream", "downstream"):
        out[region] = [
            behaviour(study, task, "knockout", select(study, task, "neuron", region, method, k))
            for k in counts
        ]
    return out


def parts_numbers(study, task: str, counts: list[int], method: str) -> dict:
    parts = study.scores(task, method).parts
    mask = study.region_mask("neuron", "upstream", task)
    full = {k: top_k(part_scores(parts, PART_RANKINGS["full"]), k, "neuron", mask) for k in counts}
    out: dict = {
        "k": counts,
        "overlap": {},
        "restore": {},
        "base": study.base_accuracy(task),
        "instruct": study.instruct_accuracy(task),
    }
    for name, names in PART_RANKINGS.items():
        scores = part_scores(parts, names)
        chosen = {k: top_k(scores, k, "neuron", mask) for k in counts}
        out["overlap"][name] = [overlap(chosen[k], full[k]) for k in counts]
        out["restore"][name] = [study.restore_accuracy(task, chosen[k]) for k in counts]
    return out


def _mean(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows)]


def plot(collapse_rows: dict, parts_rows: dict) -> plt.Figure:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    first = next(iter(collapse_rows.values()))
    for region, style in (("upstream", "-"), ("downstream", "--")):
        rel = _mean(
            [[a / max(r["instruct"], 1e-9) for a in r[region]] for r in collapse_rows.values()]
        )
        axes[0].plot(first["k"], rel, ls=style, marker="o", ms=3, label=f"{region} neurons")
    axes[0].set(
        xscale="log",
        xlabel="neurons knocked out (top WP)",
        ylabel="acc / instruct acc",
        title="collapse under knockout",
    )
    axes[0].legend(fontsize=8)
    k = next(iter(parts_rows.values()))["k"]
    for name in PART_RANKINGS:
        axes[1].plot(
            k,
            _mean([r["overlap"][name] for r in parts_rows.values()]),
            marker="o",
            ms=3,
            label=name,
        )
        axes[2].plot(
            k,
            _mean([r["restore"][name] for r in parts_rows.values()]),
            marker="o",
            ms=3,
            label=name,
        )
    for key, colour in (("base", "brown"), ("instruct", "navy")):
        axes[2].axhline(
            sum(r[key] for r in parts_rows.values()) / len(parts_rows),
            color=colour,
            lw=0.8,
            ls="--",
            label=key,
        )
    axes[1].set(
        xscale="log",
        xlabel="top-k upstream neurons",
        ylabel="overlap with full ranking",
        title="part rankings vs full unit",
    )
    axes[2].set(
        xscale="log",
        xlabel="top-k upstream neurons restored",
        ylabel="IFEval strict acc",
        title="restore strength",
    )
    axes[1].legend(fontsize=8)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"fine-grained neurons (mean over {len(parts_rows)} task(s))")
    fig.tight_layout()
    return fig


class Options(AnalysisOptions):
    collapse_fractions: Sequence[float] = (0.001, 0.005, 0.01, 0.02, 0.05)
    part_fractions: Sequence[float] = (0.01, 0.05)
    method: str = "wp_attr"
    tasks: Tasks = "all"


def run(study, report: Report, options: Options) -> AnalysisResult:
    method = options.method
    tasks = study.tasks_for(options.tasks)
    collapse_rows = {t: collapse(study, t, options.collapse_fractions, "wp") for t in tasks}
    counts = neuron_counts(study, options.part_fractions)
    parts_rows = {t: parts_numbers(study, t, counts, method) for t in tasks}
    fig = report.figure("fine_grained", plot(collapse_rows, parts_rows), "fine_grained")
    last = len(counts) - 1
    mean_overlap = {
        n: _mean([r["overlap"][n] for r in parts_rows.values()])[last] for n in PART_RANKINGS
    }
    mean_restore = {
        n: _mean([r["restore"][n] for r in parts_rows.values()])[last] for n in PART_RANKINGS
    }
    up_drop = _mean([r["upstream"] for r in collapse_rows.values()])
    down_drop = _mean([r["downstream"] for r in collapse_rows.values()])
    summary = (
        f"Top {counts[last]} upstream neurons: overlap with the full-unit ranking "
        + ", ".join(f"{n} {v:.2f}" for n, v in mean_overlap.items() if n != "full")
        + "; restore accuracy "
        + ", ".join(f"{n} {v:.2f}" for n, v in mean_restore.items())
        + f". Collapse curve (mean acc) upstream {[round(a, 2) for a in up_drop]}, downstream "
        f"{[round(a, 2) for a in down_drop]}."
    )
    data = {"collapse": collapse_rows, "parts": parts_rows}
    return AnalysisResult("fine_grained", "Fine-grained neurons (Fig. 9, 10)", data, [fig], summary)
