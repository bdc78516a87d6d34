"""`mergekit-wp bench`: score experts, merge each combination by each method, evaluate, tabulate.

A bench YAML (evals/bench-*.yml) names the recipes folder (`<combination>/<method>.yml`), the
experts, the scoring configs that produce missing score maps, the grid, the eval suite and the
validation grid: each baseline's knobs are chosen per combination on a validation split
(`mergekit_wp.evaluation.validation`), then the chosen merge is evaluated on the test split.
A method whose mergekit contract cannot take a combination is listed with the reason.
Merges and eval results are cached under `out/` by content hashes of what produced them, so a
rerun redoes only what changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BeforeValidator, Field
from tqdm.auto import tqdm

from mergekit_wp.config import StrictModel, read_yaml, validate
from mergekit_wp.evaluation.harness import torch_threads
from mergekit_wp.evaluation.recipes import (
    contract_problem,
    read_recipe,
    render_recipe,
    resolve_model_ref,
    score_paths,
)
from mergekit_wp.evaluation.suites import Suite, check_tasks, load_suite, task_manager
from mergekit_wp.evaluation.table import Row, Table, write_table
from mergekit_wp.evaluation.validation import (
    Limit,
    Validation,
    apply_setting,
    average,
    check_limit,
    setting_label,
    setting_slug,
)
from mergekit_wp.io import atomic_write_text, publish_dir, reference_fingerprint, resolve_model

COMBINATIONS = ("code+instruction", "code+math", "instruction+math", "code+instruction+math")
# Our methods' sources: a change invalidates their cached merges even when recipe and inputs match.
_OWN_SOURCES = {
    "wp": ("merge_method.py", "components.py", "_data/architectures", "scoremap.py"),
    "widen": ("widen.py", "components.py", "_data/architectures"),
}
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSpec:
    """A bench resolved for a run: `_BenchFile` checked, overrides applied, paths made absolute
    against `root` (a record, copied with `dataclasses.replace` by the demo)."""

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
    validation: Validation | None = None
    ours: tuple[str, ...] = ("wp_attr", "wp")  # ranked against the baselines (the rest)
    demo: dict[str, Any] = field(default_factory=dict)  # the subset `make demo` runs
    # Read validation results from this bench output only, merging nothing for them (the demo
    # reuses the full bench's choices); a method not fully validated there runs its recipe.
    validation_from: Path | None = None


def _split(value: Any) -> Any:
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value


# A non-empty list of names; a string is read as comma-separated names (the CLI's --methods).
Names = Annotated[tuple[str, ...], BeforeValidator(_split), Field(min_length=1)]


class _EvalOptions(StrictModel):
    """The bench's `eval:`: how lm-eval runs the models (unset keys keep the harness defaults)."""

    batch_size: int | str | None = None
    backend: str = "hf"
    data_dir: str | None = None  # relative to the bench's root
    model_args: dict[str, Any] | str | None = None
    gen_kwargs: dict[str, Any] | str | None = None


class _Demo(StrictModel):
    """The `demo:` subset `make demo` runs: methods of the bench, a limit, an output folder."""

    methods: Names | None = None
    limit: Limit = None
    out: str | None = None


class _BenchFile(StrictModel):
    """A bench YAML as written (evals/bench-*.yml); `load_bench` resolves it into a `BenchSpec`."""

    name: str | None = None  # default: the file's stem
    root: str = "."  # relative to the bench file
    recipes: str
    base: str
    experts: dict[str, str] = Field(min_length=1)  # name (code, math, ...) -> model
    scoring: list[str] = Field(default_factory=list)
    combinations: Names = COMBINATIONS
    methods: Names
    optional_methods: list[str] = Field(default_factory=list)
    baseline: str = "linear"
    references: list[str] = Field(default_factory=list)
    suite: str
    limit: Limit = None
    seed: int = 0
    out: Path | None = None
    offline: bool = False
    merge_options: dict[str, Any] = Field(default_factory=dict)
    eval: _EvalOptions = _EvalOptions()
    threads: int | None = None
    validation: Validation | None = None
    ours: list[str] = Field(default_factory=lambda: ["wp_attr", "wp"])
    demo: _Demo = _Demo()


def load_bench(path: str | Path, **overrides: Any) -> BenchSpec:
    """Read a bench YAML; `overrides` (methods, combinations, limit, out, references) win."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"bench file {path} not found")
    source = f"bench {path}"
    raw = read_yaml(path, "bench file")
    written = validate(_BenchFile, raw, source)
    demo = written.demo  # a subset of the file's methods, whatever the overrides say
    stray = [m for m in demo.methods or () if m not in written.methods]
    if stray:
        raise ValueError(f"{source}: demo method {stray[0]!r} is not in methods")
    file = validate(_BenchFile, raw | {k: v for k, v in overrides.items() if v is not None}, source)
    root = (path.parent / file.root).resolve()
    for combination in file.combinations:
        missing = [p for p in combination.split("+") if p not in file.experts]
        if missing:
            raise ValueError(
                f"{source}: combination {combination!r} names {missing[0]!r}, which is not "
                f"an expert (experts: {', '.join(file.experts)})"
            )
    for name in file.references:
        if name != "base" and name not in file.experts:
            raise ValueError(f"{source}: reference {name!r} is neither 'base' nor an expert")
    eval_options = file.eval.model_dump(exclude_unset=True)  # cache keys hash what the file says
    if eval_options.get("data_dir"):
        eval_options["data_dir"] = str(root / eval_options["data_dir"])
    out = file.out or Path(f"out/bench/{file.name or path.stem}")
    return BenchSpec(
        name=file.name or path.stem,
        path=path,
        root=root,
        recipes=root / file.recipes,
        base=file.base,
        experts=file.experts,
        scoring=tuple(root / p for p in file.scoring),
        combinations=file.combinations,
        methods=file.methods,
        optional_methods=tuple(file.optional_methods),
        baseline=file.baseline,
        references=tuple(file.references),
        suite=file.suite,
        limit=file.limit,
        seed=file.seed,
        out=out if out.is_absolute() else root / out,
        offline=file.offline,
        merge_options=file.merge_options,
        eval=eval_options,
        threads=file.threads,
        validation=file.validation,
        ours=tuple(file.ours),
        demo={"limit": demo.limit, **demo.model_dump(exclude_none=True)},
    )


@dataclass
class MergeJob:
    """One recipe of the grid at one setting, rendered, with its content key once known."""

    combination: str
    method: str
    recipe: Path
    config: dict[str, Any]  # rendered: absolute paths only
    scores: list[Path]
    setting: dict[str, Any] = field(default_factory=dict)  # the validation grid's knobs
    key: str = ""
    validation: dict[str, float] | None = None  # scores on the validation suite

    @property
    def label(self) -> str:
        return f"{self.combination}/{self.method}"


@dataclass
class MethodRun:
    """One method on one combination: its candidate settings and, once chosen, the one tested."""

    combination: str
    method: str
    default: MergeJob  # the recipe as it is
    candidates: list[MergeJob]  # the validation grid's settings ([default] without a grid)
    chosen: MergeJob | None = None

    @property
    def label(self) -> str:
        return f"{self.combination}/{self.method}"


@dataclass(frozen=True)
class Unsupported:
    """A method that cannot merge a combination, and mergekit's reason."""

    combination: str
    method: str
    reason: str


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


def _missing_recipe(spec: BenchSpec, combination: str, method: str, recipe: Path) -> Unsupported:
    """A recipe the grid lacks is fine only where mergekit's contract rules the method out."""
    problem = contract_problem(method, len(combination.split("+")), with_base=True)
    if problem is None:
        raise ValueError(
            f"bench {spec.path}: no recipe {recipe} for combination {combination!r}, "
            f"method {method!r}"
        )
    return Unsupported(combination, method, problem)


def plan_merges(spec: BenchSpec) -> tuple[list[MethodRun], list[Unsupported]]:
    """Read, render and check every recipe of the grid, at every setting, before anything runs."""
    base = resolve_model_ref(spec.base, spec.root, f"bench {spec.path}")
    runs, unsupported = [], []
    for combination in spec.combinations:
        want = {
            resolve_model_ref(spec.experts[e], spec.root, f"bench {spec.path}")
            for e in combination.split("+")
        }
        for method in spec.methods:
            recipe = spec.recipes / combination / f"{method}.yml"
            if not recipe.is_file():
                unsupported.append(_missing_recipe(spec, combination, method, recipe))
                continue
            raw = read_recipe(recipe)
            config = render_recipe(raw, spec.root, f"recipe {recipe}")
            if spec.offline:
                _check_local(config, f"recipe {recipe}")
            # `karcher` takes no base input (only its tokenizer); the base is never an expert.
            have = {m["model"] for m in config.get("models") or []} - {base}
            if have != want or config.get("base_model", base) != base:
                raise ValueError(
                    f"recipe {recipe}: merges {sorted(have)} onto {config.get('base_model')}, but "
                    f"the bench's {combination!r} is {sorted(want)} onto {base}"
                )
            scores = score_paths(raw, spec.root)
            default = MergeJob(combination, method, recipe, config, scores)
            settings = spec.validation.settings(method) if spec.validation else []
            candidates = [
                MergeJob(
                    combination,
                    method,
                    recipe,
                    apply_setting(config, setting, f"recipe {recipe}"),
                    scores,
                    setting,
                )
                for setting in settings
            ]
            runs.append(MethodRun(combination, method, default, candidates or [default]))
    return runs, unsupported


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
    from mergekit_wp.scoring.config import load_config

    config = load_config(config_path)
    digest = hashlib.sha256(config_path.read_bytes())
    for reference in (config.base, config.model):
        folder = resolve_model(reference)
        digest.update(reference_fingerprint(folder).encode())
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


def _check_cached_map(path: Path, producer: Path | None) -> None:
    """A map the bench would reuse must still read as one; a damaged one is re-scored by hand."""
    from mergekit_wp.scoremap import ScoreMapError, read_score_map

    try:
        read_score_map(path)
    except ScoreMapError as err:
        how = f"mergekit-wp score {producer}" if producer else "the command that wrote it"
        raise ValueError(
            f"{err}; the bench would reuse this map as it is: re-score it ({how}), or delete it "
            f"and rerun the bench"
        ) from None


def ensure_scores(
    spec: BenchSpec, runs: list[MethodRun]
) -> tuple[list[MethodRun], list[Unsupported]]:
    """Write missing or stale score maps; set aside optional methods no config can serve.

    A map is stale when a bench scoring config writes it but the config's stamp (config and
    model contents) differs from the one recorded when the bench last ran it. Maps no config
    writes are used as they are (e.g. exact-WP maps made elsewhere). Every map reused as it is
    is read and validated first: a stamp does not vouch for the file's bytes.
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
        for run in runs
        for p in run.default.scores
        if not p.is_file() or (p in producers and producers[p][0] in stale_configs)
    }
    kept, skipped = [], []
    for run in runs:
        lacking = [p for p in run.default.scores if p in missing and p not in producers]
        if not lacking:
            kept.append(run)
        elif run.method in spec.optional_methods:
            reason = f"skipped: no score map {os.path.relpath(lacking[0], spec.root)}"
            skipped.append(Unsupported(run.combination, run.method, reason))
            tqdm.write(f"[bench] {run.label} {reason}, and no scoring config writes it")
        else:
            raise ValueError(
                f"recipe {run.default.recipe}: score map {lacking[0]} is missing and none of the "
                f"bench's scoring configs ({', '.join(map(str, spec.scoring)) or 'none'}) writes it"
            )
    reused = sorted({p for run in kept for p in run.default.scores if p not in missing})
    for path in reused:
        _check_cached_map(path, producers.get(path, (None,))[0])
    todo = sorted({producers[p][0] for run in kept for p in run.default.scores if p in missing})
    for config_path in tqdm(todo, desc="score", unit="expert"):
        start = time.perf_counter()
        _run_scoring(spec, config_path)
        tqdm.write(f"[bench] scored {config_path} in {time.perf_counter() - start:.1f} s")
    return kept, skipped


# --- merging ------------------------------------------------------------------------------------
class _Keys:
    """Content keys of merges, with each input's fingerprint computed once per run."""

    def __init__(self, spec: BenchSpec) -> None:
        self.spec = spec
        self.prints: dict[str, str] = {}

    def printed(self, path: str | Path) -> str:
        key = str(path)
        if key not in self.prints:
            self.prints[key] = reference_fingerprint(path)
        return self.prints[key]

    def merge(self, job: MergeJob) -> str:
        """Hash of the rendered recipe, its inputs' contents, the seed and the merging code."""
        import mergekit

        import mergekit_wp

        if job.key:
            return job.key
        digest = hashlib.sha256(json.dumps(job.config, sort_keys=True).encode())
        refs = [job.config.get("base_model"), job.config.get("tokenizer_source")]
        refs += [m["model"] for m in job.config.get("models") or []]
        for ref in [r for r in refs if r and r not in ("base", "union")] + job.scores:
            digest.update(self.printed(ref).encode())
        version = getattr(mergekit, "__version__", "")
        digest.update(f"seed={self.spec.seed};mergekit={version}".encode())
        digest.update(json.dumps(self.spec.merge_options, sort_keys=True).encode())
        package = Path(mergekit_wp.__file__).parent
        for name in _OWN_SOURCES.get(job.config.get("merge_method"), ()):
            digest.update(self.printed(package / name).encode())
        job.key = digest.hexdigest()
        return job.key


def merge_one(config: dict[str, Any], out_dir: Path, seed: int, options: dict[str, Any]) -> None:
    """Run one rendered recipe through mergekit's Python API into `out_dir` (replaced whole)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from mergekit_wp import register

    register()  # `wp` and `widen`
    tmp = out_dir.parent / f".{out_dir.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    merge_options = MergeOptions(**{"random_seed": seed, "quiet": True, **options})
    run_merge(MergeConfiguration.model_validate(config), str(tmp), merge_options)
    fit_special_tokens(tmp / "config.json")
    publish_dir(tmp, out_dir)


def fit_special_tokens(config_path: Path) -> list[str]:
    """Point special-token ids beyond the merged vocabulary at eos; the keys changed.

    Without a base model mergekit copies one expert's config, so a merge whose tokenizer comes
    from the base can keep the instruct expert's `pad_token_id` of its added row (2560 in a
    2560-row model), which transformers refuses to load.
    """
    config = json.loads(config_path.read_text())
    vocab, eos = config.get("vocab_size"), config.get("eos_token_id")
    if not isinstance(vocab, int):
        return []
    changed = [
        key
        for key in ("pad_token_id", "bos_token_id")
        if isinstance(config.get(key), int) and config[key] >= vocab
    ]
    for key in changed:
        config[key] = eos if isinstance(eos, int) and eos < vocab else None
        tqdm.write(
            f"[bench] {config_path}: {key} {config[key]} (was beyond the {vocab}-token vocabulary)"
        )
    if changed:
        atomic_write_text(config_path, json.dumps(config, indent=2) + "\n")
    return changed


def _cached(folder: Path, key: str, marker: str) -> bool:
    path = folder / marker
    return path.is_file() and path.read_text().strip() == key


def _merge_into(spec: BenchSpec, job: MergeJob, folder: Path) -> bool:
    """Merge `job` into `folder` unless it already holds that merge; whether it merged."""
    if _cached(folder, job.key, "bench-key.txt"):
        return False
    start = time.perf_counter()
    merge_one(job.config, folder, spec.seed, spec.merge_options)
    atomic_write_text(folder / "bench-key.txt", job.key + "\n")
    atomic_write_text(folder / "recipe.yml", yaml.safe_dump(job.config, sort_keys=False))
    setting = f" ({setting_label(job.setting)})" if job.setting else ""
    tqdm.write(f"[bench] merged {job.label}{setting} in {time.perf_counter() - start:.1f} s")
    return True


def _merge_folder(spec: BenchSpec, run: MethodRun) -> Path:
    return spec.out / "merges" / run.combination / run.method


def run_merges(spec: BenchSpec, runs: list[MethodRun], keys: _Keys) -> dict[str, Path]:
    """Merge each run's chosen setting unless already merged with the same key; label -> folder."""
    folders = {}
    done = 0
    for run in tqdm(runs, desc="merge", unit="merge"):
        keys.merge(run.chosen)
        folders[run.label] = _merge_folder(spec, run)
        done += _merge_into(spec, run.chosen, folders[run.label])
    tqdm.write(f"[bench] {done} merged, {len(runs) - done} cached")
    return folders


# --- evaluating ---------------------------------------------------------------------------------
@dataclass
class _Evaluator:
    """Evaluates model folders on one suite at one limit, each result cached by content key."""

    spec: BenchSpec
    suite: Suite
    limit: int | float | None
    manager: Any = None

    def key(self, model_key: str) -> str:
        digest = hashlib.sha256(model_key.encode())
        digest.update(self.suite.fingerprint().encode())
        digest.update(json.dumps({"limit": self.limit, **self.spec.eval}, sort_keys=True).encode())
        return digest.hexdigest()

    def cached(self, out_dir: Path, model_key: str) -> dict[str, float] | None:
        summary = out_dir / "scores.json"
        if _cached(out_dir, self.key(model_key), "bench-key.txt") and summary.is_file():
            return json.loads(summary.read_text())
        return None

    def __call__(self, label: str, folder: Path, model_key: str, out_dir: Path) -> dict[str, float]:
        """Scores of the model in `folder` (percent per column), from cache or lm-eval."""
        from mergekit_wp.evaluation import harness

        scores = self.cached(out_dir, model_key)
        if scores is not None:
            return scores
        data_dir = self.spec.eval.get("data_dir")
        if self.manager is None:
            self.manager = task_manager(
                self.suite, {"zoo_data_dir": data_dir} if data_dir else None
            )
            check_tasks(self.suite, self.manager)
        start = time.perf_counter()
        report = harness.evaluate_model(
            folder,
            self.suite,
            out_dir,
            limit=self.limit,
            backend=self.spec.eval.get("backend", "hf"),
            batch_size=self.spec.eval.get("batch_size"),
            model_args=self.spec.eval.get("model_args"),
            gen_kwargs=self.spec.eval.get("gen_kwargs"),
            data_dir=data_dir,
            manager=self.manager,
        )
        atomic_write_text(out_dir / "scores.json", json.dumps(report.scores, indent=2) + "\n")
        atomic_write_text(out_dir / "bench-key.txt", self.key(model_key) + "\n")
        tqdm.write(
            f"[bench] evaluated {label} on {self.suite.name} in "
            f"{time.perf_counter() - start:.1f} s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in report.scores.items())
        )
        return report.scores


def run_evals(
    evaluate: _Evaluator, models: dict[str, tuple[Path, str]]
) -> dict[str, dict[str, float]]:
    """Evaluate each labelled model (folder, content key) on the test suite; label -> scores."""
    out = evaluate.spec.out / "evals"
    return {
        label: evaluate(label, folder, key, out / label)
        for label, (folder, key) in tqdm(list(models.items()), desc="eval", unit="model")
    }


# --- validation ---------------------------------------------------------------------------------
def _validate_run(spec: BenchSpec, run: MethodRun, evaluate: _Evaluator, keys: _Keys) -> MergeJob:
    """The candidate with the best validation average (the first of equals), each evaluated
    unless cached. Only the best so far keeps its merge, in the run's merge folder."""
    final = _merge_folder(spec, run)
    scratch = final.parent / f".{run.method}.candidate"
    best, best_score = None, -math.inf
    for job in run.candidates:
        out_dir = spec.out / "validation" / run.combination / run.method / setting_slug(job.setting)
        job.validation = evaluate.cached(out_dir, keys.merge(job))
        if job.validation is None:
            _merge_into(spec, job, scratch)
            job.validation = evaluate(run.label, scratch, job.key, out_dir)
        score = average(job.validation)
        if score > best_score:
            best, best_score = job, score
            if scratch.exists():
                publish_dir(scratch, final)
        if scratch.exists():
            shutil.rmtree(scratch)
    return best


def _reuse_validation(spec: BenchSpec, run: MethodRun, evaluate: _Evaluator, keys: _Keys):
    """The choice recorded under `validation_from` if every candidate is there; else None."""
    folder = spec.validation_from / "validation" / run.combination / run.method
    for job in run.candidates:
        job.validation = evaluate.cached(folder / setting_slug(job.setting), keys.merge(job))
        if job.validation is None:
            return None
    return max(run.candidates, key=lambda job: average(job.validation))  # first of equals


def choose_settings(spec: BenchSpec, runs: list[MethodRun], keys: _Keys) -> None:
    """Set each run's `chosen`: the recipe itself, or its best setting on validation."""
    grid_runs = [run for run in runs if len(run.candidates) > 1]
    for run in runs:
        run.chosen = run.candidates[0]
    if not grid_runs:
        return
    evaluate = _Evaluator(spec, load_suite(spec.validation.suite), spec.validation.limit)
    for run in tqdm(grid_runs, desc="validate", unit="method"):
        if spec.validation_from is not None:
            chosen = _reuse_validation(spec, run, evaluate, keys)
            if chosen is None:
                tqdm.write(f"[bench] {run.label}: no validation results to reuse; the recipe's")
            run.chosen = chosen or run.default
        else:
            run.chosen = _validate_run(spec, run, evaluate, keys)
        if run.chosen.setting:
            tqdm.write(f"[bench] {run.label}: chose {setting_label(run.chosen.setting)}")


# --- the whole bench ----------------------------------------------------------------------------
def _reference_models(spec: BenchSpec) -> dict[str, str]:
    references = {
        name: resolve_model_ref(
            spec.base if name == "base" else spec.experts[name], spec.root, f"bench {spec.path}"
        )
        for name in spec.references
    }
    if spec.offline:
        _check_local({"models": [{"model": r} for r in references.values()]}, f"bench {spec.path}")
    return references


def _merge_row(run: MethodRun, scores: dict[str, float]) -> Row:
    chosen = run.chosen
    return Row(
        run.combination,
        run.method,
        scores,
        setting=setting_label(chosen.setting),
        validation=average(chosen.validation) if chosen.validation else None,
    )


def _score_merge_evaluate(spec: BenchSpec, stages: Stages) -> Table:
    """The plan, score, validate, merge and eval stages; the table of every evaluated model."""
    with stages.stage("plan"):
        suite = load_suite(spec.suite)
        if spec.validation:
            load_suite(spec.validation.suite)
        runs, unsupported = plan_merges(spec)
        references = _reference_models(spec)
    with stages.stage("score", f"({len({p for r in runs for p in r.default.scores})} maps)"):
        runs, skipped = ensure_scores(spec, runs)
    keys = _Keys(spec)
    candidates = sum(len(r.candidates) for r in runs if len(r.candidates) > 1)
    with stages.stage("validate", f"({candidates} candidate settings)"):
        choose_settings(spec, runs, keys)
    with stages.stage("merge", f"({len(runs)} recipes)"):
        folders = run_merges(spec, runs, keys)
    models = {name: (Path(ref), reference_fingerprint(ref)) for name, ref in references.items()}
    models.update({run.label: (folders[run.label], run.chosen.key) for run in runs})
    with stages.stage("eval", f"({len(models)} models, suite {suite.name}, limit {spec.limit})"):
        scores = run_evals(_Evaluator(spec, suite, spec.limit), models)
    merges = {(r.combination, r.method): _merge_row(r, scores[r.label]) for r in runs}
    for absent in unsupported + skipped:
        merges[absent.combination, absent.method] = Row(
            absent.combination, absent.method, None, note=absent.reason
        )
    return Table(
        columns=suite.columns,
        references=[Row(name, None, scores[name]) for name in references],
        merges=[merges[c, m] for c in spec.combinations for m in spec.methods if (c, m) in merges],
        baseline=spec.baseline,
        ours=spec.ours,
    )


def run_bench(spec: BenchSpec | str | Path, **overrides: Any) -> BenchResult:
    """Score, validate, merge, evaluate and tabulate the bench's grid; cached steps are skipped."""
    if isinstance(spec, BenchSpec):
        if overrides.get("limit") is not None:
            overrides["limit"] = check_limit(overrides["limit"], f"bench {spec.path}: limit")
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
