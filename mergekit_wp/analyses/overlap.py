"""Traced vs WP-ranked neurons (Table 1/8): overlap of each top AP head's upstream suppliers with WP's top-k.

For each of the top-20 AP heads (upstream, anchor utility), its top-200 supplier neurons by E_link
(neurons of earlier layers) are compared with the top-k neurons of the WP ranking; per task:
Max, Top-5 Avg and Top-20 Avg of the intersection rate |traced ∩ WP_k| / |traced|, under signed
and absolute rankings. "chance" is the rate a random supplier set of the same pool would get.
"""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch

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


def _plot(table: dict, k: int) -> plt.Figure:
    tasks = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
    for ax, variant in zip(axes, ("signed", "absolute")):
        for i, stat in enumerate(("max", "top5_avg", "top20_avg", "chance")):
            ax.bar([t + 0.2 * i for t in range(len(tasks))], [table[t][variant][str(k)][stat] for t in tasks],
                   0.2, label=stat, hatch="//" if stat == "chance" else None)
        ax.set_xticks([t + 0.3 for t in range(len(tasks))], tasks, fontsize=7, rotation=15)
        ax.set(title=f"{variant} rankings, WP top-{k}", ylabel="intersection rate")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def run(study, report: Report, options: dict) -> AnalysisResult:
    n_targets, suppliers = int(options["targets"]), int(options["suppliers"])
    ks = [int(k) for k in options["k"]]
    table: dict = {}
    for task in study.tasks_for(options):
        mask = study.region_mask("head", "upstream", task)
        targets = top_k(study.scores(task, "ap").heads, n_targets, "head", mask)
        links = {t: v["neurons"] for t, v in study.links(task, targets).items()}
        wp = study.scores(task, "wp").neurons
        wp_mask = study.region_mask("neuron", "upstream", task)
        table[task] = {
            variant: {str(k): traced_overlaps(links, wp, wp_mask, suppliers, k, variant == "absolute") for k in ks}
            for variant in ("signed", "absolute")
        }
    k = ks[0]
    fig = report.figure("overlap", _plot(table, k), "overlap")
    stats = ("max", "top5_avg", "top20_avg", "chance")
    avg = {v: {s: _nanmean([table[t][v][str(k)][s] for t in table]) for s in stats} for v in ("signed", "absolute")}
    if math.isnan(avg["signed"]["max"]):
        summary = "No top AP head has upstream neurons to trace (all sit in layer 0); nothing to compare."
    else:
        summary = f"Traced top-{suppliers} suppliers of the top-{n_targets} AP heads vs WP top-{k} neurons, " + "; ".join(
            f"{v}: Max {a['max']:.2f} / Top-5 Avg {a['top5_avg']:.2f} / Top-20 Avg {a['top20_avg']:.2f} "
            f"(chance {a['chance']:.2f})" for v, a in avg.items()
        ) + " (mean over tasks)."
    return AnalysisResult("overlap", "Traced vs WP-ranked neurons (Table 1/8)", {"table": table, "mean": avg},
                          [fig], summary)
