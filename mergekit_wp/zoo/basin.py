"""Whether the experts behave like real fine-tunes of one base: small weight deltas, and a plain
average (mergekit `linear`, the bench's Avg recipe) that keeps each member's skill.

Also DARE's observation on single experts (drop 90 % of the delta at random, rescale the rest):
reported, not gated.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from itertools import combinations
from pathlib import Path

import torch

from mergekit_wp.zoo import gates as G

EXPERTS = ("instruct", "math", "code")
# Each expert's own task (the score its fine-tune is for) and how to read it from G.measure.
SKILLS: dict[str, tuple[str, Callable[[dict], float]]] = {
    "instruct": ("ifeval", lambda s: s["ifeval"]["all"]),
    "math": ("math", lambda s: s["math"]),
    "code": ("code", lambda s: s["code"]),
}
MERGES = tuple(c for k in (2, 3) for c in combinations(EXPERTS, k))
DARE_DENSITY = 0.1


def relative_deltas(base: Path, expert: Path) -> dict[str, float]:
    """‖θ_expert − θ_base‖ / ‖θ_base‖ per tensor of two HF folders (safetensors, one file each).

    Compared on the base's rows: an added token row of the expert has no base to differ from.
    """
    from safetensors import safe_open

    out = {}
    with (
        safe_open(base / "model.safetensors", "pt") as b,
        safe_open(expert / "model.safetensors", "pt") as e,
    ):
        for name in sorted(b.keys()):
            theta = b.get_tensor(name).double()
            delta = e.get_tensor(name).double()[: theta.shape[0]] - theta
            out[name] = (torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(theta)).item()
    return out


def delta_summary(deltas: dict[str, float], two_d: set[str]) -> dict[str, object]:
    """Median over the 2-D tensors, and the largest change of any tensor with its name."""
    worst = max(deltas, key=deltas.__getitem__)
    return {
        "median_2d": statistics.median(deltas[n] for n in deltas if n in two_d),
        "max": deltas[worst],
        "max_tensor": worst,
    }


def _two_d_tensors(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        # safe_open is not iterable: keys() is its API.
        return {n for n in f.keys() if len(f.get_slice(n).get_shape()) == 2}  # noqa: SIM118


def weight_deltas(models_dir: Path) -> dict[str, dict[str, object]]:
    """`delta_summary` of every expert against the base."""
    two_d = _two_d_tensors(models_dir / "base")
    return {
        name: delta_summary(relative_deltas(models_dir / "base", models_dir / name), two_d)
        for name in EXPERTS
    }


def _merge(config: dict, out: Path) -> None:
    from mergekit_wp.evaluation.bench import merge_one

    merge_one(config, out, seed=0, options={})


def average_recipe(models_dir: Path, members: tuple[str, ...]) -> dict:
    """The bench's Avg recipe: uniform average of the experts, the base's config and vocabulary."""
    base = str(models_dir / "base")
    return {
        "merge_method": "linear",
        "base_model": base,
        "dtype": "float32",
        "tokenizer_source": "base",
        "models": [{"model": base, "parameters": {"weight": 0.0}}]
        + [{"model": str(models_dir / m), "parameters": {"weight": 1.0}} for m in members],
    }


def dare_recipe(models_dir: Path, expert: str) -> dict:
    """DARE on one expert: drop 90 % of its delta at random, rescale the rest by 10."""
    return {
        "merge_method": "dare_linear",
        "base_model": str(models_dir / "base"),
        "dtype": "float32",
        "tokenizer_source": "base",
        "models": [
            {
                "model": str(models_dir / expert),
                "parameters": {"weight": 1.0, "density": DARE_DENSITY},
            }
        ],
    }


def _skill_of_merge(
    config: dict, members: tuple[str, ...], data_dir: Path, per_task: int | None
) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="zoo-merge-") as tmp:
        folder = Path(tmp) / "merged"
        _merge(config, folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tasks = tuple(SKILLS[m][0] for m in members)
        scores = G.measure(model, tokenizer, data_dir, per_task, tasks=tasks)
    return {m: SKILLS[m][1](scores) for m in members}


def kept(value: float, base: float, expert: float) -> float:
    """Share of the expert's skill gain over the base that `value` keeps."""
    return (value - base) / (expert - base) if expert != base else float("nan")


def merge_checks(
    models_dir: Path, data_dir: Path, per_task: int | None, scores: dict[str, dict]
) -> dict[str, dict]:
    """Retention of each member's gain in every uniform average, and DARE-90 % per expert."""

    def own(name: str, model: str) -> float:
        return SKILLS[name][1](scores[model])

    retention = {}
    for members in MERGES:
        skill = _skill_of_merge(average_recipe(models_dir, members), members, data_dir, per_task)
        retention["+".join(members)] = {
            m: {"score": skill[m], "kept": kept(skill[m], own(m, "base"), own(m, m))}
            for m in members
        }
    dare = {}
    for name in EXPERTS:
        skill = _skill_of_merge(dare_recipe(models_dir, name), (name,), data_dir, per_task)[name]
        dare[name] = {"score": skill, "kept": kept(skill, own(name, "base"), own(name, name))}
    return {"retention": retention, "dare": dare}
