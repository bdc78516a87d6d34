"""Domain prompts for the math and code experts, from Hugging Face hub datasets by id.

GSM8K's train split keeps its schema (question, answer); MBPP's train split (task ids 601-974,
disjoint from the test split lm-eval's `mbpp` evaluates) becomes HumanEval-schema stubs: the
function's signature and a docstring made of the task text and its first test, completed raw
by a code model. Both are read with `datasets`; where the hub is out of reach the error names
the file to fetch on a machine with network and the option that reads it here.
"""

from __future__ import annotations

import ast
import builtins
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def gsm8k_rows(rows: Iterable[Row]) -> list[Row]:
    """GSM8K rows keyed by position, for `mergekit_wp.scoring.data.load_domain`."""
    return [
        {"key": f"gsm8k-train/{i}", "question": row["question"], "answer": row["answer"]}
        for i, row in enumerate(rows)
    ]


def _entry_point(test: ast.Module) -> str | None:
    """The first function the test calls that is not a builtin (`assert name(...) == ...`)."""
    calls = [n.func for n in ast.walk(test) if isinstance(n, ast.Call)]
    names = [f.id for f in calls if isinstance(f, ast.Name) and not hasattr(builtins, f.id)]
    return names[0] if names else None


def _doctest(test: ast.Module) -> str:
    """A test as a doctest example when it reads `assert f(...) == value`, else as written."""
    compare = getattr(test.body[0], "test", None)
    if isinstance(compare, ast.Compare) and [type(op) for op in compare.ops] == [ast.Eq]:
        return f">>> {ast.unparse(compare.left)}\n    {ast.unparse(compare.comparators[0])}"
    return ast.unparse(test)


def _on_candidate(test: ast.Module, name: str) -> str:
    """The test with `name` called as `candidate`, as HumanEval's `check` does."""
    for node in ast.walk(test):
        if isinstance(node, ast.Name) and node.id == name:
            node.id = "candidate"
    return ast.unparse(test)


def mbpp_stub(row: Row) -> Row | None:
    """One MBPP row as a HumanEval problem; None where its code or tests do not parse (Python 2)
    or its first test calls no top-level function of its code."""
    try:
        module = ast.parse(row["code"].replace("\r\n", "\n").expandtabs(4))
        tests = [ast.parse(test) for test in row["test_list"]]
    except SyntaxError:
        return None
    name = _entry_point(tests[0]) if tests else None
    function = next(
        (n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == name), None
    )
    if function is None:
        return None
    index = module.body.index(function)
    before = "".join(f"{ast.unparse(node)}\n\n" for node in module.body[:index])
    after = "".join(f"\n\n{ast.unparse(node)}\n" for node in module.body[index + 1 :])
    doc = f"{row['text'].strip()}\n    {_doctest(tests[0])}"
    setup = (row.get("test_setup_code") or "").replace("\r\n", "\n").strip()
    checks = [setup] * bool(setup) + [_on_candidate(test, name) for test in tests]
    return {
        "task_id": f"MBPP/{row['task_id']}",
        "prompt": f'{before}def {name}({ast.unparse(function.args)}):\n    """{doc}\n    """\n',
        "canonical_solution": textwrap.indent(ast.unparse(function.body), "    ") + "\n" + after,
        "test": "def check(candidate):\n" + textwrap.indent("\n".join(checks), "    ") + "\n",
        "entry_point": name,
    }


def mbpp_rows(rows: Iterable[Row]) -> list[Row]:
    """HumanEval-schema stubs of the MBPP rows that have one (see `mbpp_stub`)."""
    return [stub for stub in map(mbpp_stub, rows) if stub is not None]


@dataclass(frozen=True)
class HubSource:
    """A hub dataset split, the parquet file that holds it, and its conversion to our schema."""

    repo: str
    config: str
    split: str
    file: str  # path of the split's parquet file inside the dataset repository
    convert: Callable[[Iterable[Row]], list[Row]]

    @property
    def url(self) -> str:
        return f"https://huggingface.co/datasets/{self.repo}/resolve/main/{self.file}"


HUB_SOURCES = {
    "gsm8k": HubSource(
        "openai/gsm8k", "main", "train", "main/train-00000-of-00001.parquet", gsm8k_rows
    ),
    "mbpp": HubSource(
        "google-research-datasets/mbpp",
        "full",
        "train",
        "full/train-00000-of-00001.parquet",
        mbpp_rows,
    ),
}


def hub_rows(name: str, local: Path | None = None) -> list[Row]:
    """The converted rows of `HUB_SOURCES[name]`, from the hub (or its cache) or a local parquet."""
    source = HUB_SOURCES[name]
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("reading hub datasets needs `datasets`: pip install datasets") from None
    if local is not None and not local.is_file():
        raise ValueError(f"{local} does not exist; expected a copy of {source.url}")
    try:
        if local is not None:
            rows = load_dataset("parquet", data_files=str(local), split="train")
        else:
            rows = load_dataset(source.repo, source.config, split=source.split)
    except Exception as error:  # noqa: BLE001 - datasets raises many types when offline
        where = local or f"{source.repo} ({source.config}, {source.split})"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"cannot read {where}: {reason}. Without network: download {source.url} on a machine "
            f"that has it, copy it here and pass it with --from FILE"
        ) from None
    return source.convert(rows)
