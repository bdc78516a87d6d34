"""The micro suite through lm-eval on zoo models == the same models scored by an independent path.

The independent path is mergekit_wp.generation (greedy) plus mergekit_wp.checkers for the
generative tasks, and the zoo gates' own log-likelihood scorer for the knowledge task. Both
paths put all LIMIT prompts of a task in one left-padded batch, so the generations must be equal
token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_eval.tasks._yaml_loader import load_yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_wp import checkers, zoo
from mergekit_wp.evaluation.harness import evaluate_model, torch_threads
from mergekit_wp.generation import generate, render_chat

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 5  # examples per task


def zoo_folder(name: str) -> Path:
    try:
        return zoo.model_path(name)
    except FileNotFoundError as err:
        pytest.skip(f"micro zoo not built: {err}")


def first_rows(stem: str) -> list[dict]:
    with zoo.data_path(stem).open() as handle:
        return [json.loads(line) for line, _ in zip(handle, range(LIMIT))]


def evaluated_docs(out: Path, task: str) -> list[dict]:
    """The documents lm-eval scored (micro_ifeval interleaves the file's rows by task)."""
    with (out / f"samples_{task}.jsonl").open() as handle:
        samples = sorted((json.loads(line) for line in handle), key=lambda s: s["doc_id"])
    return [s["doc"] for s in samples]


def max_new_tokens(task: str) -> int:
    return load_yaml(ROOT / "evals/tasks" / f"{task}.yaml")["generation_kwargs"]["max_gen_toks"]


def lm_eval_replies(out: Path, task: str) -> list[str]:
    with (out / f"samples_{task}.jsonl").open() as handle:
        samples = sorted((json.loads(line) for line in handle), key=lambda s: s["doc_id"])
    return [s["resps"][0][0] for s in samples]


@pytest.mark.parametrize("name", ["instruct", "math", "code"])
def test_micro_suite_equals_generation_plus_checkers(name, tmp_path):
    with torch_threads(1):
        _compare(name, tmp_path)


def _compare(name: str, tmp_path: Path) -> None:
    folder = zoo_folder(name)
    report = evaluate_model(
        folder, "micro", tmp_path, limit=LIMIT, batch_size=LIMIT, log_samples=True, threads=1
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def replies(prompts: list[str], task: str) -> list[str]:
        ours = generate(model, tokenizer, prompts, max_new_tokens(task), batch_size=LIMIT)
        assert ours == lm_eval_replies(tmp_path, task), f"{task}: generations differ"
        return ours

    ifeval = evaluated_docs(tmp_path, "micro_ifeval")
    assert len({r["task"] for r in ifeval}) == min(LIMIT, 6)  # interleaved: one per task
    said = replies([render_chat(tokenizer, r["prompt"]) for r in ifeval], "micro_ifeval")
    follows = [
        checkers.ifeval_follows(s, r["instruction_id_list"], r["kwargs"], r["prompt"])
        for s, r in zip(said, ifeval)
    ]
    maths = first_rows("math_test")
    said = replies([render_chat(tokenizer, r["question"]) for r in maths], "micro_gsm8k")
    right = [
        checkers.gsm8k_answer(s) == checkers.gsm8k_answer(r["answer"]) for s, r in zip(said, maths)
    ]
    code = first_rows("code_test")
    said = replies([r["prompt"] for r in code], "micro_humaneval")
    passes = [checkers.code_passes(r, s) for s, r in zip(said, code)]
    knowledge = first_rows("knowledge_test")
    from mergekit_wp.zoo.gates import knowledge_score

    expected = {
        "IFEval": 100 * sum(follows) / LIMIT,
        "GSM8K": 100 * sum(right) / LIMIT,
        "HumanEval": 100 * sum(passes) / LIMIT,
        "Knowledge": 100 * knowledge_score(model, tokenizer, knowledge),
    }
    assert report.scores == pytest.approx(expected)
    # Not a comparison of zeros: some example succeeds (a zoo that passes its gates has each
    # expert well above 0 on its own task; the knowledge task is above 0 for any of them).
    assert any(score > 0 for score in report.scores.values())


def test_humaneval_offline_is_a_real_harness_run_on_a_zoo_model(tmp_path):
    report = evaluate_model(
        zoo_folder("code"), "humaneval-offline", tmp_path, limit=2, batch_size=2, threads=1
    )
    results = json.loads(report.results_path.read_text())
    assert results["n-samples"]["humaneval_offline"] == {"original": 164, "effective": 2}
    assert 0 <= report.scores["HumanEval"] <= 100  # the zoo scores about 0: nothing to assert
    assert report.summary_path.read_text().splitlines()[0] == "model,suite,limit,HumanEval,Avg"
