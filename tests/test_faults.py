"""Bad input and faults: each gives one line naming the file and what was expected, exits
non-zero and writes nothing; nothing silently wrong, nothing stale served (docs/errors.md)."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from safetensors.torch import load_file

import mergekit_wp.merge_method as wp
from mergekit_wp.cli import main
from mergekit_wp.components import load_shape
from mergekit_wp.scoremap import ScoreMap, ScoreMapError, write_score_map
from mergekit_wp.scoring.config import parse_config
from mergekit_wp.scoring.pipeline import score
from tests.test_merge_method import CONFIGS, OPTIONS, save_model
from tests.test_scoring_helpers import model_pair, save_pair, write_anchor, write_paired

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


# --- a tiny base, two experts and their score maps ------------------------------------------------
@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("family")
    config = CONFIGS["llama"]()
    base, *experts = (save_model(root / n, config, seed) for seed, n in enumerate("bxy"))
    shape = load_shape(base)
    maps = []
    for k, expert in enumerate(experts):
        gen = torch.Generator().manual_seed(k)
        heads = torch.randn(shape.num_hidden_layers, shape.num_attention_heads, generator=gen)
        neurons = torch.randn(shape.num_hidden_layers, shape.intermediate_size, generator=gen)
        maps.append(write_map(root / f"s{k}.safetensors", base, expert, heads, neurons))
    return {"root": root, "base": base, "experts": experts, "maps": maps, "shape": shape}


def write_map(path: Path, base, model, heads: torch.Tensor, neurons: torch.Tensor) -> Path:
    shape = load_shape(base)
    scores = ScoreMap.zeros(
        shape, method="wp_attr", utility="kl", base_model=str(base), model=str(model)
    )
    scores.heads, scores.neurons = heads.float(), neurons.float()
    return write_score_map(path, scores)


def recipe(fam: dict, maps: list[Path] | None = None, **extra) -> dict:
    maps = maps or fam["maps"]
    return {
        "merge_method": "wp",
        "base_model": str(fam["base"]),
        "models": [
            {"model": str(e), "parameters": {"scores": str(m)}}
            for e, m in zip(fam["experts"], maps)
        ],
        "dtype": "float32",
        **extra,
    }


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def merge_cli(*args: str):
    return CliRunner().invoke(main, ["merge", *args, "--no-copy-tokenizer", "--quiet"])


def modes(folder: Path) -> set[int]:
    return {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}


# --- merge: output folder -------------------------------------------------------------------
def test_merge_refuses_a_used_folder_and_overwrite_swaps_in_the_whole_new_merge(family, tmp_path):
    r = write_recipe(tmp_path / "r.yml", recipe(family))
    out = tmp_path / "out"
    first = merge_cli(str(r), str(out))
    assert first.exit_code == 0, first.output
    assert f"merged model: {out}" in first.output
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json"}
    assert modes(out) == {0o644}  # the umask's mode, not mkstemp's 0600
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    first = load_file(out / "model.safetensors")

    again = merge_cli(str(r), str(out), "--out-shard-size", "2K")
    assert again.exit_code != 0
    assert f"output folder {out} is not empty" in again.output and "--overwrite" in again.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    replaced = merge_cli(str(r), str(out), "--out-shard-size", "2K", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" not in names  # the old single file went with the old merge
    assert "model.safetensors.index.json" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yml"]  # no temp folders left
    merged = {}
    for shard in out.glob("*.safetensors"):
        merged.update(load_file(shard))
    assert merged.keys() == first.keys()
    assert all(torch.equal(merged[k], first[k]) for k in first)
    assert modes(out) == {0o644}


def test_merge_names_a_corrupt_weights_file(family, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(family["experts"][1], broken)
    with (broken / "model.safetensors").open("r+b") as handle:
        handle.truncate(1000)  # a download cut short: the header promises more bytes
    data = recipe(family)
    data["models"][1]["model"] = str(broken)
    result = merge_cli(str(write_recipe(tmp_path / "r.yml", data)), str(tmp_path / "out"))
    assert result.exit_code != 0
    assert f"model {broken}: model.safetensors is not a readable safetensors file" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "r.yml"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda d, t: d["models"][0].update(model=str(t / "no-such-model")),
            "no such folder, and not a Hugging Face Hub id",
        ),
        (
            lambda d, t: d.update(merge_method="wpp"),
            "unknown merge_method 'wpp'; did you mean 'wp'?",
        ),
        (lambda d, t: d.update(merge_method="wpp"), "known: arcee_fusion"),
        (
            lambda d, t: d["models"][0]["parameters"].update(weight=0.7),
            "sets weight, which wp does not use",
        ),
        (lambda d, t: d.update(parameters={"density": 0.5}), "sets density, which wp does not use"),
        (lambda d, t: d.update(models="nope"), "key 'models': Input should be a valid list"),
        (
            lambda d, t: d.update(parameters={"ignore_score_metadata": "maybe"}),
            "wp: Input should be a valid boolean, unable to interpret input (got 'maybe')",
        ),
    ],
)
def test_merge_bad_recipe_is_one_line_and_writes_nothing(family, tmp_path, change, expected):
    data = recipe(family)
    change(data, tmp_path)
    result = merge_cli(str(write_recipe(tmp_path / "r.yml", data)), str(tmp_path / "out"))
    assert result.exit_code != 0
    assert expected in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_merge_output_below_a_file_is_one_line(family, tmp_path):
    (tmp_path / "a-file").write_text("")
    r = write_recipe(tmp_path / "r.yml", recipe(family))
    result = merge_cli(str(r), str(tmp_path / "a-file" / "out"))
    assert result.exit_code != 0
    assert f"{tmp_path / 'a-file'} is a file, so the folder cannot be created" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "r.yml"]


def as_user_without_root_powers(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `args` so that file permissions apply (root would write into read-only folders)."""
    if os.geteuid() == 0:
        args = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *args]
    return subprocess.run(
        args, capture_output=True, text=True, env=ENV, timeout=300, check=False, **kwargs
    )


def test_read_only_output_folder_is_one_line(family, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    r = write_recipe(tmp_path / "r.yml", recipe(family))
    _refused_in_read_only_folder(
        locked, ["merge", str(r), str(locked / "out"), "--no-copy-tokenizer"]
    )


def _refused_in_read_only_folder(locked, args: list[str]) -> None:
    """`mergekit-wp ARGS` writing under the read-only `locked`: one line, nothing written."""
    locked.chmod(0o555)
    try:
        done = as_user_without_root_powers([str(BIN / "mergekit-wp"), *args])
    finally:
        locked.chmod(0o755)
    assert done.returncode != 0
    assert f"{locked} is not writable (permission denied)" in done.stderr
    assert "Traceback" not in done.stderr
    assert list(locked.iterdir()) == []


def test_read_only_score_output_is_one_line(pair, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    config = write_recipe(tmp_path / "c.yml", scoring(pair, locked / "out"))
    _refused_in_read_only_folder(locked, ["score", str(config)])


@pytest.mark.parametrize("command", ["merge", "score", "eval"])
def test_offline_missing_model_that_looks_like_a_hub_id_is_one_line(
    family, pair, tmp_path, monkeypatch, command
):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # `merged/model`: a folder the user meant, relative to here
    if command == "merge":
        data = recipe(family)
        data["models"][0]["model"] = "merged/model"
        args = ["merge", str(write_recipe(tmp_path / "r.yml", data)), str(tmp_path / "out")]
    elif command == "score":
        config = scoring(pair, tmp_path / "out", model="merged/model")
        args = ["score", str(write_recipe(tmp_path / "c.yml", config))]
    else:
        args = ["eval", "merged/model", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0
    assert "model merged/model: no such folder, and not in the Hugging Face cache" in result.output
    assert not (tmp_path / "out").exists()


# --- wp: score maps that do not belong, knobs wp ignores ------------------------------------
def test_map_recorded_for_another_expert_is_refused_unless_accepted(family, tmp_path):
    base, (x, y) = family["base"], family["experts"]
    heads, neurons = torch.ones(2, 4), torch.ones(2, 12)
    # y's map records x: the code expert given the math expert's map.
    wrong = write_map(tmp_path / "wrong.safetensors", base, x, heads, neurons)
    data = recipe(family, [family["maps"][0], wrong])
    with pytest.raises(ScoreMapError, match=f"made for model '{x}', but the recipe gives it to"):
        wp.check_wp_recipe(MergeConfiguration.model_validate(data))
    # The kernel checks too, so plain mergekit-yaml (no check_wp_recipe) refuses it as well.
    with pytest.raises(ScoreMapError, match="made for model"):
        run_merge(MergeConfiguration.model_validate(data), str(tmp_path / "o"), options=OPTIONS)
    accepted = data | {"parameters": {"ignore_score_metadata": True}}
    wp.check_wp_recipe(MergeConfiguration.model_validate(accepted))
    run_merge(MergeConfiguration.model_validate(accepted), str(tmp_path / "ok"), options=OPTIONS)
    assert (tmp_path / "ok" / "model.safetensors").is_file()

    # Another spelling of the same folders (relative path, symlink) is the same model.
    (tmp_path / "link").symlink_to(y)
    right = write_map(
        tmp_path / "right.safetensors", os.path.relpath(base), tmp_path / "link", heads, neurons
    )
    wp.check_wp_recipe(
        MergeConfiguration.model_validate(recipe(family, [family["maps"][0], right]))
    )
    base_wrong = write_map(tmp_path / "bw.safetensors", x, y, heads, neurons)
    with pytest.raises(ScoreMapError, match=f"made for base '{x}'"):
        wp.check_wp_recipe(
            MergeConfiguration.model_validate(recipe(family, [family["maps"][0], base_wrong]))
        )


def test_never_positive_maps_are_named_in_a_warning(family, tmp_path, caplog):
    base, (x, y) = family["base"], family["experts"]
    zero = write_map(tmp_path / "zero.safetensors", base, x, torch.zeros(2, 4), torch.zeros(2, 12))
    negative = write_map(
        tmp_path / "neg.safetensors", base, y, -torch.rand(2, 4), -torch.rand(2, 12)
    )
    with caplog.at_level(logging.WARNING, logger="mergekit_wp.merge_method"):
        wp.check_wp_recipe(MergeConfiguration.model_validate(recipe(family, [zero, negative])))
    text = caplog.text
    assert f"score map {zero}: every score is zero" in text
    assert f"score map {negative}: every score is at or below zero" in text
    assert f"score map {family['maps'][0]}" not in text


def test_mergekit_yaml_ends_with_the_score_map_message(family, tmp_path):
    data = recipe(family, [family["maps"][0], tmp_path / "nope.safetensors"])
    path = write_recipe(tmp_path / "r.yml", data)
    done = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(path), str(tmp_path / "out"), "--no-copy-tokenizer"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith(f"score map {tmp_path / 'nope.safetensors'}: file not found"), last
    assert "ValidationError" not in done.stderr


# --- score ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pair")
    save_pair(folder, *model_pair("llama", dtype=torch.float32))
    write_paired(folder / "paired.jsonl", copies=1)
    write_anchor(folder / "anchor.safetensors", layer=1)
    return folder


def scoring(pair: Path, out: Path, **changes) -> dict:
    config = {
        "base": str(pair / "base"),
        "model": str(pair / "sft"),
        "data": {"source": str(pair / "paired.jsonl"), "split": "all"},
        "utility": {"kind": "anchor", "anchor": str(pair / "anchor.safetensors")},
        "methods": ["wp_attr"],
        "output": str(out),
        "batch_size": 6,
        "device": "cpu",
    }
    return config | changes


def test_second_score_run_on_a_folder_fails_at_once(pair, tmp_path):
    config = parse_config(scoring(pair, tmp_path / "out"))
    seen = []

    def second_run(unit: str) -> None:
        if not seen:  # while the first run holds the folder
            with pytest.raises(ValueError) as caught:
                score(config)
            seen.append(str(caught.value))

    run = score(config, on_step=second_run)
    assert seen and f"output folder {tmp_path / 'out'} is in use" in seen[0]
    assert f"pid {os.getpid()}" in seen[0]
    assert run.report_path.is_file()
    assert modes(tmp_path / "out") >= {0o644} and 0o600 not in modes(tmp_path / "out")
    score(config)  # the lock went with the first run


def test_score_output_override_moves_the_anchor_with_it(pair, tmp_path):
    # The config keeps its anchor under its own output folder, which is not there.
    config = scoring(pair, tmp_path / "configured")
    config["utility"] = {"kind": "anchor", "anchor": str(tmp_path / "configured" / "a.safetensors")}
    path = write_recipe(tmp_path / "c.yml", config)
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(pair / "anchor.safetensors", other / "a.safetensors")
    result = CliRunner().invoke(main, ["score", str(path), "-o", str(other)])
    assert result.exit_code == 0, result.output
    assert (other / "wp_attr.safetensors").is_file()
    assert not (tmp_path / "configured").exists()


def test_stitched_scoring_labels_its_progress_bars(pair, tmp_path, monkeypatch):
    from mergekit_wp.scoring import engine

    labels = []
    real = engine.tqdm
    monkeypatch.setattr(
        engine, "tqdm", lambda *a, **kw: labels.append(kw["desc"]) or real(*a, **kw)
    )
    utility = {"kind": "anchor", "anchor": str(pair / "anchor.safetensors"), "downstream": "kl"}
    score(parse_config(scoring(pair, tmp_path / "o", utility=utility, methods=["wp_attr", "wp"])))
    assert "scoring upstream: exact wp" in labels and "scoring downstream: exact wp" in labels
    assert len(labels) == len(set(labels))


@pytest.mark.parametrize("which", ["missing", "corrupt"])
def test_score_bad_model_folder_is_one_line(pair, tmp_path, which):
    model = tmp_path / "sft"
    if which == "corrupt":
        shutil.copytree(pair / "sft", model)
        (model / "model.safetensors").write_bytes(b"\x00" * 64)
    path = write_recipe(tmp_path / "c.yml", scoring(pair, tmp_path / "out", model=str(model)))
    result = CliRunner().invoke(main, ["score", str(path)])
    assert result.exit_code != 0
    expected = (
        "model.safetensors is not a readable safetensors file"
        if which == "corrupt"
        else ("no such folder, and not a Hugging Face Hub id")
    )
    assert f"model {model}" in result.output and expected in result.output
    assert not (tmp_path / "out").exists()


# --- eval ----------------------------------------------------------------------------------------
def test_eval_default_folder_differs_for_two_models_of_one_name(tmp_path):
    from mergekit_wp.evaluation.cli import default_out_dir

    a, b = str(tmp_path / "a" / "merged"), str(tmp_path / "b" / "merged")
    assert default_out_dir(a, "micro") != default_out_dir(b, "micro")
    assert default_out_dir(a, "micro") == default_out_dir(a, "micro")
    assert default_out_dir(a, "micro").name.startswith("merged-")


@pytest.mark.parametrize("limit", ["abc", "0", "-3", "1.5"])
def test_eval_limit_is_checked_before_any_work(tmp_path, limit):
    # The model does not exist: a limit checked first is reported instead of the model.
    result = CliRunner().invoke(
        main, ["eval", str(tmp_path / "nope"), "--limit", limit, "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2
    assert "Invalid value for '--limit'" in result.output and repr(limit) in result.output
    assert "nope" not in result.output


def test_eval_corrupt_weights_and_read_only_output_are_one_line(pair, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pair / "sft", corrupt)
    (corrupt / "model.safetensors").write_bytes(b"{}")
    result = CliRunner().invoke(main, ["eval", str(corrupt), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert f"model {corrupt}: model.safetensors is not a readable safetensors file" in result.output
    assert not (tmp_path / "o").exists()
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        done = as_user_without_root_powers(
            [str(BIN / "mergekit-wp"), "eval", str(pair / "sft"), "--out", str(locked / "o")]
        )
    finally:
        locked.chmod(0o755)
    assert done.returncode != 0
    assert f"{locked} is not writable (permission denied)" in done.stderr
    assert "Traceback" not in done.stderr


def test_eval_offline_prints_no_download_or_git_noise(tmp_path):
    from tests.conftest import make_tokenizer, tiny_llama

    tok = make_tokenizer(["the quick brown fox jumps over the lazy dog"] * 10)
    model = tiny_llama(len(tok), max_position_embeddings=512)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    os.chmod(tmp_path, 0o755)
    done = subprocess.run(  # in a folder outside any git checkout, as a user would
        [
            str(BIN / "mergekit-wp"),
            "eval",
            str(tmp_path / "model"),
            "--limit",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--threads",
            "1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "punkt" not in output and "nltk" not in output
    assert "fatal: not a git repository" not in output
    assert modes(tmp_path / "out") == {0o644}


def test_eval_context_shorter_than_the_generation_budget_is_one_line(tmp_path):
    from tests.conftest import make_tokenizer, tiny_llama

    tok = make_tokenizer(["the quick brown fox jumps over the lazy dog"] * 10)
    tiny_llama(len(tok), max_position_embeddings=128).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    result = CliRunner().invoke(
        main, ["eval", str(tmp_path / "model"), "--limit", "1", "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 1
    assert "lm-eval refused the run: Invalid configuration: requested max tokens" in result.output
    assert not (tmp_path / "out").exists()


# --- zoo -----------------------------------------------------------------------------------------
def test_zoo_build_needs_an_out_folder(tmp_path, monkeypatch):
    from mergekit_wp import zoo

    # Should the refusal break, the build lands here, not in the shipped zoo.
    monkeypatch.setattr(zoo, "MODELS_DIR", tmp_path / "models")
    monkeypatch.setattr(zoo, "DATA_DIR", tmp_path / "data")
    result = CliRunner().invoke(main, ["zoo", "build", "--quick", "--no-gates"])
    assert result.exit_code == 2 and "Missing option '--out'" in result.output
    assert list(tmp_path.iterdir()) == []
    a_file = tmp_path / "file"
    a_file.write_text("")
    result = CliRunner().invoke(main, ["zoo", "build", "--quick", "--out", str(a_file)])
    assert result.exit_code == 2 and "is a file" in result.output


def test_anchor_files_get_the_users_umask(tmp_path):
    from mergekit_wp.scoring.anchor import Anchor, load_anchor, save_anchor

    anchor = Anchor(
        1,
        torch.randn(2, 4, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
        "title",
        None,
        3,
    )
    path = tmp_path / "anchor.safetensors"
    save_anchor(path, anchor)
    assert path.stat().st_mode & 0o777 == 0o644  # the umask's mode, not mkstemp's 0600
    assert load_anchor(path).layer == 1
