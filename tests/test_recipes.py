"""recipes/: plain mergekit YAML, generated from one declaration, that `mergekit-yaml` runs as it
is from the checkout's root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergekit_wp.evaluation.bench import COMBINATIONS, load_bench, merge_one
from mergekit_wp.evaluation.recipe_grid import GRIDS, METHODS, write_recipes
from mergekit_wp.evaluation.recipes import (
    contract_problem,
    read_recipe,
    render_recipe,
    score_paths,
)
from mergekit_wp.scoring.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/*/*.yml") if "+" in p.parent.name)
SCORING_CONFIGS = sorted((ROOT / "scoring").rglob("*.yml"))
SPARSE = (
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)


def _score_producers() -> dict[Path, Path]:
    """Score-map path -> the scoring config that writes it (`<output>/<method>.safetensors`)."""
    out = {}
    for path in SCORING_CONFIGS:
        if "model" not in yaml.safe_load(path.read_text()):
            continue  # not a scoring config (e.g. scoring/zoo-analyses.yml)
        config = load_config(path)  # the scoring package's own validation
        for method in config.methods:
            out[(ROOT / config.output / f"{method}.safetensors").resolve()] = path
    return out


def test_shipped_recipes_are_the_generated_ones(tmp_path):
    assert write_recipes(ROOT / "recipes", check=True) == [], (
        "recipes/ differs from mergekit_wp.evaluation.recipe_grid: run "
        "`python -m mergekit_wp.evaluation.recipe_grid`"
    )
    written = write_recipes(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in written) == [
        p.relative_to(ROOT / "recipes") for p in RECIPES
    ]


def test_every_method_that_fits_has_a_recipe_and_the_rest_have_mergekits_reason():
    for grid in GRIDS:
        for combination in COMBINATIONS:
            have = {p.stem for p in (ROOT / "recipes" / grid / combination).glob("*.yml")}
            experts = combination.count("+") + 1
            assert have == set(METHODS) - ({"nuslerp"} if experts == 3 else set())
    assert contract_problem("nuslerp", 3, with_base=True) == (
        "Merge method requires exactly 2 non-base inputs; got 3"
    )
    assert contract_problem("nuslerp", 2, with_base=True) is None
    assert contract_problem("model_stock", 2, with_base=True) is None  # base + 2: its minimum
    assert contract_problem("not_a_method", 2, with_base=True) is None  # cannot be asked


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_is_plain_mergekit_yaml(path: Path):
    grid_name, combination, method = path.relative_to(ROOT / "recipes").with_suffix("").parts
    grid = GRIDS[grid_name]
    raw = read_recipe(path)  # MergeConfiguration.model_validate: no download
    config = MergeConfiguration.model_validate(raw)
    assert config.merge_method == METHODS[method].merge_method
    assert config.dtype == grid.dtype
    experts = sorted(grid.experts[e] for e in combination.split("+"))
    models = [str(m.model) for m in config.models]
    if method == "karcher":  # averages every input: the base gives only its tokenizer
        assert config.base_model is None and str(config.tokenizer_source) == grid.base
    else:
        assert str(config.base_model) == grid.base and config.tokenizer_source == "base"
    if method == "linear":  # the base is an input only for its config: weight 0, no say
        assert raw["models"][0] == {"model": grid.base, "parameters": {"weight": 0.0}}
        models = models[1:]
    assert sorted(models) == experts
    for reference in [*models, grid.base]:
        # Local models are folders relative to the checkout's root, as mergekit-yaml sees them.
        assert (ROOT / reference).is_dir() if grid_name == "zoo" else "/" in reference
    for model in raw["models"][-len(experts) :]:
        params = model.get("parameters") or {}
        if method in SPARSE:
            assert 0 < params["density"] < 1
        if method.startswith("wp"):
            assert set(params) == {"scores"}
    assert "zoo:" not in path.read_text()


@pytest.mark.parametrize(
    "path",
    [p for p in RECIPES if p.stem in ("wp", "wp_attr")],
    ids=lambda p: p.relative_to(ROOT / "recipes").as_posix(),
)
def test_wp_recipe_names_its_score_maps_or_their_producer(path: Path):
    """A map exists or a scoring config writes it; exact-WP maps may be absent where the grid's
    bench lists `wp` as optional (exact WP is used "where it exists")."""
    producers = _score_producers()
    bench = load_bench(ROOT / "evals" / f"bench-{path.parent.parent.name}.yml")
    raw = read_recipe(path)
    paths = score_paths(raw, ROOT)
    assert len(paths) == len(raw["models"])
    for map_path in paths:
        assert map_path.stem == path.stem, f"{path}: {map_path} is not a {path.stem} score map"
        if path.stem in bench.optional_methods:
            continue
        assert map_path.is_file() or map_path in producers, (
            f"{path}: score map {map_path} neither exists nor is written by a scoring config"
        )
    assert {p.resolve() for p in bench.scoring} >= {
        producers[p] for p in paths if p in producers
    }, "the bench must list the scoring configs its recipes need"


def test_render_resolves_relative_paths_against_the_root(tmp_path):
    for name in ("base", "code", "math"):
        (tmp_path / "m" / name).mkdir(parents=True)
        (tmp_path / "m" / name / "config.json").write_text("{}")
        (tmp_path / "m" / name / "model.safetensors").write_bytes(b"")
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: wp\nbase_model: m/base\nmodels:\n"
        "  - model: m/code\n    parameters: {scores: out/code.safetensors}\n"
        "  - model: m/math\n    parameters: {scores: out/math.safetensors}\n"
    )
    raw = read_recipe(recipe)
    rendered = render_recipe(raw, tmp_path)
    assert rendered["base_model"] == str(tmp_path / "m" / "base")
    assert [m["model"] for m in rendered["models"]] == [
        str(tmp_path / "m" / n) for n in ("code", "math")
    ]
    assert [m["parameters"]["scores"] for m in rendered["models"]] == [
        str(tmp_path / "out" / f"{n}.safetensors") for n in ("code", "math")
    ]
    assert raw["base_model"] == "m/base"  # the source recipe is left as it was
    recipe.write_text(
        "merge_method: linear\nmodels:\n  - model: ./nowhere\n    parameters: {weight: 1}\n"
    )
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        render_recipe(read_recipe(recipe), tmp_path)


def test_a_shipped_zoo_recipe_runs_under_plain_mergekit_yaml(tmp_path):
    """From the checkout's root, as a user would; the same merge as the bench's Python API."""
    recipe = "recipes/zoo/code+instruction/ties.yml"  # the instruct expert has an extra row
    out = tmp_path / "cli"
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mergekit-yaml"), recipe, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (
        model.config.vocab_size
        == AutoModelForCausalLM.from_pretrained(
            ROOT / "mergekit_wp/zoo/models/base"
        ).config.vocab_size
    )
    merge_one(render_recipe(read_recipe(ROOT / recipe), ROOT), tmp_path / "api", 0, {})
    cli, api = load_file(out / "model.safetensors"), load_file(tmp_path / "api/model.safetensors")
    assert cli.keys() == api.keys()
    for key in cli:
        torch.testing.assert_close(cli[key], api[key], rtol=0, atol=0, msg=key)
