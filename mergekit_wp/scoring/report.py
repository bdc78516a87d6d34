"""Outputs of a scoring run: score maps, a JSON report, heatmaps; and `inspect` summaries."""

from __future__ import annotations

import json
import os
import tempfile
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from mergekit_wp.scoremap import ScoreMap, write_score_map
from mergekit_wp.scoring.config import ScoringConfig

NEURON_BINS = 64


def top_components(scores: ScoreMap, k: int) -> dict[str, list[dict[str, Any]]]:
    """The k highest-scoring heads and neurons (by signed score), as `H(l,h)` / `N(l,j)`."""
    out = {}
    for kind, values, letter in (("heads", scores.heads, "H"), ("neurons", scores.neurons, "N")):
        flat = values.flatten()
        top = torch.topk(flat, min(k, flat.numel()))
        width = values.shape[1]
        out[kind] = [
            {"component": f"{letter}({i // width},{i % width})", "score": float(v)}
            for v, i in zip(top.values.tolist(), top.indices.tolist())
        ]
    return out


def _neuron_bins(neurons: torch.Tensor, bins: int = NEURON_BINS) -> torch.Tensor:
    """`[L, bins]` sums of consecutive neuron scores (a readable picture of `[L, I]`)."""
    width = neurons.shape[1]
    edges = torch.linspace(0, width, min(bins, width) + 1).round().long().tolist()
    return torch.stack([neurons[:, a:b].sum(1) for a, b in pairwise(edges)], dim=1)


def heatmaps(scores: ScoreMap, stem: Path) -> list[Path]:
    """`<stem>.heads.png` (layer x head) and `<stem>.neurons.png` (layer x neuron bins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    panels = (
        ("heads", scores.heads, "head"),
        ("neurons", _neuron_bins(scores.neurons), f"neuron bin ({scores.intermediate_size} neurons)"),
    )
    for name, values, xlabel in panels:
        limit = float(values.abs().max()) or 1.0
        fig, ax = plt.subplots(figsize=(max(4.0, values.shape[1] * 0.18 + 2), max(3.0, values.shape[0] * 0.2 + 1.5)))
        image = ax.imshow(values.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                          interpolation="nearest")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer")
        ax.set_title(f"{scores.method} ({scores.utility}): {name}")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = stem.parent / f"{stem.name}.{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(tmp, path)


def write_outputs(
    config: ScoringConfig,
    maps: dict[str, ScoreMap],
    rows: list[dict[str, Any]],
    timings: dict[str, float],
    peak_bytes: int,
    model_bytes: int,
    world: int,
    on_cuda: bool = False,
):
    """Write `<out>/<method>.safetensors`, heatmaps and `<out>/report.json`."""
    from mergekit_wp.scoring.pipeline import ScoreRun

    out = config.output_dir()
    written, pictures, methods = {}, [], {}
    for method, scores in maps.items():
        written[method] = write_score_map(out / f"{method}.safetensors", scores)
        pngs = heatmaps(scores, out / method)
        pictures += pngs
        methods[method] = {"file": str(written[method]), "heatmaps": [str(p) for p in pngs],
                           "top": top_components(scores, config.top_k)}
    gaps = [r["gap"] for r in rows]
    report = {
        "base": config.base,
        "model": config.model,
        "utility": config.utility.kind,
        "methods": methods,
        "examples": len(rows),
        "kept_examples": sum(r["kept"] for r in rows),
        "skipped": [r for r in rows if not r["kept"]],
        "gap": {"mean": sum(gaps) / len(gaps), "min": min(gaps), "max": max(gaps)},
        "per_example": rows,
        "timings_s": timings,
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": "cuda max allocated" if on_cuda else "process peak RSS (cpu)",
        # In units of one model's weights; only meaningful for CUDA tensor memory.
        "peak_memory_model_weights": peak_bytes / model_bytes if on_cuda else None,
        "model_weight_bytes": model_bytes,
        "processes": world,
        "config": config.model_dump(),
    }
    report_path = out / "report.json"
    _write_json(report_path, report)
    return ScoreRun(written, report_path, pictures, report)


def summary(scores: ScoreMap, k: int = 20) -> str:
    """A printable summary of a score map: what made it, totals, and the top-k."""
    lines = [
        f"method: {scores.method}   utility: {scores.utility}",
        f"base: {scores.base_model}",
        f"model: {scores.model}",
        (
            f"shape: {scores.num_hidden_layers} layers x {scores.num_attention_heads} heads "
            f"({scores.num_key_value_heads} KV), {scores.intermediate_size} neurons per layer"
        ),
    ]
    if scores.parts:
        lines.append(f"parts: {', '.join(sorted(scores.parts))}")
    for key in ("examples", "kept_examples", "skipped_examples", "stop_layer"):
        if key in scores.details:
            lines.append(f"{key}: {scores.details[key]}")
    for kind, values in (("heads", scores.heads), ("neurons", scores.neurons)):
        lines.append(
            f"{kind}: sum {float(values.sum()):+.4g}, max {float(values.max()):+.4g}, "
            f"min {float(values.min()):+.4g}, non-zero {int((values != 0).sum())}/{values.numel()}"
        )
    for kind, items in top_components(scores, k).items():
        lines.append(f"top {len(items)} {kind}:")
        lines += [f"  {i + 1:>3}. {item['component']:<14} {item['score']:+.6g}" for i, item in enumerate(items)]
    return "\n".join(lines)
