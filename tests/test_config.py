"""One configuration style (mergekit_wp.config): errors name the file, the key and what was
expected; each analysis declares its options, with the defaults the analyses always had."""

from __future__ import annotations

import pytest
import yaml

from mergekit_wp.analyses.analyze import ANALYSES, options_for
from mergekit_wp.analyses.config import load_config as load_analysis_config
from mergekit_wp.config import replace
from mergekit_wp.evaluation.suites import load_suite
from mergekit_wp.scoring.config import load_config as load_scoring_config

# The defaults `ANALYSES` held as dicts before each analysis declared its `Options`.
DEFAULTS = {
    "drift": {},
    "fidelity": {"top_heads": 20, "top_neurons": 1000, "tasks": "main"},
    "vocab": {"top_tokens": 10, "neurons": 5, "layers": None, "tasks": "all"},
    "ap_vs_wp": {"top_heads": 20, "top_neurons": 200, "tasks": "main"},
    "kl_vs_anchor": {"top_heads": 20, "top_neurons": 200, "method": "wp", "tasks": "main"},
    "overlap": {
        "targets": 20,
        "suppliers": 200,
        "k": [1000],
        "tasks": "all",
        "null_control": False,
    },
    "hierarchy": {
        "targets": 20,
        "suppliers": 200,
        "supplier_kinds": ["neuron"],
        "tau_w": 0.0,
        "tau_link": 0.0,
        "execution_heads": 5,
        "execution_neurons": 20,
        "draw_edges": 60,
        "tasks": "main",
    },
    "knockout": {
        "heads": [1, 2, 5, 10, 20],
        "neuron_fractions": [0.01, 0.02, 0.05],
        "methods": ["ap", "wp", "random", "union"],
        "regions": ["upstream", "downstream"],
        "modes": ["knockout", "restore"],
        "top_fraction": 0.05,
        "union": True,
        "ladder": True,
        "tasks": "main",
    },
    "fine_grained": {
        "collapse_fractions": [0.001, 0.005, 0.01, 0.02, 0.05],
        "part_fractions": [0.01, 0.05],
        "method": "wp_attr",
        "tasks": "all",
    },
    "attention": {"top_heads": 10, "tasks": "all"},
    "cross_task": {
        "top_heads": 20,
        "top_neurons": 200,
        "methods": ["wp", "ap"],
        "restore_neurons": 2000,
        "restore_method": "wp",
    },
}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_each_analysis_declares_the_defaults_it_always_had():
    assert set(DEFAULTS) == set(ANALYSES)
    for name, defaults in DEFAULTS.items():
        options = options_for(name, {})
        assert {k: _plain(v) for k, v in dict(options).items()} == defaults, name
        assert options_for(name, {}) == options


def test_a_bad_analysis_option_names_the_analysis_the_option_and_what_was_expected():
    with pytest.raises(
        ValueError, match=r"a\.yml: analysis 'knockout': key 'tasks': .*'all' or 'main'"
    ):
        options_for("knockout", {"tasks": "some"}, "a.yml")
    with pytest.raises(ValueError, match=r"analysis 'overlap': key 'k\.0': .*integer"):
        options_for("overlap", {"k": ["many"]})
    assert options_for("overlap", {"k": [5, 7]}).k == [5, 7]


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_errors_name_the_file_and_the_key_path(tmp_path):
    analysis = {
        "base": "b",
        "instruct": "i",
        "data": {"scoring": "s.jsonl", "evaluation": "e.jsonl"},
        "analyses": {"drift": {}},
    }
    path = _write(tmp_path / "an.yml", analysis | {"anchor": {"layr": 2}})
    with pytest.raises(
        ValueError, match=rf"{path}: unknown key 'anchor\.layr'; known: files, layer"
    ):
        load_analysis_config(path)
    path = _write(tmp_path / "an.yml", analysis | {"data": {"scoring": "s.jsonl"}})
    with pytest.raises(ValueError, match=rf"{path}: key 'data\.evaluation': Field required"):
        load_analysis_config(path)
    config = load_analysis_config(_write(tmp_path / "an.yml", analysis))
    assert config.main_task == config.tasks[0] and config.scoring_data == "s.jsonl"
    moved = replace(config, output=tmp_path / "elsewhere")
    assert moved.output == tmp_path / "elsewhere" and moved.anchor == config.anchor
    with pytest.raises(ValueError, match="`examples` must be a positive integer"):
        replace(config, examples=0)

    scoring = _write(tmp_path / "sc.yml", {"base": "b", "model": "m", "output": "o", "data": {}})
    with pytest.raises(ValueError, match=rf"{scoring}: key 'data\.source': Field required"):
        load_scoring_config(scoring)
    with pytest.raises(ValueError, match=rf"scoring config {tmp_path / 'no.yml'}: file not found"):
        load_scoring_config(tmp_path / "no.yml")

    suite = {"tasks": [{"task": "t", "column": "T", "metric": "acc"}]}
    path = _write(tmp_path / "suite.yml", suite)
    with pytest.raises(ValueError, match=r"suite .*suite\.yml: tasks\.0\.metric: 'acc' must be"):
        load_suite(path)
    path = _write(tmp_path / "suite.yml", suite | {"batch": 2})
    with pytest.raises(ValueError, match=r"suite .*suite\.yml: unknown top-level key 'batch'"):
        load_suite(path)
