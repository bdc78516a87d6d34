"""`make demo`: the paper's Table 3 subset on the micro zoo, offline, within ~20 minutes on 2 cores.

evals/bench-zoo.yml's `demo:` declares the subset (methods, example limit, output folder). Each
baseline runs at the setting the full bench chose on validation when the full bench's
validation results for it are in its output folder (and still match the models and recipes),
else at its recipe's own setting; the demo itself validates nothing.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from mergekit_wp.evaluation.bench import BenchResult, load_bench, run_bench
from mergekit_wp.evaluation.suites import evals_dir


def run_demo(limit: int | None = None, out: str | Path | None = None) -> BenchResult:
    """Run the demo subset of evals/bench-zoo.yml; outputs in its `demo.out` (or `out`)."""
    bench_file = evals_dir() / "bench-zoo.yml"
    if not bench_file.is_file():
        raise ValueError(f"demo: {bench_file} not found (run from a mergekit-wp checkout)")
    spec = load_bench(bench_file)
    demo = spec.demo
    folder = Path(out).resolve() if out else spec.root / demo.get("out", "out/demo")
    spec = replace(
        spec,
        methods=demo.get("methods", spec.methods),
        out=folder,
        validation_from=spec.out,
    )
    return run_bench(spec, limit=limit or demo.get("limit"))
