"""AP vs WP (Fig. 6/7): heatmaps side by side, layer distributions of the top-k, overlap."""

from __future__ import annotations

from mergekit_wp.analyses.compare import Comparison, mean_layer, run_comparison
from mergekit_wp.analyses.report import AnalysisResult, Report


class Options(Comparison):
    """The top-k sizes of the comparison, on the main task by default."""


def run(study, report: Report, options: Options) -> AnalysisResult:
    """AP vs WP under the anchor utility, per task."""
    result = run_comparison(
        study,
        report,
        options,
        "ap_vs_wp",
        "AP vs WP (Fig. 6/7)",
        lambda t: (study.scores(t, "ap"), study.scores(t, "wp")),
        ("AP", "WP"),
    )
    shallower = sum(
        mean_layer(d["neuron"]["layers_b"]) < mean_layer(d["neuron"]["layers_a"])
        for d in result.data.values()
    )
    result.summary += (
        f" WP's top neurons sit shallower than AP's in {shallower}/{len(result.data)} tasks."
    )
    return result
