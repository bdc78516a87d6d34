"""Paired IFEval prompts for any model: each neutral request with an instruction and without it.

A row is IFEval's schema (key, prompt, instruction_id_list, kwargs) plus
`prompt_without_instruction`, the same request with the instruction removed (docs/method.md §2).
The instruction sentence is lm-eval's own `build_description`; arguments the caller leaves out
are drawn by lm-eval itself, from a seeded generator. The requests are this package's forms
(forms.txt) applied to its topics (topics.txt). Every request serves one row only, so any
split of the rows by key, such as `mergekit_wp.scoring.data.split_paired`, is disjoint in
requests too.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergekit_wp.scoring.data import IFEVAL_TASKS

_HERE = Path(__file__).parent
# Arguments lm-eval cannot draw: they must repeat the request itself.
_REQUEST_ARGUMENTS = ("prompt_to_repeat",)


def _registry() -> dict[str, Any]:
    """lm-eval's IFEval instruction classes by id (imported without its nltk download)."""
    from mergekit_wp.checkers import import_ifeval_offline

    import_ifeval_offline()
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT

    return INSTRUCTION_DICT


def _lines(name: str) -> list[str]:
    text = (_HERE / name).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def neutral_requests() -> list[str]:
    """Every shipped request: each form of forms.txt with each topic of topics.txt."""
    topics = _lines("topics.txt")
    return [form.format(topic=topic) for form in _lines("forms.txt") for topic in topics]


def instruction_id(name: str) -> str:
    """The registry id of an IFEval instruction named by its id or by a paper task's short name."""
    resolved = IFEVAL_TASKS.get(name, name)
    if resolved not in _registry():
        raise ValueError(
            f"unknown IFEval instruction {name!r}; expected an id of lm-eval's registry "
            f"(lm_eval.tasks.ifeval.instructions_registry.INSTRUCTION_DICT, e.g. "
            f"keywords:existence) or a short name of the paper's six: {', '.join(IFEVAL_TASKS)}"
        )
    return resolved


def describe_instruction(instruction: str, seed: int, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """lm-eval's sentence for `instruction` and the arguments it holds.

    Arguments not in `kwargs` are drawn by lm-eval from Python's global generator, seeded with
    `seed` for this call; the generator's previous state is restored afterwards.
    """
    checker = _registry()[instruction](instruction)
    state = random.getstate()
    random.seed(seed)
    try:
        description = checker.build_description(**kwargs)
    finally:
        random.setstate(state)
    return description, dict(checker.get_instruction_args() or {})


def paired_rows(instructions: Sequence[str], per_task: int, seed: int = 0) -> list[dict[str, Any]]:
    """`per_task` rows for each instruction, each on a request of its own, drawn with `seed`."""
    ids = [instruction_id(name) for name in instructions]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"name each instruction once; got {', '.join(instructions) or 'none'}")
    if per_task < 1:
        raise ValueError(f"per_task must be at least 1; got {per_task}")
    requests = neutral_requests()
    if per_task * len(ids) > len(requests):
        raise ValueError(
            f"{len(ids)} instruction(s) x {per_task} rows need {per_task * len(ids)} requests; "
            f"the shipped set has {len(requests)} (each request serves one row): "
            f"lower per_task to {len(requests) // len(ids)} or fewer"
        )
    rng = random.Random(seed)
    drawn = iter(rng.sample(requests, per_task * len(ids)))
    rows = []
    for instruction in ids:
        needs_request = set(_REQUEST_ARGUMENTS).intersection(
            _registry()[instruction](instruction).get_instruction_args_keys()
        )
        for _ in range(per_task):
            request = next(drawn)
            given = dict.fromkeys(needs_request, request)
            description, kwargs = describe_instruction(instruction, rng.randrange(2**32), **given)
            rows.append(
                {
                    "key": len(rows),
                    "prompt": f"{request} {description}",
                    "prompt_without_instruction": request,
                    "instruction_id_list": [instruction],
                    "kwargs": [kwargs],
                }
            )
    return rows
