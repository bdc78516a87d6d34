"""Traced vs WP-ranked neurons (Table 1/8): overlap of each top AP head's upstream suppliers with
WP's top-k.

For each of the top-20 AP heads (upstream, anchor utility), its top-200 supplier neurons by E_link
(neurons of earlier layers) are compared with the top-k neurons of the WP ranking; per task:
Max, Top-5 Avg and Top-20 Avg of the intersection rate |traced ∩ WP_k| / |traced|, under signed
and absolute rankings. "chance" is the rate a random supplier set of the same pool would get;
`null_control` repeats everything on a base / noise pair (`study.null_instruct`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch

from mergekit_wp.analyses.config import AnalysisOptions, Tasks
from mergekit_wp.analyses.ranking import overlap, top_k
from mergekit_wp.analyses.report import AnalysisResult, Report
from mergekit_wp.components import Component


def supplier_mask(target: Component, layers: int, units: int) -> torch.Tensor:
    """Neurons that can supply a target: those of layers before it."""
    return (torch.arange(layers) < target.layer).unsqueeze(1).expand(layers, units)


def traced_overlaps(
    links: dict[Component, torch.Tensor],
    wp_neurons: torch.Tensor,
    wp_mask: torch.Tensor,
    suppliers: int,
    k: int,
    absolute: bool,
) -> dict:
    """Per-target intersection rates and the paper's Max / Top-5 Avg / Top-20 Avg summaries."""
    layers, units = wp_neurons.shape
    ranked = set(top_k(wp_neurons, k, "neuron", wp_mask, absolute))
    rates, chance = [], []
    for target, link in links.items():
        pool = supplier_mask(target, layers, units)
        if not pool.any():
            continue  # a layer-0 target has no upstream neurons
        traced = top_k(link, suppliers, "neuron", pool, absolute)
        rates.append(overlap(traced, list(ranked)))
        chance.append(sum(1 for c in ranked if pool[c.layer, c.index]) / int(pool.sum()))
    ordered = sorted(rates, reverse=True)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {
        "per_target": rates,
        "max": ordered[0] if ordered else float("nan"),
        "top5_avg": mean(ordered[:5]),
        "top20_avg": mean(ordered[:20]),
        "chance": mean(chance),
        "targets_traced": len(rates),
    }


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _plot(table: dict, k: int, null: dict | None) -> plt.Figure:
    tasks = list(table)
    bars = [(stat, table, None) for stat in ("max", "top5_avg", "top20_avg")]
    bars += [("null top20_avg", null, "..")] if null else []
    bars += [("chance", table, "//")]
    width = 0.8 / len(bars)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.9), sharey=True)
    for ax, variant in zip(axes, ("signed", "absolute")):
        for i, (label, source, hatch) in enumerate(bars):
            stat = label.split()[-1]
            ax.bar(
                [t + width * i for t in range(len(tasks))],
                [source[t][variant][str(k)][stat] for t in tasks],
                width,
                label=label,
                hatch=hatch,
            )
        ax.set_xticks(
            [t + 0.4 - width / 2 for t in range(len(tasks))], tasks, fontsize=7, rotation=15
        )
        ax.set(title=f"{variant} rankings, WP top-{k}", ylabel="intersection rate")
    # One legend below both panels: inside, it covered the last task's bars.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(bars), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def overlap_table(study, task: str, n_targets: int, suppliers: int, ks: list[int]) -> dict:
    """`{signed|absolute: {k: traced_overlaps}}` of one task of one base/instruct pair."""
    mask = study.region_mask("head", "upstream", task)
    targets = top_k(study.scores(task, "ap").heads, n_targets, "head", mask)
    links = {t: v["neurons"] for t, v in study.links(task, targets).items()}
    wp = study.scores(task, "wp").neurons
    wp_mask = study.region_mask("neuron", "upstream", task)
    return {
        variant: {
            str(k): traced_overlaps(links, wp, wp_mask, suppliers, k, variant == "absolute")
            for k in ks
        }
        for variant in ("signed", "absolute")
    }


def _means(table: dict, k: int) -> dict:
    stats = ("max", "top5_avg", "top20_avg", "chance")
    return {
        v: {s: _nanmean([table[t][v][str(k)][s] for t in table]) for s in stats}
        for v in ("signed", "absolute")
    }


def _describe(avg: dict) -> str:
    return "; ".join(
        f"{v}: Max {a['max']:.2f} / Top-5 Avg {a['top5_avg']:.2f} / "
        f"Top-20 Avg {a['top20_avg']:.2f} (chance {a['chance']:.2f})"
        for v, a in avg.items()
    )


class Options(AnalysisOptions):
    targets: int = 20
    suppliers: int = 200
    k: Sequence[int] = (1000,)
    tasks: Tasks = "all"
    null_control: bool = False


def run(study, report: Report, options: Options) -> AnalysisResult:
    n_targets, suppliers = options.targets, options.suppliers
    ks = list(options.k)
    tasks = study.tasks_for(options.tasks)
    table = {task: overlap_table(study, task, n_targets, suppliers, ks) for task in tasks}
    # The same procedure on a pair whose weight change is noise of the same per-tensor norm: what
    # the overlap is when WP and the tracing share only the network and the utility.
    null = None
    if options.null_control:
        control = study.null_control()
        null = {task: overlap_table(control, task, n_targets, suppliers, ks) for task in tasks}
    k = ks[0]
    fig = report.figure("overlap", _plot(table, k, null), "overlap")
    avg = _means(table, k)
    numbers = {"table": table, "mean": avg}
    if math.isnan(avg["signed"]["max"]):
        summary = (
            "No top AP head has upstream neurons to trace (all sit in layer 0); nothing to compare."
        )
    else:
        summary = (
            f"Traced top-{suppliers} suppliers of the top-{n_targets} AP heads vs WP top-{k} "
            f"neurons, {_describe(avg)} (mean over tasks)."
        )
    if null is not None:
        numbers |= {"null_table": null, "null_mean": _means(null, k)}
        summary += (
            f" Null control (noise weight change of equal norm): {_describe(numbers['null_mean'])}."
        )
    return AnalysisResult(
        "overlap", "Traced vs WP-ranked neurons (Table 1/8)", numbers, [fig], summary
    )
