"""Evaluation suites: YAML files in `evals/` naming lm-eval tasks and the metric per column."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from mergekit_wp.config import StrictModel, read_yaml, validate


def evals_dir() -> Path:
    """The folder of suites, benches and task YAMLs: a wheel's package data `mergekit_wp/_evals`,
    else (a checkout, an editable install) the checkout's top-level `evals/`."""
    from importlib.resources import files

    package = Path(str(files("mergekit_wp")))
    packaged = package / "_evals"
    return packaged if packaged.is_dir() else package.resolve().parent / "evals"


@dataclass(frozen=True)
class SuiteTask:
    """One lm-eval task (or group) and the result key that fills its table column."""

    task: str
    column: str
    metric: str  # lm-eval results key, "metric,filter"
    chat_template: bool


@dataclass(frozen=True)
class Suite:
    """A named list of lm-eval tasks plus how to run them (chat template, code execution)."""

    name: str
    path: Path
    tasks: tuple[SuiteTask, ...]
    include_paths: tuple[Path, ...] = ()
    include_defaults: bool = True
    code_execution: bool = False
    model_args: dict[str, Any] = field(default_factory=dict)
    gen_kwargs: dict[str, Any] | None = None
    batch_size: int | str = 1
    bootstrap_iters: int = 0
    limit: int | float | None = None

    @property
    def columns(self) -> list[str]:
        return [t.column for t in self.tasks]

    def fingerprint(self) -> str:
        """Hash of the suite file and every task file it can load: results depend on them."""
        digest = hashlib.sha256(self.path.read_bytes())
        for folder in self.include_paths:
            for file in sorted(folder.rglob("*")):
                if file.suffix in (".yaml", ".yml", ".py") and "__pycache__" not in file.parts:
                    digest.update(str(file.relative_to(folder)).encode())
                    digest.update(file.read_bytes())
        import lm_eval

        digest.update(getattr(lm_eval, "__version__", "").encode())
        return digest.hexdigest()


def resolve_suite_path(name_or_path: str | Path) -> Path:
    """A suite name (`micro` -> evals/micro.yml) or a path to a suite YAML."""
    path = Path(name_or_path)
    if path.suffix in (".yml", ".yaml") or path.exists():
        if not path.is_file():
            raise ValueError(f"suite file {path} not found")
        return path.resolve()
    folder = evals_dir()
    candidate = folder / f"{name_or_path}.yml"
    if candidate.is_file():
        return candidate
    known = sorted(p.stem for p in folder.glob("*.yml") if not p.stem.startswith("bench"))
    raise ValueError(
        f"unknown suite {name_or_path!r}: no {candidate}; "
        f"known suites: {', '.join(known) or 'none'}"
        f" (or pass the path of a suite YAML)"
    )


class _TaskEntry(StrictModel):
    """One entry of a suite file's `tasks:`."""

    task: str
    column: str
    metric: str
    chat_template: bool | None = None  # None: the suite's

    @field_validator("metric")
    @classmethod
    def _metric(cls, metric: str) -> str:
        if "," not in metric:
            raise ValueError(
                f"{metric!r} must be 'metric,filter' as in lm-eval's results JSON "
                f"(e.g. 'exact_match,strict-match')"
            )
        return metric


class _SuiteFile(StrictModel):
    """A suite YAML as written (evals/*.yml); `load_suite` resolves it into a `Suite`."""

    name: str | None = None  # default: the file's stem
    description: str = ""
    tasks: list[_TaskEntry] = Field(min_length=1)
    include_path: str | list[str] = Field(default_factory=list)  # relative to the suite file
    include_defaults: bool = True
    chat_template: bool = False
    code_execution: bool = False
    model_args: dict[str, Any] = Field(default_factory=dict)
    gen_kwargs: dict[str, Any] | None = None
    batch_size: int | str = 1
    bootstrap_iters: int = 0
    limit: int | float | None = None


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and validate a suite YAML (structure only; `check_tasks` asks lm-eval for the names)."""
    path = resolve_suite_path(name_or_path)
    raw = validate(_SuiteFile, read_yaml(path, "suite"), f"suite {path}")
    tasks = tuple(
        SuiteTask(
            task=t.task,
            column=t.column,
            metric=t.metric,
            chat_template=raw.chat_template if t.chat_template is None else t.chat_template,
        )
        for t in raw.tasks
    )
    columns = [t.column for t in tasks]
    if len(set(columns)) != len(columns):
        raise ValueError(f"suite {path}: column names must be unique, got {columns}")
    includes = [raw.include_path] if isinstance(raw.include_path, str) else raw.include_path
    include_paths = tuple((path.parent / p).resolve() for p in includes)
    for folder in include_paths:
        if not folder.is_dir():
            raise ValueError(f"suite {path}: include_path {folder} is not a folder")
    return Suite(
        name=raw.name or path.stem,
        path=path,
        tasks=tasks,
        include_paths=include_paths,
        include_defaults=raw.include_defaults,
        code_execution=raw.code_execution,
        model_args=raw.model_args,
        gen_kwargs=raw.gen_kwargs,
        batch_size=raw.batch_size,
        bootstrap_iters=raw.bootstrap_iters,
        limit=raw.limit,
    )


def task_manager(suite: Suite, metadata: dict[str, Any] | None = None):
    """lm-eval's TaskManager over the suite's task folders (and lm-eval's own tasks if asked)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=[str(p) for p in suite.include_paths] or None,
        include_defaults=suite.include_defaults,
        metadata=metadata,
    )


def check_tasks(suite: Suite, manager) -> None:
    """Raise ValueError naming the first suite task lm-eval does not register."""
    import lm_eval

    known = set(manager.all_tasks)
    for task in suite.tasks:
        if task.task in known:
            continue
        close = difflib.get_close_matches(task.task, sorted(known), n=3)
        searched = [str(p) for p in suite.include_paths]
        if suite.include_defaults:
            searched.append("lm-eval's built-in tasks")
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"suite {suite.path}: task {task.task!r} is not registered with lm-eval "
            f"{getattr(lm_eval, '__version__', '')} (searched {', '.join(searched)}){hint}"
        )
