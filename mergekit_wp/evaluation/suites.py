"""Evaluation suites: YAML files in `evals/` naming lm-eval tasks and the metric per column."""

from __future__ import annotations

import difflib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_SUITE_KEYS = {
    "name",
    "description",
    "tasks",
    "include_path",
    "include_defaults",
    "chat_template",
    "code_execution",
    "model_args",
    "gen_kwargs",
    "batch_size",
    "bootstrap_iters",
    "limit",
}
_TASK_KEYS = {"task", "column", "metric", "chat_template"}


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


def load_suite(name_or_path: str | Path) -> Suite:
    """Read and validate a suite YAML (structure only; `check_tasks` asks lm-eval for the names)."""
    path = resolve_suite_path(name_or_path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"suite {path}: expected a mapping at top level")  # noqa: TRY004
    unknown = sorted(set(raw) - _SUITE_KEYS)
    if unknown:
        raise ValueError(
            f"suite {path}: unknown key {unknown[0]!r}; allowed: {sorted(_SUITE_KEYS)}"
        )
    entries = raw.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"suite {path}: 'tasks' must be a non-empty list")
    default_chat = bool(raw.get("chat_template", False))
    tasks = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"task", "column", "metric"} <= set(entry):
            raise ValueError(
                f"suite {path}: tasks[{i}] must be a mapping with task, column and metric "
                f"(metric is lm-eval's results key, e.g. 'acc,none'); got {entry!r}"
            )
        extra = sorted(set(entry) - _TASK_KEYS)
        if extra:
            raise ValueError(f"suite {path}: tasks[{i}] has unknown key {extra[0]!r}")
        if "," not in str(entry["metric"]):
            raise ValueError(
                f"suite {path}: tasks[{i}] metric {entry['metric']!r} must be 'metric,filter' "
                f"as in lm-eval's results JSON (e.g. 'exact_match,strict-match')"
            )
        tasks.append(
            SuiteTask(
                task=str(entry["task"]),
                column=str(entry["column"]),
                metric=str(entry["metric"]),
                chat_template=bool(entry.get("chat_template", default_chat)),
            )
        )
    columns = [t.column for t in tasks]
    if len(set(columns)) != len(columns):
        raise ValueError(f"suite {path}: column names must be unique, got {columns}")
    includes = raw.get("include_path") or []
    includes = [includes] if isinstance(includes, str) else includes
    include_paths = tuple((path.parent / p).resolve() for p in includes)
    for folder in include_paths:
        if not folder.is_dir():
            raise ValueError(f"suite {path}: include_path {folder} is not a folder")
    return Suite(
        name=str(raw.get("name", path.stem)),
        path=path,
        tasks=tuple(tasks),
        include_paths=include_paths,
        include_defaults=bool(raw.get("include_defaults", True)),
        code_execution=bool(raw.get("code_execution", False)),
        model_args=dict(raw.get("model_args") or {}),
        gen_kwargs=raw.get("gen_kwargs"),
        batch_size=raw.get("batch_size", 1),
        bootstrap_iters=int(raw.get("bootstrap_iters", 0)),
        limit=raw.get("limit"),
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
