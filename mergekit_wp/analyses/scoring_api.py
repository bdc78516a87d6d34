"""The one place the analyses call the scoring package: batches, utilities, score maps, patching."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mergekit_wp.components import Component
from mergekit_wp.generation import generate, render_chat
from mergekit_wp.scoremap import ScoreMap
from mergekit_wp.scoring.anchor import ifeval_accuracy as _accuracy
from mergekit_wp.scoring.attribution import gradient_pass
from mergekit_wp.scoring.exact import exact_scores
from mergekit_wp.scoring.forward import TokenBatch
from mergekit_wp.scoring.inputs import Example, make_batches
from mergekit_wp.scoring.patching import ablate, patched, patched_tensors, restore
from mergekit_wp.scoring.utility import AnchorUtility, KLUtility, batch_context

__all__ = ["ablate", "batches", "ifeval_accuracy", "patched", "patched_tensors", "restore", "score", "utility"]


def utility(study, task: str, name: str) -> Any:
    """The anchor utility F_a of the task's anchor, or the KL utility against the instruct model."""
    if name == "anchor":
        anchor = study.anchor(task)
        return AnchorUtility(anchor.layer, anchor.vector)
    if name == "kl":
        # Compare over the shared vocabulary when the instruct model added tokens (e.g. a pad).
        vocab = min(study.shape.vocab_size, study.base.get_output_embeddings().weight.shape[0])
        return KLUtility(study.instruct, vocab)
    raise ValueError(f"unknown utility {name!r}; the analyses use 'anchor' or 'kl'")


def batches(study, task: str, name: str) -> list[TokenBatch]:
    """Scoring batches of a task for a utility (KL: teacher-forced on the instruct's greedy responses)."""
    paired = study.score_examples(task)
    size = study.config.batch_size
    prompts = [render_chat(study.tokenizer, e.prompt) for e in paired]
    responses: list[str | None] = [None] * len(prompts)
    if name == "kl":
        responses = generate(study.instruct, study.tokenizer, prompts, study.config.max_new_tokens, size)
    examples = [Example(str(e.key), p, r) for e, p, r in zip(paired, prompts, responses)]
    return make_batches(study.tokenizer, examples, size)


def _attr_map(study, task: str, method: str, name: str) -> ScoreMap:
    base, sft, shape = study.base, study.instruct, study.shape
    fn = study.utility(task, name)
    parts: dict[str, torch.Tensor] = {}
    heads = torch.zeros(shape.num_hidden_layers, shape.num_attention_heads, dtype=torch.float64)
    neurons = torch.zeros(shape.num_hidden_layers, shape.intermediate_size, dtype=torch.float64)
    count = 0
    for batch in study.batches(task, name):
        _, _, weights = batch_context(base, sft, batch, fn, 1e-6)
        count += int((weights != 0).sum())
        out = gradient_pass(base, sft, batch, fn, weights, wp_attr=method == "wp_attr",
                            ap_attr=method == "ap_attr")
        if method == "wp_attr":
            for part, value in out["wp_attr"].items():
                parts[part] = parts.get(part, 0) + value
        else:
            heads += out["ap_attr"]["heads"]
            neurons += out["ap_attr"]["neurons"]
    n = max(count, 1)
    if method == "wp_attr":
        parts = {p: v / n for p, v in parts.items()}
        heads, neurons = parts["q"] + parts["o"], parts["gate"] + parts["up"] + parts["down"]
        return _map(study, task, method, name, heads, neurons, {p: v.float() for p, v in parts.items()})
    return _map(study, task, method, name, heads / n, neurons / n, {})


def _map(study, task: str, method: str, name: str, heads, neurons, parts) -> ScoreMap:
    return ScoreMap(
        heads=heads.float(), neurons=neurons.float(), method=method, utility=name,
        base_model=study.config.base, model=study.config.instruct,
        num_key_value_heads=study.shape.num_key_value_heads, parts=parts,
        details={"task": task, "examples": len(study.score_examples(task)), "source": "mergekit-wp analyze"},
    )


def score(study, task: str, method: str, name: str) -> ScoreMap:
    """The score map of a task: wp / ap (exact sweeps) or wp_attr / ap_attr (one backward)."""
    if method in ("wp_attr", "ap_attr"):
        return _attr_map(study, task, method, name)
    if method in ("wp", "ap"):
        fn = study.utility(task, name)
        data = study.batches(task, name)
        heads = exact_scores(study.base, study.instruct, data, fn, method, "head")
        neurons = exact_scores(study.base, study.instruct, data, fn, method, "neuron")
        return _map(study, task, method, name, heads, neurons, {})
    raise ValueError(f"unknown scoring method {method!r}; expected wp, wp_attr, ap or ap_attr")


def exact_wp(study, task: str, components: list[Component]) -> dict[Component, float]:
    """Exact E_w of just these components (anchor utility), for source validation."""
    fn = study.utility(task, "anchor")
    data = study.batches(task, "anchor")
    out: dict[Component, float] = {}
    for kind in ("head", "neuron"):
        chosen = [c for c in components if c.kind == kind]
        if not chosen:
            continue
        plan: dict[int, list[int]] = {}
        for c in chosen:
            plan.setdefault(c.layer, []).append(c.index)
        values = exact_scores(study.base, study.instruct, data, fn, "wp", kind, plan)
        out.update({c: float(values[c.layer, c.index]) for c in chosen})
    return out


def ifeval_accuracy(study, model: nn.Module, task: str) -> float:
    """IFEval strict accuracy of greedy responses on the task's evaluation prompts."""
    examples = study.eval_examples(task)
    prompts = [render_chat(study.tokenizer, e.prompt) for e in examples]
    responses = generate(model, study.tokenizer, prompts, study.config.max_new_tokens, study.config.batch_size)
    return _accuracy(responses, examples)
