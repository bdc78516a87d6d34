"""`make demo`: the whole pipeline on the micro zoo, offline, within ~20 minutes on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

from mergekit_wp.evaluation.bench import BenchResult, run_bench
from mergekit_wp.evaluation.suites import evals_dir

# Examples per micro task. Chosen so that scoring + 28 merges + 32 evaluations fit the budget
# on 2 cores (measured: see the README); the full test sets are larger.
DEMO_LIMIT = 40


def run_demo(limit: int | None = None, out: str | Path | None = None) -> BenchResult:
    """Run evals/bench-zoo.yml with the demo's example limit; outputs in out/demo."""
    bench_file = evals_dir() / "bench-zoo.yml"
    if not bench_file.is_file():
        raise ValueError(f"demo: {bench_file} not found (run from a mergekit-wp checkout)")
    return run_bench(
        bench_file,
        limit=limit or DEMO_LIMIT,
        out=str(Path(out).resolve()) if out else str(evals_dir().parent / "out" / "demo"),
    )
