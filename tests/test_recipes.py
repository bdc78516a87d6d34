"""recipes/: the paper's grid and the zoo's, parsed by mergekit's own configuration model."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mergekit.config import MergeConfiguration

from mergekit_wp.evaluation.bench import COMBINATIONS, METHODS, load_bench
from mergekit_wp.evaluation.recipes import main as render_main
from mergekit_wp.evaluation.recipes import read_recipe, render_recipe, score_paths
from mergekit_wp.scoring.config import load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = {
    "paper": {
        "base": "meta-llama/Llama-2-13b-hf",
        "instruction": "WizardLMTeam/WizardLM-13B-V1.2",
        "math": "WizardLMTeam/WizardMath-13B-V1.0",
        "code": "layoric/llama-2-13b-code-alpaca",
    },
    "zoo": {
        "base": "zoo:base",
        "instruction": "zoo:instruct",
        "math": "zoo:math",
        "code": "zoo:code",
    },
}
DTYPE = {"paper": "float16", "zoo": "float32"}
MERGEKIT_METHOD = {"wp_attr": "wp"}
SPARSE = ("ties", "dare_linear", "dare_ties")
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*/*/*.yml") if "+" in p.parent.name)
SCORING_CONFIGS = sorted((ROOT / "scoring").glob("*.yml")) + sorted(
    (ROOT / "recipes").glob("*/scoring/*.yml")
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


def test_grids_are_complete():
    for grid in EXPERTS:
        have = {
            p.relative_to(ROOT / "recipes" / grid).as_posix()
            for p in RECIPES
            if p.is_relative_to(ROOT / "recipes" / grid)
        }
        want = {f"{c}/{m}.yml" for c in COMBINATIONS for m in METHODS}
        assert have == want, (
            f"recipes/{grid}: missing {sorted(want - have)}, extra {sorted(have - want)}"
        )


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(ROOT / "recipes").as_posix())
def test_recipe_is_a_mergekit_configuration(path: Path):
    grid, combination, method = path.relative_to(ROOT / "recipes").with_suffix("").parts
    raw = read_recipe(path)  # MergeConfiguration.model_validate: no download
    config = MergeConfiguration.model_validate(raw)
    names = EXPERTS[grid]
    assert config.merge_method == MERGEKIT_METHOD.get(method, method)
    expected = sorted(names[e] for e in combination.split("+"))
    assert config.dtype == DTYPE[grid]
    assert str(config.base_model) == names["base"] and config.tokenizer_source == "base"
    experts = [m for m in config.models if str(m.model) != names["base"]]
    if method == "linear":  # the base is an input only for its config: weight 0, no say
        (base,) = [m for m in config.models if str(m.model) == names["base"]]
        assert base.parameters == {"weight": 0.0}
    assert sorted(str(m.model) for m in experts) == expected
    for model in experts:
        params = model.parameters or {}
        if method in SPARSE:
            assert 0 < params["density"] < 1
        if method.startswith("wp"):
            assert set(params) == {"scores"}
        else:
            assert params["weight"] == 1.0


@pytest.mark.parametrize(
    "path",
    [p for p in RECIPES if p.parent.parent.name in EXPERTS and p.stem in ("wp", "wp_attr")],
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


def test_render_makes_zoo_references_and_score_paths_absolute(tmp_path, monkeypatch):
    from mergekit_wp import zoo

    for name in ("base", "code", "math"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        (tmp_path / name / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path)
    raw = read_recipe(ROOT / "recipes/zoo/code+math/wp_attr.yml")
    rendered = render_recipe(raw, ROOT)
    assert rendered["base_model"] == str(tmp_path / "base")
    assert [m["model"] for m in rendered["models"]] == [
        str(tmp_path / "code"),
        str(tmp_path / "math"),
    ]
    for model, original in zip(rendered["models"], raw["models"]):
        assert model["parameters"]["scores"] == str(ROOT / original["parameters"]["scores"])
    MergeConfiguration.model_validate(rendered)
    assert raw["base_model"] == "zoo:base"  # the source recipe is left as it was


def test_render_refuses_missing_models(tmp_path, monkeypatch, capsys):
    from mergekit_wp import zoo

    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path)  # an empty zoo
    assert render_main([str(ROOT / "recipes/zoo/code+math/ties.yml"), str(ROOT)]) == 1
    assert "zoo model 'base' is not built" in capsys.readouterr().err
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        "merge_method: linear\nmodels:\n  - model: ./nowhere\n    parameters: {weight: 1}\n"
    )
    with pytest.raises(ValueError, match="nowhere: no such folder"):
        render_recipe(read_recipe(recipe), tmp_path)
