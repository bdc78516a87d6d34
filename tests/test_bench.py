"""`mergekit-wp bench` on a reduced grid of tiny models: table files, deltas, cache, bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_wp.cli import main
from mergekit_wp.evaluation import bench as bench_module
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
dtype: float32
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
    for method in ("linear", "ties", "dare_linear"):
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
    assert set(result.seconds) == {"plan", "score", "merge", "eval", "table"}

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
    assert "| Code + Math | Avg |" in markdown and "|  | TIES |" in markdown
    summary = out / "evals" / "code+math" / "ties" / "summary.csv"
    assert read_rows(summary)[0]["suite"] == "micro"

    def refuse(*args, **kwargs):
        raise AssertionError("a cached step ran again")

    monkeypatch.setattr(bench_module, "merge_one", refuse)
    monkeypatch.setattr("mergekit_wp.evaluation.runner.evaluate_model", refuse)
    again = run_bench(project / "bench.yml")
    assert again.table == result.table


def test_dare_merges_are_seeded(project, tmp_path):
    spec = load_bench(project / "bench.yml", methods=["dare_linear"])
    job = bench_module.plan_merges(spec)[0]

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


def test_bench_refuses_an_unknown_method_recipe(project):
    result = CliRunner().invoke(
        main,
        [
            "bench",
            str(project / "bench.yml"),
            "--methods",
            "slerp",
            "--out",
            str(project / "out-slerp"),
        ],
    )
    assert result.exit_code != 0
    assert "no recipe" in result.output and "method 'slerp'" in result.output
    assert not (project / "out-slerp").exists()


@pytest.mark.parametrize("name", ["bench-zoo.yml", "bench-paper.yml"])
def test_shipped_benches_name_existing_recipes_suites_and_scoring_configs(name):
    from mergekit_wp.evaluation.suites import evals_dir, load_suite
    from mergekit_wp.scoring.config import load_config

    spec = load_bench(evals_dir() / name)
    assert spec.methods == bench_module.METHODS and spec.combinations == bench_module.COMBINATIONS
    assert spec.baseline == "linear" and spec.optional_methods == ("wp",)
    load_suite(spec.suite)
    for combination in spec.combinations:
        for method in spec.methods:
            assert (spec.recipes / combination / f"{method}.yml").is_file()
    outputs = {load_config(path).output for path in spec.scoring}
    assert len(outputs) == len(spec.experts)  # one scoring config per expert
