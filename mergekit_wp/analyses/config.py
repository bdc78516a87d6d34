"""The analysis config: one YAML naming the models, data, shared settings and the analyses to run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mergekit_wp.scoring.data import IFEVAL_TASKS


@dataclass(frozen=True)
class AnchorSettings:
    """How each task's anchor is obtained: a fixed layer, a file, or the correction-rate sweep."""

    layer: int | None = None  # same fixed anchor layer for every task; None: sweep
    sweep_layers: list[int] | None = None  # layers the sweep tries (None: all)
    sweep_examples: int = 8  # held-out training prompts per task for the sweep
    mode: str = "all"  # steer every position (Stolfo et al., the paper's procedure) or "anchor" only
    files: dict[str, str] = field(default_factory=dict)  # task -> anchor file (save_anchor)

    def __post_init__(self) -> None:
        if self.mode not in ("all", "anchor"):
            raise ValueError(f"anchor.mode must be 'all' or 'anchor'; got {self.mode!r}")


@dataclass(frozen=True)
class ScoreSettings:
    """Which scorers stand for "WP" and "AP" in the analyses, and precomputed maps to reuse."""

    wp: str | dict[str, str] = "wp_attr"  # wp_attr | wp (exact); or {anchor: ..., kl: ...}
    ap: str | dict[str, str] = "ap"  # ap (exact) | ap_attr; or {anchor: ..., kl: ...}
    files: dict[str, str] = field(default_factory=dict)  # "task/method/utility" -> score map

    def __post_init__(self) -> None:
        for name, allowed in (("wp", ("wp", "wp_attr")), ("ap", ("ap", "ap_attr"))):
            value = getattr(self, name)
            chosen = value if isinstance(value, dict) else {"anchor": value}
            bad = {u: m for u, m in chosen.items() if m not in allowed or u not in ("anchor", "kl")}
            if bad:
                raise ValueError(f"scores.{name} must be one of {allowed} (or a mapping anchor/kl -> one); "
                                 f"got {value!r}")


@dataclass(frozen=True)
class AnalysisConfig:
    """Everything `mergekit-wp analyze` needs; see scoring/zoo-analyses.yml for an example."""

    output: Path
    base: str
    instruct: str
    scoring_data: str
    evaluation_data: str
    tasks: list[str]
    main_task: str
    analyses: dict[str, dict[str, Any]]
    examples: int = 8
    eval_examples: int = 12
    max_new_tokens: int = 32
    batch_size: int = 16
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch CPU threads; 1 avoids oversubscribing shared cores
    gap_floor: float = 1e-4  # examples with |G(x)| below it are skipped, as in `mergekit-wp score`
    anchor: AnchorSettings = field(default_factory=AnchorSettings)
    scores: ScoreSettings = field(default_factory=ScoreSettings)


def _section(source: str, name: str, cls, raw: Any):
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: `{name}` must be a mapping; got {type(raw).__name__}")  # noqa: TRY004
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} in `{name}`; known: {sorted(known)}")
    return cls(**raw)


def parse_config(raw: dict[str, Any], source: str = "config") -> AnalysisConfig:
    """Validate a parsed YAML mapping; errors name the file and the key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping at the top level")  # noqa: TRY004
    required = ("base", "instruct", "data", "analyses")
    missing = [k for k in required if k not in raw]
    if missing:
        raise ValueError(f"{source}: missing key(s) {', '.join(missing)}")
    top = {f.name for f in fields(AnalysisConfig)} - {"scoring_data", "evaluation_data"} | {"data"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise ValueError(f"{source}: unknown top-level key(s) {unknown}; known: {sorted(top)}")
    data = raw["data"]
    if not isinstance(data, dict) or set(data) != {"scoring", "evaluation"}:
        raise ValueError(f"{source}: `data` must have exactly `scoring` and `evaluation` sources")
    tasks = list(raw.get("tasks") or IFEVAL_TASKS)
    main_task = raw.get("main_task", tasks[0])
    if main_task not in tasks:
        raise ValueError(f"{source}: main_task {main_task!r} is not in tasks {tasks}")
    analyses = raw["analyses"]
    if not isinstance(analyses, dict) or not analyses:
        raise ValueError(f"{source}: `analyses` must map analysis names to option mappings")
    analyses = {name: dict(options or {}) for name, options in analyses.items()}
    output = Path(raw.get("output", "out/analyses"))
    scalars = {
        k: raw[k]
        for k in ("examples", "eval_examples", "max_new_tokens", "batch_size", "seed", "device", "dtype",
                  "threads")
        if k in raw
    }
    for key in ("examples", "eval_examples", "max_new_tokens", "batch_size", "threads"):
        if key in scalars and (not isinstance(scalars[key], int) or scalars[key] < 1):
            raise ValueError(f"{source}: `{key}` must be a positive integer; got {scalars[key]!r}")
    return AnalysisConfig(
        output=output,
        base=str(raw["base"]),
        instruct=str(raw["instruct"]),
        scoring_data=str(data["scoring"]),
        evaluation_data=str(data["evaluation"]),
        tasks=tasks,
        main_task=main_task,
        analyses=analyses,
        anchor=_section(source, "anchor", AnchorSettings, raw.get("anchor")),
        scores=_section(source, "scores", ScoreSettings, raw.get("scores")),
        **scalars,
    )


def load_config(path: str | os.PathLike) -> AnalysisConfig:
    """Read and validate an analysis YAML."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"analysis config {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"analysis config {path}: not valid YAML ({err})") from None
    return parse_config(raw, str(path))
