"""`wp` versus mergekit's `linear` on a locally built ~125M-parameter Llama (GQA), CPU.

Builds a random base and two perturbed experts (bf16) in a temp folder, random score maps for
the experts, then runs each merge in its own child process, alternating, and reports the merge
wall time (min over repeats; run_merge only, the child's imports excluded), its CPU time (steadier
on a shared machine), and the child's peak RSS (from os.wait4; also net of the RSS reached before
the merge). Targets: time ratio wp/linear <= 1.15, peak-memory ratio <= 1.1.

    .venv/bin/python benchmarks/merge_speed.py [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIME_TARGET, MEMORY_TARGET = 1.15, 1.10


SHAPE = {
    "vocab_size": 32000,
    "hidden_size": 768,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_key_value_heads": 4,
    "tie_word_embeddings": False,
}


def build_inputs(root: Path, seed: int = 0, shape: dict | None = None) -> dict[str, dict]:
    """Base, two experts (base + small noise) and their score maps; returns both recipes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mergekit_wp.components import load_shape
    from mergekit_wp.scoremap import ScoreMap, write_score_map

    config = LlamaConfig(**(shape or SHAPE))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "base")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ("expert-a", "expert-b"):
        with torch.no_grad():
            for key, param in model.state_dict().items():
                param.copy_(state[key] + 0.01 * torch.randn_like(state[key]))
        model.save_pretrained(root / name)
    shape = load_shape(root / "base")
    files = []
    for name in ("expert-a", "expert-b"):
        scores = ScoreMap.zeros(
            shape, method="random", utility="none", base_model="base", model=name
        )
        scores.heads = torch.randn(shape.num_hidden_layers, shape.num_attention_heads)
        scores.neurons = torch.randn(shape.num_hidden_layers, shape.intermediate_size)
        files.append(write_score_map(root / f"{name}.scores.safetensors", scores))
    experts = [str(root / "expert-a"), str(root / "expert-b")]
    print(f"built base + 2 experts: {params / 1e6:.1f}M parameters each (bf16)", flush=True)
    return {
        "wp": {
            "merge_method": "wp",
            "base_model": str(root / "base"),
            "models": [
                {"model": e, "parameters": {"scores": str(f)}} for e, f in zip(experts, files)
            ],
            "dtype": "bfloat16",
        },
        "linear": {
            "merge_method": "linear",
            "models": [{"model": e, "parameters": {"weight": 1.0}} for e in experts],
            "dtype": "bfloat16",
        },
    }


def child(recipe: str, out: str) -> None:
    """One merge in this process; prints its wall and CPU seconds and the peak RSS before it."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_wp import register

    register()  # `wp` (loaded for both methods alike)

    config = MergeConfiguration.model_validate(yaml.safe_load(Path(recipe).read_text()))
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    run_merge(config, out, options=options)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rss_before_kib": before.ru_maxrss}))


def run_child(recipe: Path, out: Path) -> dict:
    """Run one merge in a child; its peak RSS comes from wait4 on that child alone."""
    args = [sys.executable, __file__, "--child", str(recipe), str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"merge of {recipe} failed with exit code {proc.returncode}")
    result = json.loads(stdout.strip().splitlines()[-1])
    return {**result, "peak_rss_kib": usage.ru_maxrss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import yaml

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        recipes = {}
        for method, recipe in build_inputs(root).items():
            recipes[method] = root / f"{method}.yml"
            recipes[method].write_text(yaml.safe_dump(recipe))
        runs: dict[str, list[dict]] = {"wp": [], "linear": []}
        for i in range(args.repeats):
            for method in ("linear", "wp") if i % 2 else ("wp", "linear"):
                runs[method].append(run_child(recipes[method], root / f"out-{method}-{i}"))
                last = runs[method][-1]
                print(
                    f"{method:>6} run {i}: {last['seconds']:.2f} s, peak RSS "
                    f"{last['peak_rss_kib'] / 1024:.0f} MiB",
                    flush=True,
                )
    report(runs)


def report(runs: dict[str, list[dict]]) -> None:
    summary = {
        m: {
            "seconds_min": min(r["seconds"] for r in rs),
            "seconds_median": statistics.median(r["seconds"] for r in rs),
            "cpu_seconds_min": min(r["cpu_seconds"] for r in rs),
            "peak_rss_mib": min(r["peak_rss_kib"] for r in rs) / 1024,
            "rss_before_merge_mib": min(r["rss_before_kib"] for r in rs) / 1024,
        }
        for m, rs in runs.items()
    }
    time_ratio = summary["wp"]["seconds_min"] / summary["linear"]["seconds_min"]
    median_ratio = summary["wp"]["seconds_median"] / summary["linear"]["seconds_median"]
    cpu_ratio = summary["wp"]["cpu_seconds_min"] / summary["linear"]["cpu_seconds_min"]
    memory_ratio = summary["wp"]["peak_rss_mib"] / summary["linear"]["peak_rss_mib"]
    growth = {m: s["peak_rss_mib"] - s["rss_before_merge_mib"] for m, s in summary.items()}
    print(json.dumps(summary, indent=2))
    print(
        f"time ratio wp/linear: {time_ratio:.3f} (median {median_ratio:.3f}, CPU time "
        f"{cpu_ratio:.3f}; target <= {TIME_TARGET}) "
        f"{'ok' if time_ratio <= TIME_TARGET else 'MISSED'}"
    )
    print(
        f"peak-memory ratio wp/linear: {memory_ratio:.3f} (growth during the merge: wp "
        f"{growth['wp']:.0f} MiB, linear {growth['linear']:.0f} MiB; target <= {MEMORY_TARGET}) "
        f"{'ok' if memory_ratio <= MEMORY_TARGET else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
