"""Paired IFEval data (instruction present / removed) and domain prompts for scoring and anchors.

Sources: a local JSONL path, `zoo:FILE` (a file of the micro zoo, `mergekit_wp.zoo.data_path`),
or a Hugging Face hub dataset id (read with `datasets.load_dataset`, needs network).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The six IFEval tasks of the paper (docs/method.md §9): short name -> instruction id.
IFEVAL_TASKS: dict[str, str] = {
    "english_capital": "change_case:english_capital",
    "no_comma": "punctuation:no_comma",
    "title": "detectable_format:title",
    "quotation": "startend:quotation",
    "multiple_sections": "detectable_format:multiple_sections",
    "number_highlighted_sections": "detectable_format:number_highlighted_sections",
}
_TASK_OF_INSTRUCTION = {v: k for k, v in IFEVAL_TASKS.items()}

_PAIRED_FIELDS = ("prompt", "prompt_without_instruction", "instruction_id_list", "kwargs")


@dataclass(frozen=True)
class PairedExample:
    """One IFEval prompt with its instruction-removed counterpart (same context)."""

    key: Any
    prompt: str
    prompt_without_instruction: str
    instruction_id_list: list[str]
    kwargs: list[dict[str, Any]]
    task: str


@dataclass(frozen=True)
class DomainExample:
    """A prompt of an expert's domain (math: GSM8K schema, code: HumanEval schema)."""

    key: Any
    prompt: str
    reference: str | None  # worked solution / canonical solution, when the file has one
    record: dict[str, Any] = field(repr=False)  # full row: code checks need test, entry_point


def resolve_source(source: str | Path) -> Path | str:
    """A local path for `zoo:FILE` and existing files; a hub dataset id is returned unchanged."""
    text = str(source)
    if text.startswith("zoo:"):
        from mergekit_wp.zoo import data_path

        try:
            return Path(data_path(text[len("zoo:") :]))
        except FileNotFoundError as error:  # the zoo is not built yet
            raise ValueError(f"{source}: {error}") from None
    path = Path(text)
    if path.exists() or path.suffix in (".jsonl", ".json"):
        return path
    return text


def _read_rows(source: str | Path, split: str = "train") -> Iterable[tuple[str, dict[str, Any]]]:
    """`(where, row)` pairs; `where` names the file and line (or dataset and index) for errors."""
    resolved = resolve_source(source)
    if isinstance(resolved, str):
        from datasets import load_dataset

        for i, row in enumerate(load_dataset(resolved, split=split)):
            yield f"{resolved}[{split}][{i}]", dict(row)
        return
    if not resolved.is_file():
        raise ValueError(f"data file {resolved} does not exist (from source {source!r})")
    with resolved.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{resolved}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(  # noqa: TRY004 - bad file content, not a bad argument
                    f"{where}: expected a JSON object, got {type(row).__name__}"
                )
            yield where, row


def _task_name(where: str, row: dict[str, Any]) -> str:
    if row.get("task"):
        return str(row["task"])
    ids = row["instruction_id_list"]
    if len(ids) == 1:
        return _TASK_OF_INSTRUCTION.get(ids[0], ids[0])
    raise ValueError(f"{where}: no `task` field and {len(ids)} instruction ids; add a `task` name")


def _paired(where: str, row: dict[str, Any], index: int) -> PairedExample:
    missing = [name for name in _PAIRED_FIELDS if name not in row]
    if missing:
        raise ValueError(
            f"{where}: missing field(s) {', '.join(missing)}; a paired IFEval row needs "
            f"{', '.join(_PAIRED_FIELDS)} (and optionally key, task)"
        )
    ids, kwargs = row["instruction_id_list"], row["kwargs"]
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"{where}: instruction_id_list must be a non-empty list of strings")
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise ValueError(
            f"{where}: kwargs must be a list with one dict per instruction id ({len(ids)})"
        )
    for name in ("prompt", "prompt_without_instruction"):
        if not isinstance(row[name], str) or not row[name].strip():
            raise ValueError(f"{where}: {name} must be a non-empty string")
    # Hub IFEval rows list every keyword argument, unset ones as null; keep the set ones.
    clean = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
    return PairedExample(
        key=row.get("key", index),
        prompt=row["prompt"],
        prompt_without_instruction=row["prompt_without_instruction"],
        instruction_id_list=list(ids),
        kwargs=clean,
        task=_task_name(where, row),
    )


def load_paired(
    source: str | Path, tasks: Iterable[str] | None = None, split: str = "train"
) -> list[PairedExample]:
    """Paired examples from JSONL / `zoo:FILE` / a hub dataset, optionally only some tasks.

    `tasks` holds short names (`no_comma`) or instruction ids (`punctuation:no_comma`).
    """
    examples = [_paired(where, row, i) for i, (where, row) in enumerate(_read_rows(source, split))]
    if tasks is not None:
        wanted = {_TASK_OF_INSTRUCTION.get(t, t) for t in tasks}
        known = {e.task for e in examples}
        unknown = wanted - known
        if unknown:
            raise ValueError(
                f"{source}: no examples of task(s) {', '.join(sorted(unknown))}; "
                f"the file has {', '.join(sorted(known)) or 'none'}"
            )
        examples = [e for e in examples if e.task in wanted]
    if not examples:
        raise ValueError(f"{source}: no paired examples")
    return examples


def _round_robin(groups: list[list[PairedExample]]) -> list[PairedExample]:
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def split_paired(
    examples: list[PairedExample], seed: int = 0, extraction_fraction: float = 0.5
) -> tuple[list[PairedExample], list[PairedExample]]:
    """Disjoint (extraction, evaluation) halves, shuffled with `seed`, stratified by task.

    Each half takes the tasks in turn, so that any prefix (`max_examples`, `sweep_examples`)
    covers every task evenly rather than the first task alone.
    """
    if not 0 < extraction_fraction < 1:
        raise ValueError(f"extraction_fraction must be in (0, 1); got {extraction_fraction}")
    extraction: list[list[PairedExample]] = []
    evaluation: list[list[PairedExample]] = []
    for task in sorted({e.task for e in examples}):
        group = [e for e in examples if e.task == task]
        random.Random(f"{seed}:{task}").shuffle(group)
        cut = round(len(group) * extraction_fraction)
        if len(group) >= 2:
            cut = min(max(cut, 1), len(group) - 1)  # both halves non-empty
        extraction.append(group[:cut])
        evaluation.append(group[cut:])
    return _round_robin(extraction), _round_robin(evaluation)


def load_domain(source: str | Path, split: str = "train") -> list[DomainExample]:
    """Prompts (+ reference responses) of a GSM8K-schema or HumanEval-schema JSONL / dataset."""
    out: list[DomainExample] = []
    for i, (where, row) in enumerate(_read_rows(source, split)):
        if "question" in row:  # GSM8K: question, answer
            key = row.get("key", i)
            out.append(DomainExample(key, str(row["question"]), row.get("answer"), row))
        elif "prompt" in row:  # HumanEval: task_id, prompt, canonical_solution, test, entry_point
            key = row.get("task_id", row.get("key", i))
            out.append(DomainExample(key, str(row["prompt"]), row.get("canonical_solution"), row))
        else:
            raise ValueError(
                f"{where}: expected a `question` (GSM8K schema) or a `prompt` (HumanEval schema) "
                f"field; got {', '.join(sorted(row)) or 'no fields'}"
            )
    if not out:
        raise ValueError(f"{source}: no examples")
    return out
