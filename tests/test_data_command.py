"""`mergekit-wp data` and the paper's scoring configs, offline: paired IFEval prompts checked by
lm-eval's own checkers, the hub converters on rows in the hub datasets' schemas, the message
without network, and the paper bench planned from a clean checkout up to the network."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_wp.checkers import code_passes, ifeval_follows, import_ifeval_offline
from mergekit_wp.cli import main
from mergekit_wp.prompts import paired_rows
from mergekit_wp.prompts.cli import data as data_group
from mergekit_wp.scoring.config import DataConfig, load_config
from mergekit_wp.scoring.data import IFEVAL_TASKS, load_domain, load_paired, split_paired

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = sorted((ROOT / "scoring" / "paper").glob("*.yml"))
# The `mergekit-wp data` command that writes each paper config's data.
DATA_COMMAND = {
    "code.yml": "mbpp",
    "instruct.yml": "ifeval",
    "llama-3.2-3b-instruct.yml": "ifeval",
    "math.yml": "gsm8k",
}
FIELDS = {"key", "prompt", "prompt_without_instruction", "instruction_id_list", "kwargs"}
# An ordinary English reply with commas, lower case, no title, quotes, sections or highlights.
PLAIN = (
    "The harbour was quiet in the early morning, and the boats rocked gently on the water. "
    "A few fishermen walked along the pier, talking about the weather and the day ahead. "
    "By noon the market was full of people buying bread, fruit and fresh fish."
)


def _registry() -> dict:
    import_ifeval_offline()
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def _styled(instruction: str, kwargs: dict) -> str:
    """PLAIN rewritten to follow one of the paper's six instructions."""
    if instruction == "change_case:english_capital":
        return PLAIN.upper()
    if instruction == "punctuation:no_comma":
        return PLAIN.replace(",", "")
    if instruction == "detectable_format:title":
        return f"<<The Quiet Harbour>>\n\n{PLAIN}"
    if instruction == "startend:quotation":
        return f'"{PLAIN}"'
    if instruction == "detectable_format:multiple_sections":
        marker = kwargs["section_spliter"]
        return "\n\n".join(f"{marker} {i + 1}\n{PLAIN}" for i in range(kwargs["num_sections"]))
    if instruction == "detectable_format:number_highlighted_sections":
        return " ".join(f"*part {i + 1}*" for i in range(kwargs["num_highlights"])) + " " + PLAIN
    raise AssertionError(instruction)


def _run(*args: str):
    return CliRunner().invoke(main, ["data", *args])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _default_out(command: str) -> str:
    """Where `mergekit-wp data COMMAND` writes when given no OUT."""
    (out,) = [p for p in data_group.commands[command].params if p.name == "out"]
    return out.default


@pytest.fixture(scope="module")
def paired_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "ifeval-paired.jsonl"
    result = _run("ifeval", str(out))
    assert result.exit_code == 0, result.output
    return out


def test_pairs_are_ifeval_rows_with_lm_evals_own_instruction_sentences(paired_file):
    rows = _rows(paired_file)
    registry = _registry()
    assert {tuple(r["instruction_id_list"]) for r in rows} == {(i,) for i in IFEVAL_TASKS.values()}
    for row in rows:
        assert set(row) == FIELDS
        (instruction,), (kwargs,) = row["instruction_id_list"], row["kwargs"]
        # lm-eval rebuilds the very sentence from the row's kwargs: nothing is drawn any more.
        description = registry[instruction](instruction).build_description(**kwargs)
        assert row["prompt"] == f"{row['prompt_without_instruction']} {description}"
    requests = [r["prompt_without_instruction"] for r in rows]
    assert len(set(requests)) == len(rows) == 6 * 200  # every request serves one row only
    assert len({r["key"] for r in rows}) == len(rows)
    examples = load_paired(paired_file, list(IFEVAL_TASKS))  # what scoring reads
    assert sorted({e.task for e in examples}) == sorted(IFEVAL_TASKS)


def test_lm_evals_checkers_accept_the_styled_reply_and_reject_the_plain_one(paired_file):
    rows = _rows(paired_file)
    for instruction in IFEVAL_TASKS.values():
        for row in [r for r in rows if r["instruction_id_list"] == [instruction]][:8]:
            args = (row["instruction_id_list"], row["kwargs"], row["prompt"])
            assert ifeval_follows(_styled(instruction, row["kwargs"][0]), *args), row
            assert not ifeval_follows(PLAIN, *args), row


def test_extraction_and_evaluation_halves_are_disjoint(paired_file):
    defaults = DataConfig(source=str(paired_file))  # the split a scoring config makes
    extraction, evaluation = split_paired(
        load_paired(paired_file), defaults.seed, defaults.extraction_fraction
    )
    for field in ("key", "prompt", "prompt_without_instruction"):
        assert not {getattr(e, field) for e in extraction} & {getattr(e, field) for e in evaluation}
    for task in IFEVAL_TASKS:
        assert sum(e.task == task for e in extraction) == sum(e.task == task for e in evaluation)
        assert sum(e.task == task for e in evaluation) == 100
    assert len(extraction) + len(evaluation) == 1200


def test_seeded_output_is_byte_identical_and_the_seed_matters(paired_file, tmp_path):
    again, other = tmp_path / "again.jsonl", tmp_path / "other.jsonl"
    assert _run("ifeval", str(again)).exit_code == 0
    assert _run("ifeval", str(other), "--seed", "1").exit_code == 0
    assert again.read_bytes() == paired_file.read_bytes()
    assert other.read_bytes() != paired_file.read_bytes()
    random.seed(3)
    expected = random.random()
    random.seed(3)
    paired_rows(["no_comma"], 4, seed=0)  # lm-eval draws from the global generator
    assert random.random() == expected


def test_any_instruction_of_lm_evals_registry(tmp_path):
    registry = _registry()
    out = tmp_path / "all.jsonl"
    result = _run("ifeval", str(out), "--per-task", "6", *(f"-i{i}" for i in sorted(registry)))
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    assert len(rows) == 6 * len(registry)
    for row in rows:
        (instruction,), (kwargs,) = row["instruction_id_list"], row["kwargs"]
        description = registry[instruction](instruction).build_description(**kwargs)
        assert row["prompt"] == f"{row['prompt_without_instruction']} {description}"
        if instruction == "combination:repeat_prompt":
            assert kwargs == {"prompt_to_repeat": row["prompt_without_instruction"]}
    keywords = next(r for r in rows if r["instruction_id_list"] == ["keywords:existence"])
    words = keywords["kwargs"][0]["keywords"]
    args = (keywords["instruction_id_list"], keywords["kwargs"], keywords["prompt"])
    assert ifeval_follows(f"{PLAIN} It was about {' and '.join(words)}.", *args)
    assert not ifeval_follows(PLAIN, *args)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-i", "change_case:shouting"], "unknown IFEval instruction 'change_case:shouting'"),
        (["--per-task", "5000"], "lower per_task to"),
        (["-i", "no_comma", "-i", "punctuation:no_comma"], "name each instruction once"),
    ],
)
def test_bad_requests_fail_with_one_line_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "pairs.jsonl"
    result = _run("ifeval", str(out), *args)
    assert result.exit_code == 1 and message in result.output, result.output
    assert not out.exists()


def _parquet(rows: list[dict], path: Path) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(path))
    return path


def test_gsm8k_rows_become_scoring_prompts(tmp_path):
    rows = [  # openai/gsm8k's schema
        {
            "question": "Ann has 3 apples and buys 4 more. How many apples does she have?",
            "answer": "Ann has 3 + 4 = <<3+4=7>>7 apples.\n#### 7",
        },
        {
            "question": "A box holds 6 eggs. How many eggs are in 5 boxes?",
            "answer": "There are 6 * 5 = <<6*5=30>>30 eggs.\n#### 30",
        },
    ]
    out = tmp_path / "gsm8k.jsonl"
    result = _run("gsm8k", str(out), "--from", str(_parquet(rows, tmp_path / "train.parquet")))
    assert result.exit_code == 0, result.output
    examples = load_domain(out)
    assert [(e.prompt, e.reference) for e in examples] == [
        (r["question"], r["answer"]) for r in rows
    ]
    assert [e.key for e in examples] == ["gsm8k-train/0", "gsm8k-train/1"]


MBPP_ROWS = [  # google-research-datasets/mbpp (full)'s schema, as its rows are written
    {
        "task_id": 901,
        "text": "Write a function to find the larger of two numbers.",
        "code": "def larger( x, y ):\r\n  if x > y:\r\n    return x\r\n  return y",
        "test_list": ["assert larger(10,20)==20", "assert larger(19,15)==19"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 902,
        "text": "Write a function to count the perfect squares in a list.",
        "code": "import math\r\ndef is_square(n):\r\n\treturn int(math.sqrt(n)) ** 2 == n\r\n"
        "def count_squares(items):\r\n\treturn len([i for i in items if is_square(i)])",
        "test_list": ["assert count_squares([1, 2, 4, 9, 10]) == 3"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 903,
        "text": "Write a function to check whether a number is even.",
        "code": "def is_even(n) :\n    return n % 2 == 0",
        "test_list": ["assert is_even(LIMIT)", "assert not is_even(7)"],
        "test_setup_code": "LIMIT = 4",
        "challenge_test_list": [],
    },
    {
        "task_id": 904,
        "text": "Write a function to print a number.",  # Python 2: dropped
        "code": "def show(x):\r\n  print x",
        "test_list": ["assert show(1) == None"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
    {
        "task_id": 905,
        "text": "Write a class to hold a pair.",  # no function to stub: dropped
        "code": "class Pair(object):\r\n  def __init__(self, a):\r\n    self.a = a",
        "test_list": ["assert Pair(1).a == 1"],
        "test_setup_code": "",
        "challenge_test_list": [],
    },
]


def test_mbpp_rows_become_humaneval_stubs_that_pass_their_own_tests(tmp_path):
    out = tmp_path / "mbpp.jsonl"
    local = _parquet(MBPP_ROWS, tmp_path / "train.parquet")
    result = _run("mbpp", str(out), "--from", str(local))
    assert result.exit_code == 0, result.output
    problems = _rows(out)
    assert [p["task_id"] for p in problems] == ["MBPP/901", "MBPP/902", "MBPP/903"]
    assert [p["entry_point"] for p in problems] == ["larger", "count_squares", "is_even"]
    for problem in problems:
        assert problem["prompt"].rstrip().endswith('"""')  # a stub: signature and docstring
        assert "candidate(" in problem["test"]
        assert code_passes(problem, problem["canonical_solution"]), problem
        assert not code_passes(problem, "    pass\n"), problem
    assert ">>> larger(10, 20)\n    20\n" in problems[0]["prompt"]
    assert problems[1]["prompt"].startswith("import math\n\ndef is_square(n):")
    assert [e.key for e in load_domain(out)] == ["MBPP/901", "MBPP/902", "MBPP/903"]


def test_without_network_the_error_names_the_file_to_download(tmp_path):
    out = tmp_path / "gsm8k.jsonl"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "from mergekit_wp.cli import main; main()",
            "data",
            "gsm8k",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 1, run.stderr
    url = "https://huggingface.co/datasets/openai/gsm8k/resolve/main/main/train-00000-of-00001.parquet"
    assert "cannot read openai/gsm8k (main, train)" in run.stderr and url in run.stderr
    assert "--from FILE" in run.stderr
    assert not out.exists()


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.name)
def test_paper_configs_parse_and_read_what_the_data_command_writes(path, paired_file):
    config = load_config(path)
    assert config.data.source == _default_out(DATA_COMMAND[path.name])
    if config.data.kind == "paired":
        examples = load_paired(paired_file, config.data.tasks)
        assert {e.task for e in examples} == set(config.data.tasks)


def test_paper_bench_plans_every_step_without_network(monkeypatch):
    from mergekit_wp.evaluation.bench import load_bench, plan_merges

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = load_bench(ROOT / "evals" / "bench-paper.yml")
    runs, unsupported = plan_merges(spec)
    # Every cell of the grid is planned, or named as one mergekit cannot merge (nuslerp, K > 2).
    assert {(r.combination, r.method) for r in runs} | {
        (u.combination, u.method) for u in unsupported
    } == {(c, m) for c in spec.combinations for m in spec.methods}
    assert not [u for u in unsupported if u.method in ("wp_attr", "wp")]
    assert {p.resolve() for p in spec.scoring} == {p.resolve() for p in PAPER_CONFIGS} - {
        ROOT / "scoring" / "paper" / "llama-3.2-3b-instruct.yml"
    }
    written = {}
    for config_path in spec.scoring:
        config = load_config(config_path)
        for method in config.methods:
            written[(spec.root / config.output / f"{method}.safetensors").resolve()] = config
    maps = [p.resolve() for run in runs for job in run.candidates for p in job.scores]
    assert maps and all(p in written for p in maps)  # every score map has its scoring config
    sources = {_default_out(name) for name in ("ifeval", "gsm8k", "mbpp")}
    assert {c.data.source for c in written.values()} == sources  # and those, their data command
