"""The recipes in `recipes/`, generated from one declaration: `GRIDS` x combinations x `METHODS`.

`python -m mergekit_wp.evaluation.recipe_grid` rewrites `recipes/` (`--check` only compares;
tests/test_recipes.py runs it). A method whose mergekit contract cannot take a combination
(NuSLERP merges exactly two experts) gets no file; the bench lists it with mergekit's reason.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_wp.evaluation.bench import COMBINATIONS
from mergekit_wp.evaluation.recipes import contract_problem

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Grid:
    """One folder of `recipes/`: the base, the experts and where their score maps are."""

    base: str
    experts: dict[str, str]  # expert name -> model (hub id or path relative to the root)
    dtype: str
    scores: dict[str, str]  # expert name -> folder of its score maps (a scoring config's output)


@dataclass(frozen=True)
class MethodRecipe:
    """How a method's recipe reads: its mergekit method, parameters and use of the base.

    `base`: "input" names `base_model` (task-vector methods); "weight0" also lists the base
    with weight 0 (`linear` averages every input, but needs the base's config and vocabulary);
    "tokenizer" leaves it out and takes only its tokenizer (`karcher` averages every input and
    has no weights).
    """

    merge_method: str
    about: str
    expert: dict[str, Any] = field(default_factory=dict)  # every expert's parameters
    shared: dict[str, Any] = field(default_factory=dict)  # the recipe's `parameters:`
    base: str = "input"
    scores: str | None = None  # `wp`: the score-map method whose maps it reads


# Expert -> the name of its scoring config (`scoring/zoo-<name>.yml` writes out/scores/zoo-<name>).
_SCORING_NAMES = {"code": "code", "instruction": "instruct", "math": "math"}
GRIDS = {
    "paper": Grid(
        base="meta-llama/Llama-2-13b-hf",
        experts={
            "code": "layoric/llama-2-13b-code-alpaca",
            "instruction": "WizardLMTeam/WizardLM-13B-V1.2",
            "math": "WizardLMTeam/WizardMath-13B-V1.0",
        },
        dtype="float16",
        scores={e: f"out/scores/paper-{n}" for e, n in _SCORING_NAMES.items()},
    ),
    "zoo": Grid(
        base="mergekit_wp/zoo/models/base",
        experts={
            "code": "mergekit_wp/zoo/models/code",
            "instruction": "mergekit_wp/zoo/models/instruct",
            "math": "mergekit_wp/zoo/models/math",
        },
        dtype="float32",
        scores={e: f"out/scores/zoo-{n}" for e, n in _SCORING_NAMES.items()},
    ),
}
_TASK_VECTOR = {"weight": 1.0}
METHODS = {
    "linear": MethodRecipe(
        "linear", "Avg baseline: the uniform average of the experts.", _TASK_VECTOR, base="weight0"
    ),
    "task_arithmetic": MethodRecipe(
        "task_arithmetic",
        "Task Arithmetic: base + lambda x the sum of the task vectors.",
        _TASK_VECTOR,
        {"lambda": 1.0},
    ),
    "ties": MethodRecipe(
        "ties",
        "TIES: keep each task vector's top `density` by magnitude, elect signs, disjoint mean.",
        {"weight": 1.0, "density": 0.5},
        {"lambda": 1.0},
    ),
    "dare_linear": MethodRecipe(
        "dare_linear",
        "DARE-TA: drop 1 - `density` of each task vector at random, rescale, Task Arithmetic.",
        {"weight": 1.0, "density": 0.5},
        {"lambda": 1.0},
    ),
    "dare_ties": MethodRecipe(
        "dare_ties",
        "DARE-TIES: DARE's random drop and rescale, then TIES sign election of the sum.",
        {"weight": 1.0, "density": 0.5},
        {"lambda": 1.0},
    ),
    "breadcrumbs": MethodRecipe(
        "breadcrumbs",
        "Model Breadcrumbs: drop each task vector's largest `gamma` and smallest entries "
        "(keep `density`), then Task Arithmetic.",
        {"weight": 1.0, "density": 0.9, "gamma": 0.01},
        {"lambda": 1.0},
    ),
    "breadcrumbs_ties": MethodRecipe(
        "breadcrumbs_ties",
        "Breadcrumbs-TIES: Breadcrumbs' outlier and small-entry drop, then TIES sign election.",
        {"weight": 1.0, "density": 0.9, "gamma": 0.01},
        {"lambda": 1.0},
    ),
    "della": MethodRecipe(
        "della",
        "DELLA: drop by magnitude rank (keep probability `density` +- `epsilon`), rescale, "
        "TIES sign election.",
        {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
        {"lambda": 1.0},
    ),
    "della_linear": MethodRecipe(
        "della_linear",
        "DELLA-TA: DELLA's magnitude-ranked drop and rescale, then Task Arithmetic.",
        {"weight": 1.0, "density": 0.5, "epsilon": 0.15},
        {"lambda": 1.0},
    ),
    "sce": MethodRecipe(
        "sce",
        "SCE: keep the `select_topk` entries that vary most across experts, weight each task "
        "vector by its energy, erase sign conflicts.",
        shared={"select_topk": 1.0},
    ),
    "model_stock": MethodRecipe(
        "model_stock",
        "Model Stock: the experts' average pulled toward the base by their task vectors' angle.",
    ),
    "karcher": MethodRecipe(
        "karcher",
        "Karcher mean: the Riemannian mean of the experts' weights (no base: it would be "
        "averaged in; only its tokenizer).",
        base="tokenizer",
    ),
    "nuslerp": MethodRecipe(
        "nuslerp",
        "NuSLERP: spherical interpolation of the two experts' task vectors, equal weights.",
        _TASK_VECTOR,
    ),
    "widen": MethodRecipe(
        "widen",
        "WIDEN: per-column magnitude and direction changes, ranked, softmax across experts, "
        "calibrated (the method's defaults).",
    ),
    "wp_attr": MethodRecipe(
        "wp", "WP merge from WP-attr (first-order) component scores per expert.", scores="wp_attr"
    ),
    "wp": MethodRecipe(
        "wp", "WP merge from exact Weight Patching component scores per expert.", scores="wp"
    ),
}


def recipe_text(grid: Grid, combination: str, name: str) -> str | None:
    """The recipe file for one combination and method; None if the method cannot merge it."""
    method = METHODS[name]
    experts = combination.split("+")
    problem = contract_problem(method.merge_method, len(experts), method.base != "tokenizer")
    if problem:
        return None
    config: dict[str, Any] = {"merge_method": method.merge_method}
    if method.base != "tokenizer":
        config["base_model"] = grid.base
    models = [{"model": grid.base, "parameters": {"weight": 0.0}}] * (method.base == "weight0")
    for expert in experts:
        parameters = dict(method.expert)
        if method.scores:
            parameters["scores"] = f"{grid.scores[expert]}/{method.scores}.safetensors"
        entry: dict[str, Any] = {"model": grid.experts[expert]}
        if parameters:
            entry["parameters"] = parameters
        models.append(entry)
    config["models"] = models
    if method.shared:
        config["parameters"] = dict(method.shared)
    config["dtype"] = grid.dtype
    # The base's vocabulary: the instruction expert has an extra (pad) row in both grids.
    config["tokenizer_source"] = grid.base if method.base == "tokenizer" else "base"
    title = " + ".join(e.capitalize() for e in experts)
    comment = textwrap.fill(
        f"{title}: {method.about}", 98, initial_indent="# ", subsequent_indent="# "
    )
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=None, width=100)
    return f"{comment}\n{body}"


def write_recipes(folder: Path, check: bool = False) -> list[Path]:
    """Write (or, with `check`, compare) every grid's recipes; the files that differ."""
    differ = []
    for grid_name, grid in GRIDS.items():
        for combination in COMBINATIONS:
            for name in METHODS:
                path = folder / grid_name / combination / f"{name}.yml"
                text = recipe_text(grid, combination, name)
                have = path.read_text() if path.is_file() else None
                if have == text:
                    continue
                differ.append(path)
                if check:
                    continue
                if text is None:
                    path.unlink()
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text)
    return differ


def main(argv: list[str] | None = None) -> int:
    """Rewrite recipes/ from the declaration; with --check, exit 1 if a file differs."""
    parser = argparse.ArgumentParser(prog="python -m mergekit_wp.evaluation.recipes")
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "recipes", help="recipes folder")
    args = parser.parse_args(argv)
    differ = write_recipes(args.out, check=args.check)
    for path in differ:
        print(f"{'differs' if args.check else 'wrote'}: {path}")
    return 1 if args.check and differ else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
