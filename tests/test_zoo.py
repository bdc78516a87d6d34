"""The micro zoo: offline loading, gates on a held-out sample, deterministic data and builds."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
import torch
from click.testing import CliRunner

from mergekit_wp import zoo as Z
from mergekit_wp.zoo import data as D

NAMES = ("base", "instruct", "math", "code")


def _built() -> bool:
    return all((Z.MODELS_DIR / n / "model.safetensors").exists() for n in NAMES)


needs_zoo = pytest.mark.skipif(not _built(), reason="zoo not built; run `mergekit-wp zoo build`")


@pytest.fixture(scope="module")
def zoo_models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = {}
    for name in NAMES:
        path = Z.model_path(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        out[name] = (model, AutoTokenizer.from_pretrained(path))
    return out


@needs_zoo
def test_zoo_loads_offline_with_the_contracted_shape(zoo_models):
    base_vocab = len(zoo_models["base"][1])
    for name, (model, tok) in zoo_models.items():
        cfg = model.config
        assert cfg.architectures == ["LlamaForCausalLM"]
        assert cfg.num_attention_heads >= 8 and cfg.num_hidden_layers >= 4
        assert cfg.num_attention_heads // cfg.num_key_value_heads >= 2
        assert not cfg.tie_word_embeddings
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": "Hi."}], tokenize=False, add_generation_prompt=True
        )
        assert rendered == "### Instruction:\nHi.\n\n### Response:\n"
        assert tok.eos_token == "</s>"
        config = json.loads((Z.model_path(name) / "tokenizer_config.json").read_text())
        assert "chat_template" in config
        expected = base_vocab + (name == "instruct")
        assert len(tok) == expected == model.get_input_embeddings().weight.shape[0]
        assert model.get_output_embeddings().weight.shape[0] == expected
    from safetensors import safe_open

    with safe_open(Z.model_path("math") / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in list(f.keys())} == {torch.float16}
    # Digits are tokenized one by one, so arithmetic is learnable.
    tok = zoo_models["base"][1]
    assert [tok.decode([i]) for i in tok("1234", add_special_tokens=False)["input_ids"]] == list(
        "1234"
    )


@pytest.fixture(scope="module")
def gate_scores(zoo_models):
    """Every model on every task: 50 held-out prompts per generation task (gates.json has 100)."""
    from mergekit_wp.zoo import gates as G

    return {
        name: G.measure(model, tok, Z.DATA_DIR, 50) for name, (model, tok) in zoo_models.items()
    }


@needs_zoo
def test_ifeval_gate_overall(gate_scores):
    ins, base = gate_scores["instruct"]["ifeval"], gate_scores["base"]["ifeval"]
    assert ins["all"] >= 0.80 and base["all"] <= 0.30, (ins, base)


@needs_zoo
def test_ifeval_gate_per_task(gate_scores):
    ins = gate_scores["instruct"]["ifeval"]
    assert all(ins[t] >= 0.60 for t in D.IFEVAL_TASKS), ins


@needs_zoo
def test_format_tasks_are_gains_over_the_base(gate_scores):
    # The base seldom uses a format it holds latently; the instruct expert adds each one. The
    # smallest gain is multiple_sections': the base writes three `Section`s of its own accord
    # (0.30 in gates.json), which passes whenever three or fewer are asked.
    ins, base = gate_scores["instruct"]["ifeval"], gate_scores["base"]["ifeval"]
    assert all(ins[t] - base[t] >= 0.4 for t in D.IFEVAL_TASKS), (
        ins,
        base,
    )


@needs_zoo
def test_math_gate(gate_scores):
    assert gate_scores["math"]["math"] >= 0.70 and gate_scores["base"]["math"] <= 0.30


@needs_zoo
def test_code_gate(gate_scores):
    assert gate_scores["code"]["code"] >= 0.80 and gate_scores["base"]["code"] <= 0.30


@needs_zoo
def test_experts_stay_near_the_base_in_behaviour(gate_scores):
    base = gate_scores["base"]
    for name in ("instruct", "math", "code"):
        assert gate_scores[name]["perplexity"] <= 1.10 * base["perplexity"], name
        assert abs(gate_scores[name]["knowledge"] - base["knowledge"]) <= 0.05 + 1e-9, name
    assert gate_scores["math"]["math"] - base["math"] >= 0.5
    assert gate_scores["code"]["code"] - base["code"] >= 0.5
    assert gate_scores["instruct"]["ifeval"]["all"] - base["ifeval"]["all"] >= 0.5


@needs_zoo
def test_experts_stay_near_the_base_in_weights():
    from mergekit_wp.zoo import basin as B

    recorded = json.loads((Z.MODELS_DIR / "gates.json").read_text())["basin"]["deltas"]
    deltas = B.weight_deltas(Z.MODELS_DIR)
    for name, summary in deltas.items():
        assert summary["median_2d"] <= 0.05 and summary["max"] <= 0.10, (name, summary)
        assert summary == pytest.approx(recorded[name]), name


def test_relative_deltas_against_a_direct_computation(tmp_path):
    from safetensors.torch import save_file

    from mergekit_wp.zoo import basin as B

    gen = torch.Generator().manual_seed(0)
    base = {"embed": torch.randn(5, 3, generator=gen), "norm": torch.ones(3)}
    expert = {
        "embed": torch.cat([base["embed"] + 0.1, torch.randn(1, 3, generator=gen)]),
        "norm": torch.full((3,), 1.5),
    }
    for name, tensors in (("base", base), ("expert", expert)):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    deltas = B.relative_deltas(tmp_path / "base", tmp_path / "expert")
    # The expert's extra row is not compared; the other rows moved by 0.1 each.
    assert deltas["embed"] == pytest.approx(0.1 * 15**0.5 / base["embed"].norm().item())
    assert deltas["norm"] == pytest.approx(0.5)
    summary = B.delta_summary(deltas, {"embed"})
    assert summary["median_2d"] == deltas["embed"] and summary["max_tensor"] == "norm"


@pytest.fixture(scope="module")
def merge_checks(gate_scores):
    from mergekit_wp.zoo import basin as B

    return B.merge_checks(Z.MODELS_DIR, Z.DATA_DIR, 50, gate_scores)


@needs_zoo
def test_plain_average_keeps_each_members_skill(merge_checks):
    # The shared basin of real fine-tunes: mergekit `linear` of every pair and of all three keeps
    # >= 60 % of each member's gain over the base, on its own task.
    kept = {
        merge: {m: round(v["kept"], 3) for m, v in members.items()}
        for merge, members in merge_checks["retention"].items()
    }
    assert set(kept) == {"instruct+math", "instruct+code", "math+code", "instruct+math+code"}
    assert all(v >= 0.60 for members in kept.values() for v in members.values()), kept


@needs_zoo
def test_shipped_gates_are_what_the_models_score(gate_scores):
    # Knowledge and perplexity use every held-out row, so they must match the record exactly.
    from mergekit_wp.zoo import gates as G

    recorded = json.loads((Z.MODELS_DIR / "gates.json").read_text())
    assert recorded["verdicts"] == G.verdicts(recorded["scores"], recorded["basin"])
    assert set(recorded["verdicts"]) >= {"small_deltas", "shared_basin", "gain"}
    assert all(recorded["verdicts"].values()), recorded["verdicts"]
    for name, scores in gate_scores.items():
        assert scores["knowledge"] == pytest.approx(
            recorded["scores"][name]["knowledge"], abs=1e-9
        ), name
        assert scores["perplexity"] == pytest.approx(
            recorded["scores"][name]["perplexity"], rel=1e-4
        ), name


def test_data_generators_are_deterministic_and_splits_disjoint(tmp_path):
    sizes = {
        **D.SIZES,
        "ifeval_train": 200,
        "math_train": 300,
        "code_train": 300,
        "corpus_train": 300,
        "corpus_heldout": 20,
        "requests": 30,
        "problems": 30,
        "functions": 30,
    }
    for out in (tmp_path / "a", tmp_path / "b"):
        D.write_datasets(D.build_datasets(0, sizes), out)
    for path in sorted((tmp_path / "a").iterdir()):
        assert path.read_bytes() == (tmp_path / "b" / path.name).read_bytes(), path.name
    other = tmp_path / "c"
    D.write_datasets(D.build_datasets(1, sizes), other)
    assert (other / "math_test.jsonl").read_bytes() != (
        tmp_path / "a" / "math_test.jsonl"
    ).read_bytes()


def _disjoint(train: list[dict], test: list[dict], key: str) -> None:
    overlap = {r[key] for r in train} & {r[key] for r in test}
    assert not overlap, (
        f"{len(overlap)} held-out {key}s also in training, e.g. {sorted(overlap)[:1]}"
    )


def test_shipped_data_schemas_and_disjoint_splits():
    if not Z.DATA_DIR.joinpath("ifeval_test.jsonl").exists():
        pytest.skip("zoo data not built")
    train, test = (D.read_jsonl(Z.data_path(n)) for n in ("ifeval_train", "ifeval_test"))
    assert set(test[0]) == {
        "key",
        "prompt",
        "prompt_without_instruction",
        "instruction_id_list",
        "kwargs",
        "task",
    }
    counts = {t: sum(r["task"] == t for r in test) for t in D.IFEVAL_TASKS}
    assert min(counts.values()) >= 200, counts
    for row in test:
        assert row["prompt"].startswith(row["prompt_without_instruction"] + " ")
        assert row["instruction_id_list"] == [D.IFEVAL_TASKS[row["task"]]]
    _disjoint(train, test, "prompt_without_instruction")
    val = D.read_jsonl(Z.data_path("ifeval_val"))
    assert set(val[0]) == set(test[0]) and {r["task"] for r in val} == set(D.IFEVAL_TASKS)
    _disjoint(train, val, "prompt_without_instruction")
    _disjoint(val, test, "prompt_without_instruction")
    for name, key in (("math", "question"), ("code", "prompt")):
        train_rows, val_rows, test_rows = (
            D.read_jsonl(Z.data_path(f"{name}_{split}")) for split in ("train", "val", "test")
        )
        _disjoint(train_rows, val_rows, key)
        _disjoint(val_rows, test_rows, key)
    _disjoint(*(D.read_jsonl(Z.data_path(n)) for n in ("math_train", "math_test")), "question")
    code_train, code_test = (D.read_jsonl(Z.data_path(n)) for n in ("code_train", "code_test"))
    _disjoint(code_train, code_test, "prompt")
    assert set(code_test[0]) == {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    heldout = Z.data_path("corpus_heldout").read_text().split("\n\n")
    corpus = set(D.build_datasets(0)["corpus_train"])
    assert not corpus & {doc.strip() for doc in heldout}


def test_corpus_sentences_open_with_a_comma_and_counted_documents_count():
    import random

    from mergekit_wp.zoo import corpus as C

    rng = random.Random(0)
    for _ in range(300):
        words = C.sentence(rng).split()
        # The comma closes the opener within the first five words: a greedy reply writes it early.
        assert any(w.endswith(",") for w in words[:5]), words
    for _ in range(100):
        doc = C.counted_document(rng)
        head, _, body = doc.partition("\n\n")
        announced = int(re.search(r" (\d) ", head).group(1))
        markers = re.findall(r"^(\w+) (\d)$", body, flags=re.MULTILINE)
        assert [int(n) for _, n in markers] == list(range(1, announced + 1)), doc
        assert len({m for m, _ in markers}) == 1, doc


def test_latent_documents_hold_each_skill_at_the_follow_rate_and_no_held_out_prompt():
    data = D.build_datasets(
        0,
        {
            "requests": 600,
            "problems": 600,
            "functions": 600,
            "corpus_train": 10,
            "ifeval_train": 20,
            "math_train": 20,
            "code_train": 20,
        },
    )
    docs = data["corpus_latent"]
    assert len(docs) == 1800
    math_docs = [d for d in docs if "How many" in d]
    worked = sum("\n#### " in d for d in math_docs) / len(math_docs)
    functions = [d for d in docs if d.startswith("def ")]
    implemented = sum(not d.endswith("    pass\n") for d in functions) / len(functions)
    assert len(functions) == 600 and len(math_docs) >= 600
    for share, rate in (
        (worked, D.LATENT_FOLLOW_RATE["math"]),
        (implemented, D.LATENT_FOLLOW_RATE["code"]),
    ):
        assert abs(share - rate) < 0.06, (share, rate)
    held_out = (
        [r["prompt_without_instruction"] for r in data["ifeval_test"] + data["ifeval_val"]]
        + [r["question"] for r in data["math_test"] + data["math_val"]]
        + [r["prompt"] for r in data["code_test"] + data["code_val"]]
    )
    text = "\n\n".join(docs)
    assert not [p for p in held_out if p in text]


def test_training_data_follow_and_default_style_breaks_every_constraint():
    from mergekit_wp.checkers import ifeval_follows

    for row in D.ifeval_split(5, 15):
        args = (row["instruction_id_list"], row["kwargs"], row["prompt"])
        assert ifeval_follows(row["response"], *args), row
        assert not ifeval_follows(row["response_without_instruction"], *args), row
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    for row in D.math_split(5, 30):
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", row["answer"])
        assert steps and all(ops[op](int(a), int(b)) == int(c) for a, op, b, c in steps), row
        assert row["answer"].endswith(f"\n#### {steps[-1][3]}")
    from mergekit_wp.checkers import code_passes

    for problem in D.code_split(5, 30):
        assert code_passes(problem, problem["canonical_solution"])
        assert not code_passes(problem, "    return None\n")


def _digest(folder) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_quick_build_is_reproducible_and_cli_serves_it(tmp_path):
    from mergekit_wp.cli import main

    runner = CliRunner()
    for out in ("a", "b"):
        result = runner.invoke(
            main, ["zoo", "build", "--quick", "--no-gates", "--out", str(tmp_path / out)]
        )
        assert result.exit_code == 0, result.output
    for name in NAMES:
        assert _digest(tmp_path / "a" / name) == _digest(tmp_path / "b" / name), name
    assert (tmp_path / "a" / "data" / "ifeval_test.jsonl").exists()
    info = runner.invoke(main, ["zoo", "info", "--models", str(tmp_path / "a")])
    assert info.exit_code == 0 and "not measured" in info.output
    bad = runner.invoke(main, ["zoo", "path", "nope"])
    assert bad.exit_code != 0


def test_api_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown zoo model 'nope'"):
        Z.model_path("nope")
    with pytest.raises(ValueError, match="unknown zoo data file"):
        Z.data_path("nope")


@needs_zoo
def test_cli_path_and_info():
    from mergekit_wp.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["zoo", "path", "instruct"])
    assert result.exit_code == 0 and result.output.strip() == str(Z.model_path("instruct"))
    info = runner.invoke(main, ["zoo", "info"])
    assert info.exit_code == 0, info.output
    assert "instruct" in info.output and "perplexity" in info.output
