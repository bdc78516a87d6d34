"""Parameter drift (Fig. 15/32/33): layer-wise mean |Δθ| of q, k, v, o and gate, up, down."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import torch

from mergekit_wp.analyses.config import AnalysisOptions
from mergekit_wp.analyses.report import AnalysisResult, Report
from mergekit_wp.components import ModelShape

ATTENTION = ("q", "k", "v", "o")
MLP = ("gate", "up", "down")


def parameter_drift(
    base: Mapping[str, torch.Tensor], sft: Mapping[str, torch.Tensor], shape: ModelShape
) -> dict[str, list[float]]:
    """`{part: [mean |θ_sft - θ_base| of that layer's weight, per layer]}` for the 7 projections."""
    out: dict[str, list[float]] = {}
    for part in ATTENTION + MLP:
        role = shape.role(part)  # the projection, not a norm sharing the part (OLMo 2)
        values = []
        for layer in range(shape.num_hidden_layers):
            name = f"{shape.module_path(layer, role)}.weight"
            if name not in base or name not in sft:
                raise ValueError(f"parameter drift: tensor {name!r} missing from a model")
            delta = sft[name].detach().double() - base[name].detach().double()
            # A fused tensor (Phi-3's qkv_proj) holds several parts: take this part's block.
            values.append(float(delta[shape.role_block(role, delta.ndim)].abs().mean()))
        out[part] = values
    return out


def module_means(drift: dict[str, list[float]]) -> dict[str, list[float]]:
    """Attention and MLP per layer: the mean over their projections' per-layer means."""
    layers = len(next(iter(drift.values())))
    return {
        group: [sum(drift[p][layer] for p in parts) / len(parts) for layer in range(layers)]
        for group, parts in (("attention", ATTENTION), ("mlp", MLP))
    }


def plot_drift(drift: dict[str, list[float]]) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    layers = range(len(drift["q"]))
    for part in ATTENTION:
        axes[0].plot(layers, drift[part], marker="o", ms=3, label=f"attn {part}", ls="--")
    for part in MLP:
        axes[0].plot(layers, drift[part], marker="s", ms=3, label=f"mlp {part}")
    axes[0].set(xlabel="layer", ylabel="mean |Δθ|", title="per projection")
    axes[0].legend(fontsize=7, ncol=2)
    means = module_means(drift)
    width = 0.4
    xs = torch.arange(len(layers)).float()
    axes[1].bar(xs - width / 2, means["attention"], width, label="attention (q,k,v,o)")
    axes[1].bar(xs + width / 2, means["mlp"], width, label="MLP (gate,up,down)")
    axes[1].set(xlabel="layer", ylabel="mean |Δθ|", title="attention vs MLP")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


class Options(AnalysisOptions):
    """Drift takes no options: it compares every weight of the pair."""


def run(study, report: Report, options: Options) -> AnalysisResult:
    """Drift between the study's base and instruct models."""
    drift = parameter_drift(study.base.state_dict(), study.instruct.state_dict(), study.shape)
    means = module_means(drift)
    mlp_larger = sum(m > a for m, a in zip(means["mlp"], means["attention"]))
    top_part = max(drift, key=lambda p: sum(drift[p]))
    fig = report.figure("drift", plot_drift(drift), "drift")
    summary = (
        f"MLP drift exceeds attention drift in {mlp_larger}/{len(means['mlp'])} layers; "
        f"largest total drift in {top_part}_proj."
    )
    return AnalysisResult(
        "drift",
        "Parameter drift (Fig. 15)",
        {"per_projection": drift, **means, "mlp_larger_layers": mlp_larger, "top_part": top_part},
        [fig],
        summary,
    )
