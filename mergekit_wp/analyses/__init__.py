"""Analyses of the Weight Patching paper (docs/method.md §9) over one base/instruct pair.

`run_analyses(load_config(path))` runs what a YAML asks for; each analysis writes JSON and PNGs,
and `report.md` / `index.html` link them.
"""

from mergekit_wp.analyses.analyze import ANALYSES, run_analyses
from mergekit_wp.analyses.config import AnalysisConfig, load_config, parse_config

__all__ = ["ANALYSES", "AnalysisConfig", "load_config", "parse_config", "run_analyses"]
