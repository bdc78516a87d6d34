"""Anchor vs KL utility (Fig. 37/38): the same scorer's rankings under both utilities, and their
overlap.
"""

from __future__ import annotations

from mergekit_wp.analyses.compare import Comparison, run_comparison
from mergekit_wp.analyses.report import AnalysisResult, Report


class Options(Comparison):
    method: str = "wp"  # the scorer compared under both utilities


def run(study, report: Report, options: Options) -> AnalysisResult:
    """WP (or `method`) under the anchor utility vs under the KL utility, per task."""
    method = options.method
    return run_comparison(
        study,
        report,
        options,
        "kl_vs_anchor",
        "Anchor vs KL utility (Fig. 37/38)",
        lambda t: (study.scores(t, method, "anchor"), study.scores(t, method, "kl")),
        ("anchor", "KL"),
    )
