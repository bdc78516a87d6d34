"""`mergekit-wp score` / `inspect` end to end on tiny saved models: outputs, errors, resume, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from mergekit_wp.cli import main
from mergekit_wp.scoremap import read_score_map
from mergekit_wp.scoring.config import parse_config
from mergekit_wp.scoring.pipeline import score
from tests.test_scoring_helpers import (
    model_pair,
    save_pair,
    write_anchor,
    write_domain,
    write_paired,
)

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pair")
    save_pair(folder, *model_pair("llama", dtype=torch.float32))
    write_paired(folder / "paired.jsonl")
    write_domain(folder / "math.jsonl")
    write_anchor(folder / "anchor.safetensors", layer=1)
    return folder


def _config(pair: Path, out: Path, **changes) -> dict:
    config = {
        "base": str(pair / "base"),
        "model": str(pair / "sft"),
        "data": {"source": str(pair / "paired.jsonl"), "split": "all"},
        "utility": {"kind": "anchor", "anchor": str(pair / "anchor.safetensors")},
        "methods": ["wp_attr", "wp"],
        "granularity": {"exact_neurons": "all"},
        "output": str(out),
        "batch_size": 4,
        "device": "cpu",
    }
    return config | changes


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_config_errors_name_the_key(pair, tmp_path):
    good = _config(pair, tmp_path)
    cases = [
        ({k: v for k, v in good.items() if k != "base"}, "'base'"),
        (good | {"methods": ["wp", "magic"]}, "'methods.1'"),
        (good | {"utility": {"kind": "anchor"}}, "needs `anchor: PATH`"),
        (good | {"batch_sise": 3}, "'batch_sise'"),
        (good | {"granularity": {"exact_neurons": 5}, "methods": ["wp"]}, "add wp_attr"),
    ]
    for data, expected in cases:
        with pytest.raises(ValueError, match="cfg.yml") as err:
            parse_config(data, "cfg.yml")
        assert expected in str(err.value)
    result = CliRunner().invoke(main, ["score", str(_write(tmp_path / "bad.yml", cases[1][0]))])
    assert result.exit_code == 2 and "methods.1" in result.output


def test_score_cli_writes_maps_report_pictures_and_inspect_reads_them(pair, tmp_path):
    config = _config(
        pair,
        tmp_path / "out",
        methods=["wp_attr", "ap_attr", "wp", "ap"],
        granularity={"exact_neurons": 6},
    )
    result = CliRunner().invoke(main, ["score", str(_write(tmp_path / "a.yml", config))])
    assert result.exit_code == 0, result.output
    assert "pictures:" in result.output and "wp.heads.png" in result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["examples"] == 12 and report["kept_examples"] == 12
    for method in ("wp_attr", "ap_attr", "wp", "ap"):
        scores = read_score_map(tmp_path / "out" / f"{method}.safetensors")
        assert scores.method == method and scores.utility == "anchor"
        assert scores.model == str(pair / "sft") and scores.details["stop_layer"] == 1
        assert (scores.heads[2] == 0).all() and scores.heads[:2].abs().min() > 0
        assert all(Path(p).is_file() for p in report["methods"][method]["heatmaps"])
        assert len(report["methods"][method]["top"]["heads"]) == 12
    wp_attr = read_score_map(tmp_path / "out" / "wp_attr.safetensors")
    assert set(wp_attr.parts) == {"q", "o", "gate", "up", "down"}
    assert torch.allclose(wp_attr.heads, wp_attr.parts["q"] + wp_attr.parts["o"])
    assert int((read_score_map(tmp_path / "out" / "wp.safetensors").neurons != 0).sum()) == 6
    shown = CliRunner().invoke(
        main, ["inspect", str(tmp_path / "out" / "wp.safetensors"), "-k", "3"]
    )
    assert shown.exit_code == 0 and "top 3 heads:" in shown.output and "H(" in shown.output
    missing = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 2 and "file not found" in missing.output


def test_kl_utility_on_domain_data_with_gap_floor(pair, tmp_path):
    config = parse_config(
        _config(
            pair,
            tmp_path / "kl",
            data={"source": str(pair / "math.jsonl"), "kind": "domain", "responses": "reference"},
            utility={"kind": "kl"},
            methods=["wp_attr"],
            batch_size=2,
        )
    )
    run = score(config)
    assert run.report["examples"] == 5 and run.report["gap"]["min"] > 0  # KL(sft || base) > 0
    assert read_score_map(run.maps["wp_attr"]).heads[2].abs().max() > 0  # KL sees every layer
    floor = parse_config(
        config.model_dump()
        | {"gap_floor": run.report["gap"]["min"] * 1.0001, "output": str(tmp_path / "kl2")}
    )
    assert len(score(floor).report["skipped"]) == 1


def test_downstream_kl_completes_the_anchor_map_after_l_a(pair, tmp_path):
    common = {"methods": ["wp_attr", "wp"], "granularity": {"exact_neurons": 4}}
    anchor_only = score(parse_config(_config(pair, tmp_path / "a", **common)))
    kl_only = score(parse_config(_config(pair, tmp_path / "k", utility={"kind": "kl"}, **common)))
    both = parse_config(
        _config(
            pair,
            tmp_path / "ak",
            utility={
                "kind": "anchor",
                "anchor": str(pair / "anchor.safetensors"),
                "downstream": "kl",
            },
            **common,
        )
    )
    stitched = score(both)
    assert stitched.report["stitched_after_layer"] == 1
    for method in ("wp_attr", "wp"):
        up, down = (read_score_map(r.maps[method]) for r in (anchor_only, kl_only))
        joined = read_score_map(tmp_path / "ak" / f"{method}.safetensors")
        assert joined.utility == "anchor+kl" and (up.heads[2:] == 0).all()
        # Layers 0..l_a are the anchor run's, layer 2 the KL run's, bit for bit.
        assert torch.equal(joined.heads[:2], up.heads[:2]) and torch.equal(
            joined.heads[2:], down.heads[2:]
        )
        assert torch.equal(joined.neurons[:2], up.neurons[:2])
        assert torch.equal(joined.neurons[2:], down.neurons[2:])
        assert joined.heads[2].abs().max() > 0
        for part, values in joined.parts.items():
            assert torch.equal(values[2:], down.parts[part][2:]) and torch.equal(
                values[:2], up.parts[part][:2]
            )
    assert (tmp_path / "ak" / "upstream" / "report.json").is_file()
    assert (tmp_path / "ak" / "downstream" / "report.json").is_file()
    with pytest.raises(ValueError, match="downstream"):
        parse_config(_config(pair, tmp_path / "x", utility={"kind": "kl", "downstream": "kl"}))


def test_anchor_is_fitted_on_first_use_then_reused(pair, tmp_path):
    anchor = tmp_path / "fit" / "anchor.safetensors"
    config = parse_config(
        _config(
            pair,
            tmp_path / "fit",
            data={"source": str(pair / "paired.jsonl")},
            methods=["wp_attr"],
            utility={"kind": "anchor", "anchor": str(anchor), "fit": True, "fixed_layer": 1},
        )
    )
    first = score(config)
    assert anchor.is_file() and first.report["examples"] == 6  # the evaluation half
    assert read_score_map(first.maps["wp_attr"]).details["stop_layer"] == 1
    stamp = anchor.stat().st_mtime_ns
    score(config)
    assert anchor.stat().st_mtime_ns == stamp


_KILLABLE = textwrap.dedent("""
    import sys, time
    from mergekit_wp.scoring.config import load_config
    from mergekit_wp.scoring.pipeline import score
    score(load_config(sys.argv[1]), on_step=lambda step: time.sleep(0.4))
""")


def _done_units(state: Path) -> int:
    try:
        return len(torch.load(state, weights_only=True)["done"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def test_runs_are_byte_identical_and_a_killed_run_resumes(pair, tmp_path):
    # 3 batches: 3 gradient units + 3 x 2 layers of exact head sweeps = 9 units.
    changes = {"granularity": {"exact_neurons": "none"}}
    first = score(parse_config(_config(pair, tmp_path / "a", **changes)))
    second = score(parse_config(_config(pair, tmp_path / "b", **changes)))
    for method in ("wp_attr", "wp"):
        assert first.maps[method].read_bytes() == second.maps[method].read_bytes()
    config = _write(tmp_path / "c.yml", _config(pair, tmp_path / "c", **changes))
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(config)],
        cwd=REPO,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / "c" / ".state" / "rank0-of-1.pt"
    deadline = time.time() + 240
    while _done_units(state) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _done_units(state)
    assert 4 <= done < 9 and not (tmp_path / "c" / "wp.safetensors").exists()
    resumed = score(parse_config(_config(pair, tmp_path / "c", **changes)))
    for method in ("wp_attr", "wp"):
        assert resumed.maps[method].read_bytes() == first.maps[method].read_bytes()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(pair, tmp_path):
    changes = {
        "methods": ["wp_attr", "ap_attr", "wp"],
        "dtype": "float64",
        "batch_size": 6,
        "granularity": {"exact_neurons": "none"},
    }
    single = score(parse_config(_config(pair, tmp_path / "one", **changes)))
    config = _write(tmp_path / "two.yml", _config(pair, tmp_path / "two", **changes))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = os.environ | {
            "OMP_NUM_THREADS": "1",
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "mergekit_wp.scoring", str(config)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["processes"] == 2 and report["examples"] == 12
    for method in changes["methods"]:
        one = read_score_map(single.maps[method])
        two = read_score_map(tmp_path / "two" / f"{method}.safetensors")
        assert torch.allclose(one.heads, two.heads, rtol=1e-6, atol=1e-9), method
        assert torch.allclose(one.neurons, two.neurons, rtol=1e-6, atol=1e-9), method


def test_response_mask_marks_the_logits_that_predict_the_response():
    from mergekit_wp.scoring.inputs import Example, make_batches
    from tests.test_scoring_helpers import tokenizer

    tok = tokenizer()
    examples = [
        Example("a", "### Instruction:\nAdd 2.\n\n### Response:\n", "It is 5."),
        Example("b", "### Instruction:\nDescribe a quiet town.\n\n### Response:\n", "Calm."),
    ]
    (batch,) = make_batches(tok, examples, batch_size=2)
    for row, example in enumerate(sorted(examples, key=lambda e: len(e.prompt) + len(e.response))):
        predicted = batch.input_ids[row, 1:][batch.response_mask[row, :-1]].tolist()
        assert predicted == tok(example.response, add_special_tokens=False)["input_ids"] + [
            tok.eos_token_id
        ]
        assert not batch.response_mask[row, -1]  # the last logit predicts nothing in the data
        assert batch.attention_mask[row][batch.response_mask[row]].all()


def test_gemma2_scores_with_its_tables_attention_by_default(tmp_path):
    """Gemma 2 refuses sdpa in transformers 5; its table's `eager` is what a config without
    `attn_implementation` gets (it used to need `attn_implementation: eager` in the config)."""
    folder = tmp_path / "gemma2"
    save_pair(folder, *model_pair("gemma2", dtype=torch.float32))
    write_domain(folder / "math.jsonl")
    config = _config(
        folder,
        tmp_path / "out",
        data={"source": str(folder / "math.jsonl"), "kind": "domain", "responses": "reference"},
        utility={"kind": "kl"},
        methods=["wp_attr"],
        batch_size=2,
    )
    assert "attn_implementation" not in config
    run = score(parse_config(config))
    assert read_score_map(run.maps["wp_attr"]).heads.abs().max() > 0
    with pytest.raises(ValueError, match="scaled_dot_product_attention"):
        score(
            parse_config(config | {"attn_implementation": "sdpa", "output": str(tmp_path / "o2")})
        )


def test_the_engine_in_memory_gives_the_pipelines_maps(pair, tmp_path):
    """`mergekit-wp score` is the engine plus loading and writing: the same pair, batches and
    utility give the same numbers in memory (what the analyses call)."""
    from transformers import AutoTokenizer

    from mergekit_wp.io import load_model
    from mergekit_wp.scoring.engine import ModelPair, score_maps
    from mergekit_wp.scoring.inputs import load_examples, make_batches
    from mergekit_wp.scoring.utility import KLUtility

    config = parse_config(
        _config(
            pair,
            tmp_path / "kl",
            utility={"kind": "kl"},
            methods=["wp_attr", "ap_attr"],
            data={"source": str(pair / "math.jsonl"), "kind": "domain", "responses": "reference"},
            batch_size=2,
            dtype="float32",
        )
    )
    run = score(config)
    base, sft = (load_model(str(pair / m), "float32") for m in ("base", "sft"))
    tokenizer = AutoTokenizer.from_pretrained(pair / "sft")
    batches = make_batches(tokenizer, load_examples(config.data, tokenizer, sft, True), 2)
    found = score_maps(
        ModelPair.of(base, sft),
        batches,
        KLUtility(sft),
        ["wp_attr", "ap_attr"],
        gap_floor=config.gap_floor,
        quiet=True,
    )
    for method in ("wp_attr", "ap_attr"):
        written = read_score_map(run.maps[method])
        assert torch.equal(found.maps[method].heads, written.heads), method
        assert torch.equal(found.maps[method].neurons, written.neurons), method
