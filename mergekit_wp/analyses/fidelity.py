"""Fidelity (Table 2): exact WP vs WP-attr — top-k head and neuron overlap, time and peak memory,
one run.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import matplotlib.pyplot as plt
import psutil
import torch

from mergekit_wp.analyses import scoring_api as api
from mergekit_wp.analyses.config import AnalysisOptions, Tasks
from mergekit_wp.analyses.ranking import overlap, top_k
from mergekit_wp.analyses.report import AnalysisResult, Report


def measure(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, float, int]:
    """`(result, seconds, peak bytes above the start)`: CUDA allocator peak, else sampled process
    RSS.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return result, time.perf_counter() - t0, torch.cuda.max_memory_allocated() - start_bytes
    process = psutil.Process()
    start_bytes = peak = process.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    peak = max(peak, process.memory_info().rss)
    return result, seconds, peak - start_bytes


def _plot(data: dict) -> plt.Figure:
    tasks = list(data)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (key, label, scale) in zip(
        axes[:2], (("seconds", "time (s)", 1.0), ("peak_bytes", "peak memory (MiB)", 2**20))
    ):
        for i, method in enumerate(("wp", "wp_attr")):
            ax.bar(
                [t + 0.4 * i for t in range(len(tasks))],
                [data[t][method][key] / scale for t in tasks],
                0.4,
                label="exact WP" if method == "wp" else "WP-attr",
            )
        ax.set_xticks([t + 0.2 for t in range(len(tasks))], tasks, fontsize=7)
        ax.set(ylabel=label, yscale="log" if key == "seconds" else "linear")
        ax.legend(fontsize=8)
    for i, key in enumerate(("head_overlap", "neuron_overlap")):
        axes[2].bar(
            [t + 0.4 * i for t in range(len(tasks))], [data[t][key] for t in tasks], 0.4, label=key
        )
    axes[2].set_xticks([t + 0.2 for t in range(len(tasks))], tasks, fontsize=7)
    axes[2].set(ylabel="top-k overlap", ylim=(0, 1.05))
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    return fig


class Options(AnalysisOptions):
    top_heads: int = 20
    top_neurons: int = 1000
    tasks: Tasks = "main"


def run(study, report: Report, options: Options) -> AnalysisResult:
    k_heads, k_neurons = options.top_heads, options.top_neurons
    data: dict = {}
    for task in study.tasks_for(options.tasks):
        study.anchor(task)
        study.batches(task, "anchor")  # tokenization is not part of either scorer's cost
        row: dict = {}
        maps = {}
        for method in ("wp", "wp_attr"):
            scores, seconds, peak = measure(
                lambda m=method, t=task: api.score(study, t, m, "anchor"), study.config.device
            )
            study.remember(task, method, "anchor", scores)
            maps[method] = scores
            row[method] = {"seconds": seconds, "peak_bytes": peak}
        mask_h = study.region_mask("head", "upstream", task)
        mask_n = study.region_mask("neuron", "upstream", task)
        row["head_overlap"] = overlap(
            top_k(maps["wp"].heads, k_heads, "head", mask_h),
            top_k(maps["wp_attr"].heads, k_heads, "head", mask_h),
        )
        row["neuron_overlap"] = overlap(
            top_k(maps["wp"].neurons, k_neurons, "neuron", mask_n),
            top_k(maps["wp_attr"].neurons, k_neurons, "neuron", mask_n),
        )
        row["head_chance"] = k_heads / max(
            int(mask_h.sum()), 1
        )  # two random k-sets of the same pool
        row["neuron_chance"] = k_neurons / max(int(mask_n.sum()), 1)
        data[task] = row
    mean = lambda key: sum(r[key] for r in data.values()) / len(data)
    t_exact = sum(r["wp"]["seconds"] for r in data.values())
    t_attr = sum(r["wp_attr"]["seconds"] for r in data.values())
    summary = (
        f"Top-{k_heads} head overlap {mean('head_overlap'):.2f} "
        f"(chance {min(mean('head_chance'), 1):.2f}), "
        f"top-{k_neurons} neuron overlap {mean('neuron_overlap'):.2f} "
        f"(chance {min(mean('neuron_chance'), 1):.2f}) "
        "among components at or before the anchor; "
        f"exact WP {t_exact:.1f} s vs WP-attr {t_attr:.1f} s ({study.config.device}, "
        f"{len(study.score_examples(study.config.main_task))} examples per task)."
    )
    figures = [report.figure("fidelity", _plot(data), "fidelity")]
    return AnalysisResult(
        "fidelity", "Fidelity of WP-attr to exact WP (Table 2)", data, figures, summary
    )
