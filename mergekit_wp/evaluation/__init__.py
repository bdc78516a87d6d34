"""Evaluation and the merge benchmark: lm-eval suites, `mergekit-wp eval`, `bench` and `demo`."""

from mergekit_wp.evaluation.bench import BenchResult, BenchSpec, load_bench, run_bench
from mergekit_wp.evaluation.harness import EvalReport, evaluate_model
from mergekit_wp.evaluation.suites import Suite, load_suite

__all__ = [
    "BenchResult",
    "BenchSpec",
    "EvalReport",
    "Suite",
    "evaluate_model",
    "load_bench",
    "load_suite",
    "run_bench",
]
