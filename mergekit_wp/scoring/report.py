"""Outputs of a scoring run: score maps, a JSON report, heatmaps; and `inspect` summaries."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from mergekit_wp.components import Component
from mergekit_wp.io import atomic_write_text
from mergekit_wp.scoremap import ScoreMap, read_score_map, write_score_map
from mergekit_wp.scoring.config import ScoringConfig

NEURON_BINS = 64


@dataclass
class ScoreRun:
    """What a scoring run wrote (rank 0) and its report."""

    maps: dict[str, Path]
    report_path: Path | None
    pictures: list[Path]
    report: dict[str, Any] = field(default_factory=dict)


def label(scores: ScoreMap, kind: str, layer: int, index: int) -> str:
    """`H(l,h)`, `N(l,j)`; in a mixture of experts `N(l,e,j)`, a shared expert's `N(l,shared,j)`."""
    if kind == "heads" or not scores.num_experts:
        return str(Component(kind[:-1], layer, index))
    expert, j = divmod(index, scores.expert_intermediate_size)
    if expert >= scores.num_experts:
        return f"N({layer},shared,{index - scores.num_experts * scores.expert_intermediate_size})"
    return f"N({layer},{expert},{j})"


def top_components(scores: ScoreMap, k: int) -> dict[str, list[dict[str, Any]]]:
    """The k highest-scoring heads and neurons (by signed score), labelled as `label` does."""
    out = {}
    for kind, values in (("heads", scores.heads), ("neurons", scores.neurons)):
        flat = values.flatten()
        top = torch.topk(flat, min(k, flat.numel()))
        width = values.shape[1]
        out[kind] = [
            {"component": label(scores, kind, i // width, i % width), "score": float(v)}
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
        (
            "neurons",
            _neuron_bins(scores.neurons),
            f"neuron bin ({scores.intermediate_size} neurons)",
        ),
    )
    for name, values, xlabel in panels:
        limit = float(values.abs().max()) or 1.0
        fig, ax = plt.subplots(
            figsize=(max(4.0, values.shape[1] * 0.18 + 2), max(3.0, values.shape[0] * 0.2 + 1.5))
        )
        image = ax.imshow(
            values.numpy(),
            cmap="RdBu_r",
            vmin=-limit,
            vmax=limit,
            aspect="auto",
            interpolation="nearest",
        )
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
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _write_maps(out: Path, maps: dict[str, ScoreMap], top_k: int) -> tuple[dict, list[Path], dict]:
    """`<out>/<method>.safetensors` and heatmaps; what the report says of each map."""
    written, pictures, methods = {}, [], {}
    for method, scores in maps.items():
        written[method] = write_score_map(out / f"{method}.safetensors", scores)
        pngs = heatmaps(scores, out / method)
        pictures += pngs
        methods[method] = {
            "file": str(written[method]),
            "heatmaps": [str(p) for p in pngs],
            "top": top_components(scores, top_k),
        }
    return written, pictures, methods


def stitch(upstream: ScoreMap, downstream: ScoreMap) -> ScoreMap:
    """Layers up to the upstream map's stop layer (l_a) from it, later layers from `downstream`."""
    layer = int(upstream.details["stop_layer"])
    later = slice(layer + 1, None)

    def join(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        joined = up.clone()
        joined[later] = down[later]
        return joined

    return ScoreMap(
        heads=join(upstream.heads, downstream.heads),
        neurons=join(upstream.neurons, downstream.neurons),
        method=upstream.method,
        utility=f"{upstream.utility}+{downstream.utility}",
        base_model=upstream.base_model,
        model=upstream.model,
        num_key_value_heads=upstream.num_key_value_heads,
        parts={
            k: join(v, downstream.parts[k])
            for k, v in upstream.parts.items()
            if k in downstream.parts
        },
        details={
            "stitched_after_layer": layer,
            "upstream": upstream.details,
            "downstream": downstream.details,
        },
        num_experts=upstream.num_experts,
        expert_intermediate_size=upstream.expert_intermediate_size,
    )


def write_stitched(config: ScoringConfig, upstream: ScoreRun, downstream: ScoreRun) -> ScoreRun:
    """The stitched maps of an anchor run and its downstream run, and a report linking both."""
    maps = {
        m: stitch(read_score_map(path), read_score_map(downstream.maps[m]))
        for m, path in upstream.maps.items()
    }
    written, pictures, methods = _write_maps(config.output_dir(), maps, config.top_k)
    layer = next(iter(maps.values())).details["stitched_after_layer"]
    report = {
        "base": config.base,
        "model": config.model,
        "utility": f"{config.utility.kind}+{config.utility.downstream}",
        "stitched_after_layer": layer,
        "methods": methods,
        "upstream_report": str(upstream.report_path),
        "downstream_report": str(downstream.report_path),
        "timings_s": {
            "upstream": upstream.report["timings_s"]["total"],
            "downstream": downstream.report["timings_s"]["total"],
        },
        "config": config.model_dump(),
    }
    report_path = config.output_dir() / "report.json"
    _write_json(report_path, report)
    return ScoreRun(
        written, report_path, upstream.pictures + downstream.pictures + pictures, report
    )


def write_outputs(
    config: ScoringConfig,
    maps: dict[str, ScoreMap],
    rows: list[dict[str, Any]],
    timings: dict[str, float],
    peak_bytes: int,
    model_bytes: int,
    world: int,
    on_cuda: bool = False,
) -> ScoreRun:
    """Write `<out>/<method>.safetensors`, heatmaps and `<out>/report.json`."""
    out = config.output_dir()
    written, pictures, methods = _write_maps(out, maps, config.top_k)
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
    if scores.num_experts:
        shared = scores.intermediate_size - scores.num_experts * scores.expert_intermediate_size
        lines.append(
            f"experts: {scores.num_experts} x {scores.expert_intermediate_size} neurons"
            + (f", then {shared} of the shared expert" if shared else "")
        )
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
        lines += [
            f"  {i + 1:>3}. {item['component']:<14} {item['score']:+.6g}"
            for i, item in enumerate(items)
        ]
    return "\n".join(lines)
