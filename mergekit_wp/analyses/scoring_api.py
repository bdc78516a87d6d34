"""The one place the analyses call the scoring package: batches, utilities, score maps, patching."""

from __future__ import annotations

from typing import Any

from torch import nn

from mergekit_wp.components import Component
from mergekit_wp.generation import generate, render_chat
from mergekit_wp.scoremap import ScoreMap
from mergekit_wp.scoring.anchor import ifeval_accuracy as _accuracy
from mergekit_wp.scoring.config import GranularityConfig
from mergekit_wp.scoring.engine import score_maps
from mergekit_wp.scoring.forward import TokenBatch
from mergekit_wp.scoring.inputs import Example, make_batches
from mergekit_wp.scoring.patching import ablate, patched, patched_tensors, restore
from mergekit_wp.scoring.utility import AnchorUtility, KLUtility

__all__ = [
    "ablate",
    "batches",
    "ifeval_accuracy",
    "patched",
    "patched_tensors",
    "restore",
    "score",
    "utility",
]


def utility(study, task: str, name: str) -> Any:
    """The anchor utility F_a of the task's anchor, or the KL utility against the instruct model."""
    if name == "anchor":
        anchor = study.anchor(task)
        return AnchorUtility(anchor.layer, anchor.vector)
    if name == "kl":
        # Compare over the shared vocabulary when the instruct model added tokens (e.g. a pad).
        return KLUtility(study.instruct, study.pair.vocab)
    raise ValueError(f"unknown utility {name!r}; the analyses use 'anchor' or 'kl'")


def batches(study, task: str, name: str) -> list[TokenBatch]:
    """Scoring batches of a task for a utility (KL: teacher-forced on the instruct's greedy
    responses).
    """
    paired = study.score_examples(task)
    size = study.config.batch_size
    prompts = [render_chat(study.tokenizer, e.prompt) for e in paired]
    responses: list[str | None] = [None] * len(prompts)
    if name == "kl":
        responses = generate(
            study.instruct, study.tokenizer, prompts, study.config.max_new_tokens, size
        )
    examples = [Example(str(e.key), p, r) for e, p, r in zip(paired, prompts, responses)]
    return make_batches(study.tokenizer, examples, size)


def score(study, task: str, method: str, name: str) -> ScoreMap:
    """The score map of a task: wp / ap (exact sweeps over every unit) or wp_attr / ap_attr."""
    if method not in ("wp", "wp_attr", "ap", "ap_attr"):
        raise ValueError(f"unknown scoring method {method!r}; expected wp, wp_attr, ap or ap_attr")
    return _scores(study, task, name, [method], GranularityConfig(exact_neurons="all")).maps[method]


def exact_wp(study, task: str, components: list[Component]) -> dict[Component, float]:
    """Exact E_w of just these components (anchor utility), for source validation."""
    plans: dict[str, dict[int, list[int]]] = {}
    for c in components:
        plans.setdefault(c.kind, {}).setdefault(c.layer, []).append(c.index)
    found = _scores(study, task, "anchor", ["wp"], exact_plans=plans).maps["wp"]
    return {
        c: float((found.heads if c.kind == "head" else found.neurons)[c.layer, c.index])
        for c in components
    }


def _scores(
    study,
    task: str,
    name: str,
    methods: list[str],
    granularity: GranularityConfig | None = None,
    exact_plans: dict[str, dict[int, list[int]]] | None = None,
):
    return score_maps(
        study.pair,
        study.batches(task, name),
        study.utility(task, name),
        methods,
        granularity=granularity,
        exact_plans=exact_plans,
        gap_floor=study.config.gap_floor,
        details={"task": task, "source": "mergekit-wp analyze"},
        label=f"analysis {task}",
        quiet=True,
    )


def ifeval_accuracy(study, model: nn.Module, task: str) -> float:
    """IFEval strict accuracy of greedy responses on the task's evaluation prompts."""
    examples = study.eval_examples(task)
    prompts = [render_chat(study.tokenizer, e.prompt) for e in examples]
    responses = generate(
        model, study.tokenizer, prompts, study.config.max_new_tokens, study.config.batch_size
    )
    return _accuracy(responses, examples)
