"""Scoring: which heads and neurons carry a specialized model's change (docs/method.md §2-§6).

Public API (imported lazily so `mergekit_wp.scoring.data` stays light):
- `score(config)`, `load_config(path)`, `ScoringConfig`: the whole run behind `mergekit-wp score`.
- `score_maps(ModelPair.of(base, model), batches, utility, methods, gap_floor=...)`: the engine
  behind it (and the analyses), in memory: a `ScoreMap` per method.
- Utilities: `AnchorUtility`, `KLUtility`, `gaps`; any `utility(model, batch) -> Tensor[B]` works.
- `gradient_pass` (WP-attr, AP-attr), `exact_scores` / `layer_sums` (exact WP, AP),
  `restore` / `ablate` / `set_effect` (set-wise patching), `patched_tensors` (whole tensor
  groups), `TokenBatch`, `make_batches`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "score": "pipeline",
    "ScoreRun": "report",
    "score_maps": "engine",
    "ModelPair": "engine",
    "load_config": "config",
    "parse_config": "config",
    "ScoringConfig": "config",
    "AnchorUtility": "utility",
    "KLUtility": "utility",
    "ReadoutUtility": "utility",
    "gaps": "utility",
    "gradient_pass": "attribution",
    "batch_context": "utility",
    "gap_weights": "utility",
    "exact_scores": "exact",
    "layer_sums": "exact",
    "batch_scores": "exact",
    "restore": "patching",
    "ablate": "patching",
    "patched": "patching",
    "patched_tensors": "patching",
    "set_effect": "patching",
    "TokenBatch": "forward",
    "forward_to": "forward",
    "make_batches": "inputs",
    "load_examples": "inputs",
    "summary": "report",
    "top_components": "report",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
