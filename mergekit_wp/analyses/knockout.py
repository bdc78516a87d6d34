"""Knockout and restore (Fig. 8, 16, 22-27): behaviour as top-k components are swapped between
models.

Restore copies the instruct model's slices of a set into the base; knockout copies the base's
slices into the instruct model. Sets are the top-k heads (k = 1..20) or neurons (fractions of all
neurons) by AP, by WP, at random, or AP ∪ WP; upstream (layers <= l_a, anchor utility) and
downstream (after l_a, KL utility) separately. Behaviour is IFEval strict accuracy of greedy
responses. With `ladder`, whole sets on every task too (all heads, all neurons, both, + K/V,
+ norms, + embeddings, the whole model, and all but the components): how much of the behaviour
the components carry at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import matplotlib.pyplot as plt
from tqdm.auto import tqdm

from mergekit_wp.analyses.config import AnalysisOptions, Tasks
from mergekit_wp.analyses.ranking import Kind, Region, as_names, random_k, top_k
from mergekit_wp.analyses.report import AnalysisResult, Report, matrix_panel
from mergekit_wp.components import Component, TensorGroupName

Mode = Literal["knockout", "restore"]
Method = Literal["ap", "wp", "random", "union"]
METHODS: tuple[Method, ...] = get_args(Method)


class Options(AnalysisOptions):
    heads: Sequence[int] = (1, 2, 5, 10, 20)  # k of the head curves
    neuron_fractions: Sequence[float] = (0.01, 0.02, 0.05)  # of all neurons, for the neuron curves
    methods: Sequence[Method] = METHODS
    regions: Sequence[Region] = ("upstream", "downstream")
    modes: Sequence[Mode] = ("knockout", "restore")
    top_fraction: float = 0.05
    union: bool = True  # the top-fraction bars include AP ∪ WP
    ladder: bool = True
    tasks: Tasks = "main"


# Whole sets, growing to the whole model: how much of the behaviour the components can carry at
# all, and how much lives in tensors no component owns (K/V, norms, embeddings and lm_head).
LADDER: tuple[tuple[str, tuple[Kind, ...], tuple[TensorGroupName, ...]], ...] = (
    ("all heads", ("head",), ()),
    ("all neurons", ("neuron",), ()),
    ("all heads + neurons", ("head", "neuron"), ()),
    ("+ K/V", ("head", "neuron"), ("kv",)),
    ("+ K/V + norms", ("head", "neuron"), ("kv", "other")),
    ("+ K/V + norms + embeddings", ("head", "neuron"), ("kv", "other", "embedding")),
    ("whole model", ("head", "neuron"), ("kv", "other", "embedding", "unembedding")),
    ("all but heads + neurons", (), ("kv", "other", "embedding", "unembedding")),
)


def select(study, task: str, kind: Kind, region: Region, method: str, k: int) -> list[Component]:
    """The k components of `region` ranked first by `method` (union: top-k AP ∪ top-k WP)."""
    mask = study.region_mask(kind, region, task)
    layers, units = study.heads_shape if kind == "head" else study.neurons_shape
    if method == "random":
        return random_k(layers, units, k, kind, study.seed, mask)
    if method == "union":
        ap = select(study, task, kind, region, "ap", k)
        return ap + [c for c in select(study, task, kind, region, "wp", k) if c not in set(ap)]
    return top_k(study.region_scores(task, method, kind, region), k, kind, mask)


def behaviour(study, task: str, mode: Mode, components: list[Component]) -> float:
    """Accuracy after restoring `components` into the base or knocking them out of the instruct."""
    if mode == "restore":
        return study.restore_accuracy(task, components)
    return study.knockout_accuracy(task, components)


def neuron_counts(study, fractions: list[float]) -> list[int]:
    total = study.neurons_shape[0] * study.neurons_shape[1]
    return sorted({max(1, round(f * total)) for f in fractions})


def curves(study, task: str, options: Options) -> dict:
    """`{region: {kind: {mode: {method: [acc per k]}}}}` plus the k values used."""
    ks = {"head": sorted(options.heads), "neuron": neuron_counts(study, options.neuron_fractions)}
    methods = [m for m in METHODS if m in options.methods]
    out: dict = {"k": ks}
    jobs = [
        (r, kind, mode, m)
        for r in options.regions
        for kind in ("head", "neuron")
        for mode in options.modes
        for m in methods
    ]
    for region, kind, mode, method in tqdm(jobs, desc=f"knockout/restore {task}", leave=False):
        accs = [
            behaviour(study, task, mode, select(study, task, kind, region, method, k))
            for k in ks[kind]
        ]
        out.setdefault(region, {}).setdefault(kind, {}).setdefault(mode, {})[method] = accs
    return out


def plot_curves(numbers: dict, base: float, instruct: float, task: str) -> plt.Figure:
    regions = [r for r in ("upstream", "downstream") if r in numbers]
    modes = [m for m in ("knockout", "restore") if m in numbers[regions[0]]["head"]]
    cols = [(kind, mode) for kind in ("head", "neuron") for mode in modes]
    fig, axes = plt.subplots(
        len(regions), len(cols), figsize=(3.3 * len(cols), 2.9 * len(regions)), squeeze=False
    )
    for i, region in enumerate(regions):
        for j, (kind, mode) in enumerate(cols):
            ax = axes[i, j]
            for method, accs in numbers[region][kind][mode].items():
                ax.plot(
                    numbers["k"][kind],
                    accs,
                    marker="o",
                    ms=3,
                    label=method,
                    ls=":" if method == "random" else "-",
                )
            ax.axhline(base, color="brown", lw=0.8, ls="--", label="base")
            ax.axhline(instruct, color="navy", lw=0.8, ls="--", label="instruct")
            ax.set(title=f"{region} {kind} {mode}", xlabel=f"top-k {kind}s", ylim=(-0.05, 1.05))
            if j == 0:
                ax.set_ylabel("IFEval strict acc")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"knockout / restore: {task}")
    fig.tight_layout()
    return fig


def ladder(study, task: str) -> dict[str, dict[Mode, float]]:
    """`{set: {restore: acc, knockout: acc}}` for each whole set of `LADDER`."""
    out: dict[str, dict[Mode, float]] = {}
    for label, kinds, groups in LADDER:
        chosen = [c for kind in kinds for c in study.shape.components(kind)]
        out[label] = {
            mode: study.swap_accuracy(task, mode, chosen, groups)
            for mode in ("restore", "knockout")
        }
    return out


def plot_ladder(rows: dict[str, dict[str, dict[Mode, float]]]) -> plt.Figure:
    tasks = list(rows)
    sets = [label for label, _, _ in LADDER]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.1 * len(tasks), 3.8))
    for ax, mode, title in (
        (axes[0], "restore", "restore into the base"),
        (axes[1], "knockout", "knock out of the instruct model"),
    ):
        values = [[rows[t][label][mode] for t in tasks] for label in sets]
        matrix_panel(
            ax, values, sets, [t[:10] for t in tasks], f"{title}: IFEval strict acc", ".1f"
        )
    fig.tight_layout()
    return fig


def top_fraction_sets(study, task: str, method: str, fraction: float) -> list[Component]:
    """Top `fraction` of heads and of neurons, each region ranked under its own utility."""
    chosen: list[Component] = []
    for kind in ("head", "neuron"):
        for region in ("upstream", "downstream"):
            size = int(study.region_mask(kind, region, task).sum())
            if size:
                chosen += select(study, task, kind, region, method, max(1, round(fraction * size)))
    return chosen


def plot_top_fraction(rows: dict, fraction: float) -> plt.Figure:
    tasks = list(rows)
    labels = list(next(iter(rows.values())))
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 2, 3.6))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ax.bar(
            [t + i * width for t in range(len(tasks))],
            [rows[t][label] for t in tasks],
            width,
            label=label,
        )
    ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, fontsize=7, rotation=15)
    ax.set(
        ylabel="IFEval strict acc",
        title=f"restore top {fraction:.0%} heads + neurons into the base",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def run(study, report: Report, options: Options) -> AnalysisResult:
    """Curves on the chosen tasks and the top-fraction restore bars on every task."""
    data: dict = {"curves": {}, "top_fraction": {}}
    figures = []
    for task in study.tasks_for(options.tasks):
        numbers = curves(study, task, options)
        base, inst = study.base_accuracy(task), study.instruct_accuracy(task)
        numbers.update(base=base, instruct=inst)
        data["curves"][task] = numbers
        figures.append(
            report.figure("knockout", plot_curves(numbers, base, inst, task), f"curves_{task}")
        )
    fraction = options.top_fraction
    for task in study.tasks:
        row = {"base": study.base_accuracy(task), "instruct": study.instruct_accuracy(task)}
        for method in ("ap", "wp", "union") if options.union else ("ap", "wp"):
            chosen = top_fraction_sets(study, task, method, fraction)
            row[f"restore {method}"] = study.restore_accuracy(task, chosen)
            data.setdefault("top_fraction_sets", {}).setdefault(task, {})[method] = as_names(chosen)
        data["top_fraction"][task] = row
    figures.append(
        report.figure("knockout", plot_top_fraction(data["top_fraction"], fraction), "top_fraction")
    )
    if options.ladder:
        data["ladder"] = {
            task: ladder(study, task) for task in tqdm(study.tasks, desc="whole sets", leave=False)
        }
        figures.append(report.figure("knockout", plot_ladder(data["ladder"]), "ladder"))
    data["summary_numbers"] = _summary_numbers(data)
    return AnalysisResult(
        "knockout", "Knockout and restore (Fig. 8, 16)", data, figures, _summary(data)
    )


def _summary_numbers(data: dict) -> dict:
    """Area under each curve (mean accuracy over k), averaged over tasks: one number per setting."""
    out: dict = {}
    for numbers in data["curves"].values():
        for region in ("upstream", "downstream"):
            for kind in ("head", "neuron"):
                for mode, by_method in numbers.get(region, {}).get(kind, {}).items():
                    for method, accs in by_method.items():
                        key = f"{region} {kind} {mode} {method}"
                        out.setdefault(key, []).append(sum(accs) / len(accs))
    return {k: sum(v) / len(v) for k, v in out.items()}


def _summary(data: dict) -> str:
    s = data["summary_numbers"]
    parts = []
    for region in ("upstream", "downstream"):
        for kind in ("head", "neuron"):
            for mode in ("knockout", "restore"):
                key = f"{region} {kind} {mode}"
                values = [f"{m} {s[f'{key} {m}']:.2f}" for m in METHODS if f"{key} {m}" in s]
                if values:
                    parts.append(f"{key}: " + ", ".join(values))
    top = data["top_fraction"]
    wp_wins = sum(r.get("restore wp", 0) > r.get("restore ap", 0) for r in top.values())
    gains = [r.get("restore wp", 0) - r["base"] for r in top.values()]
    text = (
        "Mean accuracy over the k values: "
        + "; ".join(parts)
        + ". Top-fraction restore: WP beats AP "
        f"on {wp_wins}/{len(top)} tasks, WP's mean gain over the base "
        f"{sum(gains) / len(gains):+.2f}."
    )
    if "ladder" in data:
        ladder_rows = data["ladder"].values()
        reached = sum(
            r["all heads + neurons"]["restore"] >= top[t]["instruct"]
            for t, r in data["ladder"].items()
        )
        mean = sum(r["all heads + neurons"]["restore"] for r in ladder_rows) / len(ladder_rows)
        text += (
            " Restoring all heads + neurons reaches the instruct model's accuracy on "
            f"{reached}/{len(top)} tasks (mean {mean:.2f})."
        )
    return text
