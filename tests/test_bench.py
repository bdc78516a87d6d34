"""`mergekit-wp bench` on a reduced grid of tiny models: table files, deltas, cache, validation
of each baseline's knobs, methods that cannot merge a combination, bad inputs."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_wp.cli import main
from mergekit_wp.evaluation import bench as bench_module
from mergekit_wp.evaluation import harness
from mergekit_wp.evaluation.bench import load_bench, merge_one, run_bench
from mergekit_wp.zoo.tokenizer import train_tokenizer

COLUMNS = ["IFEval", "GSM8K", "HumanEval", "Knowledge"]
RECIPE = """merge_method: {method}
base_model: models/base
models:
{base}  - model: models/code
    parameters: {{weight: 1.0{density}}}
  - model: models/math
    parameters: {{weight: 1.0{density}}}
{shared}dtype: float32
tokenizer_source: base
"""


def write_recipe(folder: Path, method: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    linear = method == "linear"
    (folder / f"{method}.yml").write_text(
        RECIPE.format(
            method=method,
            base="  - model: models/base\n    parameters: {weight: 0.0}\n" if linear else "",
            density="" if method in ("linear", "task_arithmetic") else ", density: 0.5",
            shared="" if linear else "parameters: {lambda: 1.0}\n",
        )
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project root with three tiny Llamas (base, code, math), zoo-schema data and recipes."""
    root = tmp_path_factory.mktemp("project")
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n#### 42 Oslo Rome"] * 4, 300)
    for seed, name in enumerate(["base", "code", "math"]):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.eos_token_id,
        )
        LlamaForCausalLM(config).save_pretrained(root / "models" / name)
        tokenizer.save_pretrained(root / "models" / name)
    data = root / "data"
    data.mkdir()
    rows = {
        "ifeval_test": [
            {
                "key": i,
                "prompt": "Write. Do not use any commas.",
                "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{}],
                "task": "no_comma",
            }
            for i in range(3)
        ],
        "math_test": [{"question": f"{i} + 1?", "answer": f"#### {i + 1}"} for i in range(3)],
        "code_test": [
            {
                "task_id": f"t/{i}",
                "prompt": "def f(a):\n",
                "test": "def check(c):\n    assert c(1) == 1\n",
                "entry_point": "f",
            }
            for i in range(3)
        ],
        "knowledge_test": [
            {"question": "X lives in", "choices": ["Oslo", "Rome"], "answer": i % 2}
            for i in range(3)
        ],
    }
    for name, items in rows.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    for method in ("linear", "task_arithmetic", "ties", "dare_linear"):
        write_recipe(root / "recipes" / "code+math", method)
    (root / "bench.yml").write_text(
        "name: tiny\nrecipes: recipes\nbase: models/base\noffline: true\n"
        "experts: {code: models/code, math: models/math}\n"
        "combinations: [code+math]\nmethods: [linear, ties]\nreferences: [base]\n"
        "suite: micro\nlimit: 2\nout: out\nthreads: 1\n"
        # Random models never stop early: cap generation to keep the test quick.
        "eval: {data_dir: data, batch_size: 8, gen_kwargs: {max_gen_toks: 8}}\n"
    )
    return root


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_reduced_grid_writes_the_table_and_reruns_from_cache(project, monkeypatch):
    result = run_bench(project / "bench.yml")
    out = project / "out"
    for name in ("table.md", "table.csv", "table.png", "timings.json"):
        assert (out / name).is_file(), name
    assert (out / "table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result.seconds) == {"plan", "score", "validate", "merge", "eval", "table"}

    rows = read_rows(out / "table.csv")
    assert [(r["combination"], r["method"]) for r in rows] == [
        ("base", ""),
        ("code+math", "linear"),
        ("code+math", "ties"),
    ]
    baseline = rows[1]
    for row in rows:
        values = [float(row[c]) for c in COLUMNS]
        assert float(row["Avg"]) == pytest.approx(sum(values) / len(values))
        for column in [*COLUMNS, "Avg"]:
            if row["method"]:
                assert float(row[f"{column} delta"]) == pytest.approx(
                    float(row[column]) - float(baseline[column]), abs=1e-12
                )
            else:
                assert row[f"{column} delta"] == ""
    markdown = (out / "table.md").read_text()
    assert "| Code + Math | Avg | - |" in markdown and "|  | TIES | - |" in markdown
    summary = out / "evals" / "code+math" / "ties" / "summary.csv"
    assert read_rows(summary)[0]["suite"] == "micro"

    def refuse(*args, **kwargs):
        raise AssertionError("a cached step ran again")

    monkeypatch.setattr(bench_module, "merge_one", refuse)
    monkeypatch.setattr("mergekit_wp.evaluation.harness.evaluate_model", refuse)
    again = run_bench(project / "bench.yml")
    assert again.table == result.table


def test_dare_merges_are_seeded(project, tmp_path):
    spec = load_bench(project / "bench.yml", methods=["dare_linear"])
    job = bench_module.plan_merges(spec)[0][0].default

    def merged(seed: int, name: str) -> dict[str, torch.Tensor]:
        merge_one(job.config, tmp_path / name, seed, {})
        return load_file(tmp_path / name / "model.safetensors")

    first, again, other = merged(0, "a"), merged(0, "b"), merged(1, "c")
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(first[key], again[key])
    assert not torch.equal(first[key], other[key])


def test_bench_refuses_a_recipe_whose_models_are_missing(project, tmp_path):
    bad = tmp_path / "bad"
    write_recipe(bad / "recipes" / "code+math", "linear")
    (bad / "bench.yml").write_text(
        (project / "bench.yml").read_text().replace("methods: [linear, ties]", "methods: [linear]")
    )
    (bad / "models").mkdir()  # the recipes' models/code, models/math are not there
    result = CliRunner().invoke(main, ["bench", str(bad / "bench.yml")])
    assert result.exit_code != 0
    assert "linear.yml: model 'models/base' is not a local folder" in result.output
    assert not (bad / "out").exists()


def test_bench_refuses_a_missing_recipe_of_a_method_that_fits(project):
    out = project / "out-missing"
    result = CliRunner().invoke(
        main, ["bench", str(project / "bench.yml"), "--methods", "sce", "--out", str(out)]
    )
    assert result.exit_code != 0
    assert "no recipe" in result.output and "method 'sce'" in result.output
    assert not out.exists()


@pytest.mark.parametrize("limit", ["abc", "0", "-3", "1.5"])
def test_bench_refuses_a_bad_limit_before_any_work(project, limit):
    out = project / "out-limit"
    result = CliRunner().invoke(
        main, ["bench", str(project / "bench.yml"), "--limit", limit, "--out", str(out)]
    )
    assert result.exit_code != 0
    assert f"{limit!r} is neither a count of examples" in result.output
    assert not out.exists()


def test_bench_refuses_a_bad_limit_in_the_file(project, tmp_path):
    bench = tmp_path / "bench.yml"
    text = (project / "bench.yml").read_text().replace("name: tiny", f"name: tiny\nroot: {project}")
    bench.write_text(text.replace("limit: 2", "limit: 0"))
    with pytest.raises(ValueError, match=r"bench.yml: limit: 0 is neither"):
        load_bench(bench)
    bench.write_text(text + "validation: {suite: micro-val, limit: -1}\n")
    with pytest.raises(ValueError, match=r"validation.limit: -1 is neither"):
        load_bench(bench)


def knob_scores(folder: Path, suite) -> SimpleNamespace:
    """A stand-in for lm-eval: every column scores the merge's density (else its lambda) x 100,
    plus 1 on the test suite, so the table shows which merge was tested."""
    recipe = folder / "recipe.yml"
    value = 0.0
    if recipe.is_file():
        config = yaml.safe_load(recipe.read_text())
        shared = config.get("parameters", {}).get("lambda", 0.0)
        value = config["models"][-1]["parameters"].get("density", shared)
    extra = 0.0 if suite.name == "micro-val" else 1.0
    return SimpleNamespace(scores={c: 100 * value + extra for c in suite.columns})


@pytest.fixture
def validated(project, tmp_path, monkeypatch):
    """The tiny bench with a validation grid, lm-eval replaced by `knob_scores`."""
    calls = []

    def evaluate(folder, suite, out_dir, **kwargs):
        calls.append((suite.name, Path(out_dir).relative_to(tmp_path).as_posix()))
        return knob_scores(Path(folder), suite)

    monkeypatch.setattr(harness, "evaluate_model", evaluate)
    bench = tmp_path / "bench.yml"
    bench.write_text(
        (project / "bench.yml")
        .read_text()
        .replace("name: tiny", f"name: tiny\nroot: {project}")
        .replace("out: out", f"out: {tmp_path / 'out'}")
        .replace("methods: [linear, ties]", "methods: [linear, task_arithmetic, ties]")
        + "validation:\n  suite: micro-val\n  limit: 2\n  grid:\n"
        "    ties: {density: [0.3, 0.7, 0.5]}\n    task_arithmetic: {lambda: [1.0, 0.5]}\n"
    )
    return bench, calls


def test_validation_chooses_each_setting_and_the_table_shows_it(validated, tmp_path, monkeypatch):
    bench, calls = validated
    result = run_bench(bench)
    rows = {r["method"]: r for r in read_rows(tmp_path / "out" / "table.csv")}
    assert rows["ties"]["setting"] == "density=0.7" and rows["ties"]["IFEval"] == "71.0"
    assert float(rows["ties"]["validation Avg"]) == 70.0
    assert rows["task_arithmetic"]["setting"] == "lambda=1.0"
    assert rows["task_arithmetic"]["IFEval"] == "101.0"  # the chosen merge is the tested one
    assert rows["linear"]["setting"] == "" and rows["linear"]["validation Avg"] == ""
    assert [r for r in rows.values() if r["method"]][-1]["rank"] == "2"  # ties after TA
    validation = [c for c in calls if c[0] == "micro-val"]
    assert len(validation) == 5  # every candidate once; linear has no knobs
    assert all(path.startswith("out/validation/code+math/") for _, path in validation)
    merges = tmp_path / "out" / "merges" / "code+math"
    assert sorted(p.name for p in merges.iterdir()) == ["linear", "task_arithmetic", "ties"]
    assert "density: 0.7" in (merges / "ties" / "recipe.yml").read_text()
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "|  | TIES | density=0.7 | 71.00 (+70.00) |" in markdown
    assert "| **101.00 (+100.00)** |" in markdown  # the best merge per column is marked

    calls.clear()
    monkeypatch.setattr(bench_module, "merge_one", lambda *a, **k: pytest.fail("merged again"))
    assert run_bench(bench).table == result.table and calls == []


def test_the_demo_reuses_validation_choices_or_runs_the_recipes(validated, tmp_path, monkeypatch):
    bench, calls = validated
    run_bench(bench)
    calls.clear()
    spec = load_bench(bench)
    reused = run_bench(replace(spec, out=tmp_path / "demo", validation_from=spec.out))
    assert {r.method: r.setting for r in reused.table.merges} == {
        "linear": "",
        "task_arithmetic": "lambda=1.0",
        "ties": "density=0.7",
    }
    assert {suite for suite, _ in calls} == {"micro"}  # nothing validated again
    fresh = run_bench(replace(spec, out=tmp_path / "fresh", validation_from=tmp_path / "none"))
    assert {r.method: r.setting for r in fresh.table.merges} == dict.fromkeys(
        ("linear", "task_arithmetic", "ties"), ""
    )
    ties = next(r for r in fresh.table.merges if r.method == "ties")
    assert ties.scores["IFEval"] == 51.0  # the recipe's own density 0.5


def test_a_method_that_cannot_merge_a_combination_is_listed_with_the_reason(validated, tmp_path):
    bench, _ = validated
    result = run_bench(bench, methods=["linear", "slerp"])
    (slerp,) = [r for r in result.table.merges if r.method == "slerp"]
    assert slerp.scores is None
    assert slerp.note == "Merge method requires exactly 2 inputs; got 3"
    markdown = (tmp_path / "out" / "table.md").read_text()
    assert "|  | slerp | Merge method requires exactly 2 inputs; got 3 | n/a |" in markdown


def test_a_corrupt_cached_score_map_is_refused_with_how_to_rescore(
    validated, tmp_path, monkeypatch
):
    bench, calls = validated
    project = load_bench(bench).root
    scores = tmp_path / "maps"
    scores.mkdir()
    recipe = project / "recipes" / "code+math" / "wp_attr.yml"
    recipe.write_text(
        "merge_method: wp\nbase_model: models/base\nmodels:\n"
        + "".join(
            f"  - model: models/{e}\n    parameters: {{scores: {scores}/{e}.safetensors}}\n"
            for e in ("code", "math")
        )
        + "dtype: float32\ntokenizer_source: base\n"
    )
    try:
        for expert in ("code", "math"):
            (scores / f"{expert}.safetensors").write_bytes(b"not a safetensors file")
        config = tmp_path / "scoring.yml"
        # The stamp says the maps are current: the bench must still read them before reuse.
        producers = {(scores / f"{e}.safetensors"): (config, "wp_attr") for e in ("code", "math")}
        monkeypatch.setattr(bench_module, "_score_producers", lambda spec: producers)
        monkeypatch.setattr(bench_module, "_score_stamp", lambda spec, path: "current")
        monkeypatch.setattr(
            bench_module, "_stamp_file", lambda spec, path: tmp_path / "bench-stamp.txt"
        )
        (tmp_path / "bench-stamp.txt").write_text("current\n")
        spec = load_bench(bench, methods=["wp_attr"])
        with pytest.raises(ValueError) as err:
            run_bench(replace(spec, scoring=(config,)))
        message = str(err.value)
        assert message.startswith(f"score map {scores / 'code.safetensors'}: not a safetensors")
        assert f"re-score it (mergekit-wp score {config})" in message
        assert calls == [] and not (tmp_path / "out" / "merges").exists()
    finally:
        recipe.unlink()


@pytest.mark.parametrize("name", ["bench-zoo.yml", "bench-paper.yml"])
def test_shipped_benches_name_existing_recipes_suites_and_scoring_configs(name):
    from mergekit_wp.evaluation.recipe_grid import METHODS
    from mergekit_wp.evaluation.recipes import read_recipe
    from mergekit_wp.evaluation.suites import evals_dir, load_suite
    from mergekit_wp.evaluation.validation import apply_setting
    from mergekit_wp.scoring.config import load_config

    spec = load_bench(evals_dir() / name)
    assert spec.methods == tuple(METHODS) and spec.combinations == bench_module.COMBINATIONS
    assert spec.baseline == "linear" and spec.optional_methods == ("wp",)
    assert spec.ours == ("wp_attr", "wp")
    load_suite(spec.suite)
    for combination in spec.combinations:
        for method in spec.methods:
            recipe = spec.recipes / combination / f"{method}.yml"
            if method == "nuslerp" and combination.count("+") == 2:
                assert not recipe.exists()  # listed in the table with mergekit's reason
                continue
            for setting in spec.validation.settings(method) if spec.validation else [{}]:
                apply_setting(read_recipe(recipe), setting, str(recipe))  # each knob is settable
    outputs = {load_config(path).output for path in spec.scoring}
    assert len(outputs) == len(spec.experts)  # one scoring config per expert
    if spec.validation:
        load_suite(spec.validation.suite)
        assert not {"linear", "wp_attr", "wp"} & set(spec.validation.grid)
        assert set(spec.demo["methods"]) == {
            "linear",
            "task_arithmetic",
            "ties",
            "dare_linear",
            "dare_ties",
            "widen",
            "wp_attr",
            "wp",
        }


def test_the_table_marks_the_best_and_ranks_ours_against_the_best_baseline():
    from mergekit_wp.evaluation.table import Row, Table, to_csv, to_markdown

    rows = [
        Row("x+y", "linear", {"A": 10.0, "B": 10.0}),
        Row("x+y", "ties", {"A": 40.0, "B": 20.0}, setting="density=0.3", validation=12.0),
        Row("x+y", "wp_attr", {"A": 30.0, "B": 20.0}),
        Row("x+y", "nuslerp", None, note="Merge method requires exactly 2 non-base inputs; got 3"),
        Row("x+z", "linear", {"A": 10.0, "B": 10.0}),
        Row("x+z", "ties", {"A": 5.0, "B": 10.0}),
        Row("x+z", "wp_attr", {"A": 20.0, "B": 10.0}),
    ]
    table = Table(["A", "B"], [], rows)
    standings = {s.combination: s for s in table.standings()}
    assert (standings["x+y"].rank, standings["x+y"].best_baseline.method) == (2, "ties")
    assert standings["x+y"].margin == -5.0
    assert (standings["x+z"].rank, standings["x+z"].best_baseline.method) == (1, "linear")
    assert standings["x+z"].margin == 5.0
    markdown = to_markdown(table)
    assert "|  | TIES | density=0.3 | **40.00 (+30.00)** | **20.00 (+10.00)** | **30.00" in markdown
    assert "|  | WP (WP-attr) | - | **20.00 (+10.00)** | 10.00 (+0.00) |" in markdown  # B: all tie
    assert "| n/a | n/a | n/a |" in markdown
    assert "| x + y | WP (WP-attr) | 25.00 | 2 of 3 | TIES | 30.00 | -5.00 |" in markdown
    assert (
        "- WP (WP-attr): beats the best baseline in 1 of 2 combinations (0 tied), beats Avg in "
        "2 of 2; the best merge in 1." in markdown
    )
    csv_rows = list(csv.DictReader(to_csv(table).splitlines()))
    assert [r["rank"] for r in csv_rows] == ["3", "1", "2", "", "2", "3", "1"]
    assert csv_rows[1]["validation Avg"] == "12.0" and csv_rows[3]["note"].startswith("Merge")


def test_equal_averages_tie_whatever_the_float_order():
    from mergekit_wp.evaluation.table import Row

    avg = Row("x+y", "linear", {"A": 87.5, "B": 97.91666666666666, "C": 0.0, "D": 100.0})
    ours = Row(
        "x+y", "wp_attr", {"A": 70.83333333333334, "B": 100.0, "C": 14.583333333333334, "D": 100.0}
    )
    assert sum(ours.scores.values()) / 4 != sum(avg.scores.values()) / 4  # float noise
    assert ours.average == avg.average


def test_special_token_ids_beyond_the_merged_vocabulary_point_at_eos(tmp_path):
    from mergekit_wp.evaluation.bench import fit_special_tokens

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"vocab_size": 2560, "pad_token_id": 2560, "eos_token_id": 1}))
    assert fit_special_tokens(path) == ["pad_token_id"]
    assert json.loads(path.read_text())["pad_token_id"] == 1
    assert fit_special_tokens(path) == []  # a valid config is left alone
