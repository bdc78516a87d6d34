"""The analysis config: one YAML naming the models, data, shared settings and the analyses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mergekit_wp.config import StrictModel, load_yaml, validate
from mergekit_wp.scoring.data import IFEVAL_TASKS

Tasks = Literal["all", "main"]  # an analysis runs on every task of the config, or on main_task


class AnalysisOptions(StrictModel):
    """Base of each analysis module's `Options`: the keys its mapping in `analyses:` may set."""

    def __getitem__(self, key: str) -> Any:
        """An option by the name the YAML gives it (the mapping view options once were)."""
        return getattr(self, key)


class AnchorSettings(StrictModel):
    """How each task's anchor is obtained: a fixed layer, a file, or the correction-rate sweep."""

    layer: int | None = None  # same fixed anchor layer for every task; None: sweep
    sweep_layers: list[int] | None = None  # layers the sweep tries (None: all)
    sweep_examples: int = 8  # held-out training prompts per task for the sweep
    # Steer every position (Stolfo et al., the paper's procedure) or "anchor" only.
    mode: Literal["all", "anchor"] = "all"
    files: dict[str, str] = Field(default_factory=dict)  # task -> anchor file (save_anchor)


class ScoreSettings(StrictModel):
    """Which scorers stand for "WP" and "AP" in the analyses, and precomputed maps to reuse."""

    wp: str | dict[str, str] = "wp_attr"  # wp_attr | wp (exact); or {anchor: ..., kl: ...}
    ap: str | dict[str, str] = "ap"  # ap (exact) | ap_attr; or {anchor: ..., kl: ...}
    files: dict[str, str] = Field(default_factory=dict)  # "task/method/utility" -> map

    @model_validator(mode="after")
    def _scorers(self) -> ScoreSettings:
        for name, allowed in (("wp", ("wp", "wp_attr")), ("ap", ("ap", "ap_attr"))):
            value = getattr(self, name)
            chosen = value if isinstance(value, dict) else {"anchor": value}
            bad = {u: m for u, m in chosen.items() if m not in allowed or u not in ("anchor", "kl")}
            if bad:
                raise ValueError(
                    f"scores.{name} must be one of {allowed} (or a mapping anchor/kl -> one); "
                    f"got {value!r}"
                )
        return self


class DataSources(StrictModel):
    """The two paired IFEval files: scores and anchors come from one, behaviour from the other."""

    scoring: str
    evaluation: str


_COUNTS = ("examples", "eval_examples", "max_new_tokens", "batch_size", "threads")


class AnalysisConfig(StrictModel):
    """Everything `mergekit-wp analyze` needs; see scoring/zoo-analyses.yml for an example."""

    base: str
    instruct: str
    data: DataSources
    # Name -> options as written; each analysis's `Options` checks them when the analyses run
    # (mergekit_wp.analyses.analyze.options_for), so loading a config imports no analysis.
    analyses: dict[str, dict[str, Any]] = Field(min_length=1)
    output: Path = Path("out/analyses")
    tasks: list[str]  # default: IFEVAL_TASKS
    main_task: str  # default: the first of tasks
    examples: int = 8
    eval_examples: int = 12
    max_new_tokens: int = 32
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch CPU threads; 1 avoids oversubscribing shared cores
    gap_floor: float = 1e-4  # examples with |G(x)| below it are skipped, as in `mergekit-wp score`
    anchor: AnchorSettings = AnchorSettings()
    scores: ScoreSettings = ScoreSettings()

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        for key in _COUNTS:
            value = raw.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"`{key}` must be a positive integer; got {value!r}")
        tasks = raw.get("tasks") or list(IFEVAL_TASKS)
        raw = raw | {"tasks": tasks, "main_task": raw.get("main_task", tasks[0])}
        # `analyses: {drift:}` (no options) reads as an empty mapping of options.
        if isinstance(raw.get("analyses"), dict):
            raw["analyses"] = {name: options or {} for name, options in raw["analyses"].items()}
        return raw

    @model_validator(mode="after")
    def _main_task(self) -> AnalysisConfig:
        if self.main_task not in self.tasks:
            raise ValueError(f"main_task {self.main_task!r} is not in tasks {self.tasks}")
        return self

    @property
    def scoring_data(self) -> str:
        return self.data.scoring

    @property
    def evaluation_data(self) -> str:
        return self.data.evaluation


def parse_config(raw: object, source: str = "config") -> AnalysisConfig:
    """Validate a parsed YAML mapping; errors name the file and the key."""
    return validate(AnalysisConfig, raw, source)


def load_config(path: str | os.PathLike) -> AnalysisConfig:
    """Read and validate an analysis YAML."""
    return load_yaml(path, AnalysisConfig, "analysis config")
