"""`mergekit-wp bench`: score experts, merge each combination by each method, evaluate, tabulate.

A bench YAML (evals/bench-*.yml) names the recipes folder (`<combination>/<method>.yml`), the
experts, the scoring configs that produce missing score maps, the grid, and the eval suite.
Merges and eval results are cached under `out/` by content hashes of what produced them, so a
rerun redoes only what changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from mergekit_wp.evaluation.io import atomic_write_text, fingerprint_path, replace_dir
from mergekit_wp.evaluation.recipes import (
    read_recipe,
    render_recipe,
    resolve_model_ref,
    score_paths,
)
from mergekit_wp.evaluation.runner import torch_threads
from mergekit_wp.evaluation.suites import Suite, check_tasks, load_suite, task_manager
from mergekit_wp.evaluation.table import Row, Table, write_table

COMBINATIONS = ("code+instruction", "code+math", "instruction+math", "code+instruction+math")
METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "wp_attr", "wp")
_EVAL_KEYS = {"batch_size", "backend", "data_dir", "model_args", "gen_kwargs"}
# Sources whose change invalidates a cached `wp` merge even when recipe and inputs are the same.
_WP_SOURCES = ("merge_method.py", "components.py", "scoremap.py")
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSpec:
    """A validated bench YAML; relative paths are resolved against `root`."""

    name: str
    path: Path
    root: Path
    recipes: Path
    base: str
    experts: dict[str, str]
    scoring: tuple[Path, ...]
    combinations: tuple[str, ...]
    methods: tuple[str, ...]
    optional_methods: tuple[str, ...]
    baseline: str
    references: tuple[str, ...]
    suite: str
    limit: int | float | None
    seed: int
    out: Path
    offline: bool
    merge_options: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None  # torch CPU threads for merging and evaluating


_BENCH_KEYS = {f.name for f in fields(BenchSpec)} - {"path"}


def _names(value: Any, what: str, source: Path) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"bench {source}: {what} must be a non-empty list")
    return tuple(str(v) for v in value)


def load_bench(path: str | Path, **overrides: Any) -> BenchSpec:
    """Read a bench YAML; `overrides` (methods, combinations, limit, out, references) win."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"bench file {path} not found")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        # Bad file content is a ValueError, like every other input error (hence the TRY004 noqa).
        raise ValueError(f"bench {path}: expected a mapping at top level")  # noqa: TRY004
    unknown = sorted(set(raw) - _BENCH_KEYS)
    if unknown:
        raise ValueError(
            f"bench {path}: unknown key {unknown[0]!r}; allowed: {sorted(_BENCH_KEYS)}"
        )
    for key in ("recipes", "base", "experts", "suite"):
        if key not in raw:
            raise ValueError(f"bench {path}: missing required key {key!r}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    root = (path.parent / raw.get("root", ".")).resolve()
    experts = raw["experts"]
    if not isinstance(experts, dict) or not experts:
        raise ValueError(f"bench {path}: experts must map names (code, math, ...) to models")
    combinations = _names(raw.get("combinations", COMBINATIONS), "combinations", path)
    for combination in combinations:
        missing = [p for p in combination.split("+") if p not in experts]
        if missing:
            raise ValueError(
                f"bench {path}: combination {combination!r} names {missing[0]!r}, which is not "
                f"an expert (experts: {', '.join(experts)})"
            )
    methods = _names(raw.get("methods", METHODS), "methods", path)
    references = tuple(raw.get("references") or ())
    for name in references:
        if name != "base" and name not in experts:
            raise ValueError(f"bench {path}: reference {name!r} is neither 'base' nor an expert")
    eval_options = dict(raw.get("eval") or {})
    extra = sorted(set(eval_options) - _EVAL_KEYS)
    if extra:
        raise ValueError(
            f"bench {path}: eval has unknown key {extra[0]!r}; allowed: {sorted(_EVAL_KEYS)}"
        )
    if eval_options.get("data_dir"):
        eval_options["data_dir"] = str(root / eval_options["data_dir"])
    out = raw.get("out", f"out/bench/{raw.get('name', path.stem)}")
    return BenchSpec(
        name=str(raw.get("name", path.stem)),
        path=path,
        root=root,
        recipes=root / raw["recipes"],
        base=str(raw["base"]),
        experts={str(k): str(v) for k, v in experts.items()},
        scoring=tuple(root / p for p in raw.get("scoring") or ()),
        combinations=combinations,
        methods=methods,
        optional_methods=tuple(raw.get("optional_methods") or ()),
        baseline=str(raw.get("baseline", "linear")),
        references=references,
        suite=str(raw["suite"]),
        limit=raw.get("limit"),
        seed=int(raw.get("seed", 0)),
        out=Path(out) if Path(out).is_absolute() else root / out,
        offline=bool(raw.get("offline", False)),
        merge_options=dict(raw.get("merge_options") or {}),
        eval=eval_options,
        threads=raw.get("threads"),
    )


@dataclass
class MergeJob:
    """One recipe of the grid, rendered, with where its merged model goes."""

    combination: str
    method: str
    recipe: Path
    config: dict[str, Any]  # rendered: absolute paths only
    scores: list[Path]
    key: str = ""

    @property
    def label(self) -> str:
        return f"{self.combination}/{self.method}"


@dataclass
class Stages:
    """Wall-clock seconds per stage, printed as each stage ends."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        start = time.perf_counter()
        tqdm.write(f"[bench] {name} ...{(' ' + detail) if detail else ''}")
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        tqdm.write(f"[bench] {name} done in {self.seconds[name]:.1f} s")


@dataclass(frozen=True)
class BenchResult:
    """The table, where its files are, and how long each stage took."""

    table: Table
    paths: dict[str, Path]
    seconds: dict[str, float]


# --- planning -----------------------------------------------------------------------------------
def _check_local(config: dict[str, Any], source: str) -> None:
    """Offline benches: every model must be a local folder (nothing to download)."""
    refs = [config.get("base_model")] + [m["model"] for m in config.get("models") or []]
    for ref in refs:
        if ref and not Path(ref).is_dir():
            raise ValueError(
                f"{source}: model {ref!r} is not a local folder, and this bench is offline"
            )


def plan_merges(spec: BenchSpec) -> list[MergeJob]:
    """Read, render and check every recipe of the grid before anything runs."""
    base = resolve_model_ref(spec.base, spec.root, f"bench {spec.path}")
    jobs = []
    for combination in spec.combinations:
        want = {
            resolve_model_ref(spec.experts[e], spec.root, f"bench {spec.path}")
            for e in combination.split("+")
        }
        for method in spec.methods:
            recipe = spec.recipes / combination / f"{method}.yml"
            if not recipe.is_file():
                raise ValueError(
                    f"bench {spec.path}: no recipe {recipe} for combination {combination!r}, "
                    f"method {method!r}"
                )
            raw = read_recipe(recipe)
            config = render_recipe(raw, spec.root, f"recipe {recipe}")
            if spec.offline:
                _check_local(config, f"recipe {recipe}")
            have = {m["model"] for m in config.get("models") or []} - {config.get("base_model")}
            if have != want or config.get("base_model", base) != base:
                raise ValueError(
                    f"recipe {recipe}: merges {sorted(have)} onto {config.get('base_model')}, but "
                    f"the bench's {combination!r} is {sorted(want)} onto {base}"
                )
            jobs.append(MergeJob(combination, method, recipe, config, score_paths(raw, spec.root)))
    return jobs


# --- scoring ------------------------------------------------------------------------------------
def _score_producers(spec: BenchSpec) -> dict[Path, tuple[Path, str]]:
    """Map path -> (scoring config, method) for every map the bench's scoring configs write."""
    from mergekit_wp.scoring.config import load_config

    producers = {}
    for config_path in spec.scoring:
        config = load_config(config_path)
        out = config.output_dir()
        out = out if out.is_absolute() else spec.root / out
        for method in config.methods:
            producers[(out / f"{method}.safetensors").resolve()] = (config_path, method)
    return producers


def _score_stamp(spec: BenchSpec, config_path: Path) -> str:
    """Hash of a scoring config file and of the two models it reads: maps made from other
    inputs (a rebuilt zoo, an edited config) are stale."""
    from mergekit_wp.scoring.config import load_config, resolve_model

    config = load_config(config_path)
    digest = hashlib.sha256(config_path.read_bytes())
    for reference in (config.base, config.model):
        folder = resolve_model(reference)
        digest.update((fingerprint_path(folder) if Path(folder).exists() else folder).encode())
    return digest.hexdigest()


def _stamp_file(spec: BenchSpec, config_path: Path) -> Path:
    from mergekit_wp.scoring.config import load_config

    out = load_config(config_path).output_dir()
    return (out if out.is_absolute() else spec.root / out) / "bench-stamp.txt"


def _run_scoring(spec: BenchSpec, config_path: Path) -> None:
    """Run one scoring config (all its methods) from the project root, then stamp its maps."""
    from mergekit_wp.scoring.config import load_config
    from mergekit_wp.scoring.pipeline import score

    config = load_config(config_path)
    with contextlib.chdir(spec.root):
        anchor = config.utility.anchor
        if config.utility.fit and anchor and Path(anchor).is_file():
            # A fitted anchor belongs to the models it was fitted on; they changed (or no stamp
            # says otherwise), so fit it again rather than reuse it.
            Path(anchor).unlink()
        score(config)
    atomic_write_text(_stamp_file(spec, config_path), _score_stamp(spec, config_path) + "\n")


def ensure_scores(spec: BenchSpec, jobs: list[MergeJob]) -> list[MergeJob]:
    """Write missing or stale score maps; drop jobs of optional methods no config can serve.

    A map is stale when a bench scoring config writes it but the config's stamp (config and
    model contents) differs from the one recorded when the bench last ran it. Maps no config
    writes are used as they are (e.g. exact-WP maps made elsewhere).
    """
    producers = _score_producers(spec) if spec.scoring else {}
    stale_configs = {
        config
        for config, _ in set(producers.values())
        if not _cached(
            _stamp_file(spec, config).parent, _score_stamp(spec, config), "bench-stamp.txt"
        )
    }
    missing = {
        p
        for job in jobs
        for p in job.scores
        if not p.is_file() or (p in producers and producers[p][0] in stale_configs)
    }
    kept = []
    for job in jobs:
        lacking = [p for p in job.scores if p in missing and p not in producers]
        if not lacking:
            kept.append(job)
        elif job.method in spec.optional_methods:
            tqdm.write(f"[bench] skipping {job.label}: no scoring config writes {lacking[0]}")
        else:
            raise ValueError(
                f"recipe {job.recipe}: score map {lacking[0]} is missing and none of the bench's "
                f"scoring configs ({', '.join(map(str, spec.scoring)) or 'none'}) writes it"
            )
    todo = sorted({producers[p][0] for job in kept for p in job.scores if p in missing})
    for config_path in tqdm(todo, desc="score", unit="expert"):
        start = time.perf_counter()
        _run_scoring(spec, config_path)
        tqdm.write(f"[bench] scored {config_path} in {time.perf_counter() - start:.1f} s")
    return kept


# --- merging ------------------------------------------------------------------------------------
def _merge_key(spec: BenchSpec, job: MergeJob, prints: dict[str, str]) -> str:
    """Hash of the rendered recipe, its inputs' contents, the seed and the merging code."""
    import mergekit

    import mergekit_wp

    def printed(path: str | Path) -> str:
        key = str(path)
        if key not in prints:
            prints[key] = fingerprint_path(path) if Path(path).exists() else key
        return prints[key]

    digest = hashlib.sha256(json.dumps(job.config, sort_keys=True).encode())
    refs = [job.config.get("base_model"), job.config.get("tokenizer_source")]
    refs += [m["model"] for m in job.config.get("models") or []]
    for ref in [r for r in refs if r] + [str(p) for p in job.scores]:
        digest.update(printed(ref).encode())
    digest.update(f"seed={spec.seed};mergekit={getattr(mergekit, '__version__', '')}".encode())
    digest.update(json.dumps(spec.merge_options, sort_keys=True).encode())
    if job.config.get("merge_method") == "wp":
        package = Path(mergekit_wp.__file__).parent
        for name in _WP_SOURCES:
            digest.update(printed(package / name).encode())
    return digest.hexdigest()


def merge_one(config: dict[str, Any], out_dir: Path, seed: int, options: dict[str, Any]) -> None:
    """Run one rendered recipe through mergekit's Python API into `out_dir` (replaced whole)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    import mergekit_wp  # noqa: F401  registers `wp`

    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    merge_options = MergeOptions(**{"random_seed": seed, "quiet": True, **options})
    run_merge(MergeConfiguration.model_validate(config), str(tmp), merge_options)
    replace_dir(tmp, out_dir)


def _cached(folder: Path, key: str, marker: str) -> bool:
    path = folder / marker
    return path.is_file() and path.read_text().strip() == key


def run_merges(spec: BenchSpec, jobs: list[MergeJob]) -> dict[str, Path]:
    """Merge every job not already merged with the same key; label -> model folder."""
    prints: dict[str, str] = {}
    folders = {}
    done = 0
    for job in tqdm(jobs, desc="merge", unit="merge"):
        job.key = _merge_key(spec, job, prints)
        folder = spec.out / "merges" / job.combination / job.method
        folders[job.label] = folder
        if _cached(folder, job.key, "bench-key.txt"):
            continue
        start = time.perf_counter()
        merge_one(job.config, folder, spec.seed, spec.merge_options)
        atomic_write_text(folder / "bench-key.txt", job.key + "\n")
        atomic_write_text(folder / "recipe.yml", yaml.safe_dump(job.config, sort_keys=False))
        done += 1
        tqdm.write(f"[bench] merged {job.label} in {time.perf_counter() - start:.1f} s")
    tqdm.write(f"[bench] {done} merged, {len(jobs) - done} cached")
    return folders


# --- evaluating ---------------------------------------------------------------------------------
def _eval_key(model_key: str, suite: Suite, spec: BenchSpec) -> str:
    digest = hashlib.sha256(model_key.encode())
    digest.update(suite.fingerprint().encode())
    digest.update(json.dumps({"limit": spec.limit, **spec.eval}, sort_keys=True).encode())
    return digest.hexdigest()


def run_evals(
    spec: BenchSpec, models: dict[str, tuple[Path, str]], suite: Suite
) -> dict[str, dict[str, float]]:
    """Evaluate each labelled model (folder, content key) unless cached; label -> scores."""
    from mergekit_wp.evaluation.runner import evaluate_model

    data_dir = spec.eval.get("data_dir")
    manager = task_manager(suite, {"zoo_data_dir": data_dir} if data_dir else None)
    check_tasks(suite, manager)
    scores = {}
    done = 0
    for label, (folder, model_key) in tqdm(list(models.items()), desc="eval", unit="model"):
        key = _eval_key(model_key, suite, spec)
        out_dir = spec.out / "evals" / label
        summary = out_dir / "scores.json"
        if _cached(out_dir, key, "bench-key.txt") and summary.is_file():
            scores[label] = json.loads(summary.read_text())
            continue
        start = time.perf_counter()
        report = evaluate_model(
            folder,
            suite,
            out_dir,
            limit=spec.limit,
            backend=spec.eval.get("backend", "hf"),
            batch_size=spec.eval.get("batch_size"),
            model_args=spec.eval.get("model_args"),
            gen_kwargs=spec.eval.get("gen_kwargs"),
            data_dir=data_dir,
            manager=manager,
        )
        atomic_write_text(summary, json.dumps(report.scores, indent=2) + "\n")
        atomic_write_text(out_dir / "bench-key.txt", key + "\n")
        scores[label] = report.scores
        done += 1
        tqdm.write(
            f"[bench] evaluated {label} in {time.perf_counter() - start:.1f} s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in report.scores.items())
        )
    tqdm.write(f"[bench] {done} evaluated, {len(models) - done} cached")
    return scores


# --- the whole bench ----------------------------------------------------------------------------
def _score_merge_evaluate(spec: BenchSpec, stages: Stages) -> Table:
    """The plan, score, merge and eval stages; the table of every evaluated model."""
    with stages.stage("plan"):
        suite = load_suite(spec.suite)
        jobs = plan_merges(spec)
        references = {
            name: resolve_model_ref(
                spec.base if name == "base" else spec.experts[name], spec.root, f"bench {spec.path}"
            )
            for name in spec.references
        }
        if spec.offline:
            _check_local(
                {"models": [{"model": r} for r in references.values()]}, f"bench {spec.path}"
            )
    with stages.stage("score", f"({sum(len(j.scores) for j in jobs)} score maps needed)"):
        jobs = ensure_scores(spec, jobs)
    with stages.stage("merge", f"({len(jobs)} recipes)"):
        folders = run_merges(spec, jobs)
    models = {
        name: (Path(ref), fingerprint_path(ref) if Path(ref).exists() else ref)
        for name, ref in references.items()
    }
    models.update({job.label: (folders[job.label], job.key) for job in jobs})
    with stages.stage("eval", f"({len(models)} models, suite {suite.name}, limit {spec.limit})"):
        scores = run_evals(spec, models, suite)
    return Table(
        columns=suite.columns,
        references=[Row(name, None, scores[name]) for name in references],
        merges=[Row(job.combination, job.method, scores[job.label]) for job in jobs],
        baseline=spec.baseline,
    )


def run_bench(spec: BenchSpec | str | Path, **overrides: Any) -> BenchResult:
    """Score, merge, evaluate and tabulate the bench's grid; cached steps are skipped."""
    if isinstance(spec, BenchSpec):
        spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    else:
        spec = load_bench(spec, **overrides)
    stages = Stages()
    with torch_threads(spec.threads):
        table = _score_merge_evaluate(spec, stages)
    with stages.stage("table"):
        paths = write_table(table, spec.out)
    paths["timings"] = atomic_write_text(
        spec.out / "timings.json", json.dumps(stages.seconds, indent=2) + "\n"
    )
    return BenchResult(table, paths, dict(stages.seconds))
