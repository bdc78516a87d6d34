"""Two rankings of the same components side by side: heatmaps, top-k layer distributions, overlap.

AP vs WP (Fig. 6/7) and anchor vs KL utility (Fig. 37/38) are both this comparison.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch

from mergekit_wp.analyses.config import AnalysisOptions, Tasks
from mergekit_wp.analyses.ranking import layer_counts, overlap, top_k
from mergekit_wp.analyses.report import AnalysisResult, Report
from mergekit_wp.scoremap import ScoreMap


def normalized(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their largest magnitude (the paper's heatmaps show normalized scores)."""
    peak = scores.abs().max()
    return scores / peak if peak > 0 else scores.clone()


def compare_maps(
    a: ScoreMap,
    b: ScoreMap,
    top_heads: int,
    top_neurons: int,
    masks: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Top-k overlap and layer distributions of two maps, heads and neurons
    (inside `masks[kind]`).
    """
    out: dict = {}
    masks = masks or {}
    for kind, k, ta, tb in (
        ("head", top_heads, a.heads, b.heads),
        ("neuron", top_neurons, a.neurons, b.neurons),
    ):
        mask = masks.get(kind)
        sel_a, sel_b = top_k(ta, k, kind, mask), top_k(tb, k, kind, mask)
        layers = ta.shape[0]
        shared = [c for c in sel_a if c in set(sel_b)]
        out[kind] = {
            "k": len(sel_a),
            "overlap": overlap(sel_a, sel_b),
            # Expected overlap of two random k-sets of the compared components.
            "chance": min(
                1.0, len(sel_a) / (ta.numel() if mask is None else max(int(mask.sum()), 1))
            ),
            "layers_a": layer_counts(sel_a, layers),
            "layers_b": layer_counts(sel_b, layers),
            "layers_shared": layer_counts(shared, layers),
            "spearman_like": _rank_correlation(ta, tb),
        }
    return out


def _rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of the two score tensors (ties by position)."""
    ra = a.flatten().double().argsort().argsort().double()
    rb = b.flatten().double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = ra.norm() * rb.norm()
    return float(ra @ rb / denom) if denom > 0 else float("nan")


def plot_heatmaps(a: ScoreMap, b: ScoreMap, labels: tuple[str, str], title: str) -> plt.Figure:
    fig, axes = plt.subplots(2, 2, figsize=(11, 6))
    for col, (label, m) in enumerate(zip(labels, (a, b))):
        for row, (kind, t) in enumerate((("heads", m.heads), ("neurons", m.neurons))):
            ax = axes[row, col]
            values = normalized(t.double()).T.numpy()  # units on the y axis, layers on x
            im = ax.imshow(
                values,
                aspect="auto",
                cmap="RdBu_r",
                vmin=-1,
                vmax=1,
                origin="lower",
                interpolation="nearest",
            )
            ax.set(
                title=f"{label}: {kind}", xlabel="layer", ylabel="head" if row == 0 else "neuron"
            )
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_distributions(numbers: dict, labels: tuple[str, str], title: str) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, kind in zip(axes, ("head", "neuron")):
        d = numbers[kind]
        xs = torch.arange(len(d["layers_a"])).float()
        ax.bar(xs - 0.27, d["layers_a"], 0.27, label=labels[0])
        ax.bar(xs, d["layers_b"], 0.27, label=labels[1])
        ax.bar(xs + 0.27, d["layers_shared"], 0.27, label="shared")
        ax.set(
            xlabel="layer",
            ylabel="count",
            title=f"top-{d['k']} {kind}s (overlap {d['overlap']:.2f})",
        )
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


class Comparison(AnalysisOptions):
    """Options of the analyses that compare two score maps (ap_vs_wp, kl_vs_anchor)."""

    top_heads: int = 20
    top_neurons: int = 200
    tasks: Tasks = "main"


def run_comparison(
    study,
    report: Report,
    options: Comparison,
    name: str,
    title: str,
    maps,  # task -> (ScoreMap a, ScoreMap b)
    labels: tuple[str, str],
) -> AnalysisResult:
    top_heads, top_neurons = options.top_heads, options.top_neurons
    data: dict = {}
    figures = []
    for task in study.tasks_for(options.tasks):
        a, b = maps(task)
        # Both rankings cover the components at or before l_a: the anchor utility is 0 after it, and
        # a signed top-k would otherwise prefer those zeros to negative upstream scores.
        masks = {kind: study.region_mask(kind, "upstream", task) for kind in ("head", "neuron")}
        numbers = compare_maps(a, b, top_heads, top_neurons, masks)
        data[task] = numbers
        figures.append(
            report.figure(name, plot_heatmaps(a, b, labels, f"{title}: {task}"), f"heatmaps_{task}")
        )
        figures.append(
            report.figure(
                name, plot_distributions(numbers, labels, f"{title}: {task}"), f"layers_{task}"
            )
        )
    head = sum(d["head"]["overlap"] for d in data.values()) / len(data)
    neuron = sum(d["neuron"]["overlap"] for d in data.values()) / len(data)
    chance = {
        kind: sum(d[kind]["chance"] for d in data.values()) / len(data)
        for kind in ("head", "neuron")
    }
    summary = (
        f"{labels[0]} vs {labels[1]}: mean top-{top_heads} head overlap {head:.2f} (chance "
        f"{chance['head']:.2f}), top-{top_neurons} neuron overlap {neuron:.2f} "
        f"(chance {chance['neuron']:.2f})."
    )
    return AnalysisResult(name, title, data, figures, summary)


def mean_layer(counts: list[int]) -> float:
    total = sum(counts)
    return sum(i * c for i, c in enumerate(counts)) / total if total else float("nan")
