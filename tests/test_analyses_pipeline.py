"""`mergekit-wp analyze`: config validation, the runner over every analysis, the report index."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_wp.analyses.analyze import ANALYSES, options_for, run_analyses
from mergekit_wp.analyses.config import load_config, parse_config
from mergekit_wp.analyses.knockout import select
from mergekit_wp.analyses.study import Study
from mergekit_wp.cli import main
from tests.analyses_fixtures import make_study

TINY = {
    "drift": {},
    "fidelity": {"top_heads": 3, "top_neurons": 10},
    "vocab": {"neurons": 2, "top_tokens": 5},
    "ap_vs_wp": {"top_heads": 3, "top_neurons": 10},
    "kl_vs_anchor": {"top_heads": 3, "top_neurons": 10},
    "overlap": {"targets": 3, "suppliers": 10, "k": [20], "null_control": True},
    "hierarchy": {"targets": 3, "suppliers": 5, "execution_heads": 2, "execution_neurons": 3},
    "knockout": {
        "heads": [1, 2],
        "neuron_fractions": [0.05],
        "top_fraction": 0.1,
        "methods": ["ap", "wp", "union"],
    },
    "fine_grained": {"collapse_fractions": [0.05], "part_fractions": [0.05]},
    "attention": {"top_heads": 3},
    "cross_task": {"top_heads": 3, "top_neurons": 10, "restore_neurons": 10},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_analysis_writes_json_pictures_and_the_index(tmp_path):
    assert set(TINY) == set(ANALYSES)
    study = make_study(tmp_path, TINY)
    report = run_analyses(study.config, study=study)
    assert [r.name for r in report.results] == list(ANALYSES)
    md = (report.root / "report.md").read_text()
    page = (report.root / "index.html").read_text()
    for result in report.results:
        payload = json.loads(result.json_path.read_text())
        assert payload["name"] == result.name and payload["data"] and payload["summary"]
        assert result.figures, f"{result.name} drew no picture"
        for figure in result.figures:
            assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            rel = str(figure.relative_to(report.root))
            assert f"]({rel})" in md and f'src="{rel}"' in page
    circuit = json.loads((report.root / "hierarchy" / "circuit_english_capital.json").read_text())
    ids = {n["id"] for n in circuit["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in circuit["edges"])
    assert {r for n in circuit["nodes"] for r in n["roles"]} <= {
        "source",
        "aggregation",
        "execution",
    }
    # The overlap's null control: the same anchors, a different (noise) pair, its own numbers.
    control = study.null_control()
    assert control.base is study.base and control.instruct is not study.instruct
    for task in study.tasks:
        assert torch.equal(control.anchor(task).vectors, study.anchor(task).vectors)
    assert control.cache != study.cache
    numbers = json.loads((report.root / "overlap" / "overlap.json").read_text())["data"]
    assert (
        set(numbers["null_table"]) == set(numbers["table"])
        and "Null control"
        in (json.loads((report.root / "overlap" / "overlap.json").read_text())["summary"])
    )
    # The knockout union curve restores AP's top-k plus WP's top-k, nothing else.
    union = select(study, "english_capital", "head", "upstream", "union", 2)
    assert set(union) == set(select(study, "english_capital", "head", "upstream", "ap", 2)) | set(
        select(study, "english_capital", "head", "upstream", "wp", 2)
    )
    # `--only` reruns one analysis and keeps the others' results in the index.
    partial = run_analyses(study.config, only=["drift"], study=study)
    assert [r.name for r in partial.results] == list(ANALYSES)
    assert (report.root / "report.md").read_text().count("\n## ") == len(ANALYSES)
    # Cached score maps are reused by a second study with the same inputs
    # (read back, not recomputed).
    assert (study.cache / "scores-english_capital-wp_attr-anchor.safetensors").is_file()
    again = Study(study.config, base=study.base, instruct=study.instruct, tokenizer=study.tokenizer)
    assert torch.equal(
        again.scores("english_capital", "wp").neurons, study.scores("english_capital", "wp").neurons
    )
    assert not again._batches  # nothing was scored: no batches were even built


def _raw(tmp_path):
    return {
        "base": "b",
        "instruct": "i",
        "data": {"scoring": "s.jsonl", "evaluation": "e.jsonl"},
        "analyses": {"drift": {}},
        "output": str(tmp_path),
    }


def test_config_errors_name_the_key(tmp_path):
    raw = _raw(tmp_path)
    assert parse_config(raw).tasks[0] == "english_capital"
    with pytest.raises(ValueError, match="unknown top-level key"):
        parse_config({**raw, "exampels": 3})
    with pytest.raises(ValueError, match="`examples` must be a positive integer"):
        parse_config({**raw, "examples": 0})
    with pytest.raises(ValueError, match="main_task"):
        parse_config({**raw, "tasks": ["no_comma"], "main_task": "title"})
    with pytest.raises(ValueError, match="unknown key"):
        parse_config({**raw, "anchor": {"layr": 3}})
    with pytest.raises(ValueError, match="scores.ap must be one of"):
        parse_config({**raw, "scores": {"ap": {"kl": "wp_attr"}}})
    with pytest.raises(ValueError, match="anchor.mode"):
        parse_config({**raw, "anchor": {"mode": "some"}})
    assert (
        parse_config({**raw, "scores": {"ap": {"anchor": "ap", "kl": "ap_attr"}}}).scores.ap["kl"]
        == "ap_attr"
    )
    with pytest.raises(ValueError, match="no option"):
        options_for("knockout", {"headz": [1]})
    with pytest.raises(ValueError, match="unknown analysis"):
        options_for("dirft", {})
    assert options_for("knockout", {"heads": [3]})["heads"] == [3]


def test_cli_reports_a_bad_config_as_a_usage_error(tmp_path):
    path = tmp_path / "a.yml"
    raw = _raw(tmp_path)
    raw["analyses"] = {"drift": {"color": "red"}}
    path.write_text(yaml.safe_dump(raw))
    assert load_config(path).analyses == {"drift": {"color": "red"}}
    result = CliRunner().invoke(main, ["analyze", str(path)])
    assert result.exit_code == 2
    assert re.search(r"analysis 'drift' has no option\(s\) \['color'\]", result.output)
    missing = CliRunner().invoke(main, ["analyze", str(tmp_path / "none.yml")])
    assert missing.exit_code == 2 and "file not found" in missing.output


def test_cache_key_follows_model_and_data_content(tmp_path):
    """A model rebuilt at the same path (or edited scoring data) must not reuse cached maps."""
    from mergekit_wp.analyses.study import _fingerprint

    for name in ("b", "i"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights-1")
    (tmp_path / "s.jsonl").write_text("{}\n")
    raw = {
        **_raw(tmp_path),
        "base": str(tmp_path / "b"),
        "instruct": str(tmp_path / "i"),
        "data": {"scoring": str(tmp_path / "s.jsonl"), "evaluation": "e.jsonl"},
    }
    first = _fingerprint(parse_config(raw))
    assert _fingerprint(parse_config(raw)) == first
    (tmp_path / "i" / "model.safetensors").write_bytes(b"weights-2")
    second = _fingerprint(parse_config(raw))
    assert second != first
    (tmp_path / "s.jsonl").write_text('{"a": 1}\n')
    assert _fingerprint(parse_config(raw)) not in (first, second)
