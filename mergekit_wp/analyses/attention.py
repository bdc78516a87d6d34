"""Selective attention (Fig. 11/29): attention mass per token on the instruction span vs the
rest.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib.pyplot as plt
import torch
from torch import nn

from mergekit_wp.analyses.config import AnalysisOptions, Tasks
from mergekit_wp.analyses.ranking import as_names, random_k, top_k
from mergekit_wp.analyses.report import AnalysisResult, Report
from mergekit_wp.components import Component
from mergekit_wp.generation import render_chat
from mergekit_wp.scoring.data import PairedExample


def instruction_token_mask(tokenizer, example: PairedExample) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids [T], is_instruction [T] bool)` of the chat-rendered prompt.

    The instruction span is the characters of `prompt` that are not in
    `prompt_without_instruction` (a character diff); a token belongs to it when its character
    offsets overlap that span.
    """
    rendered = render_chat(tokenizer, example.prompt)
    start = rendered.find(example.prompt)
    if start < 0:
        raise ValueError(
            f"example {example.key}: the chat template does not contain the prompt verbatim"
        )
    matcher = difflib.SequenceMatcher(
        None, example.prompt_without_instruction, example.prompt, autojunk=False
    )
    chars = torch.zeros(len(rendered), dtype=torch.bool)
    for op, _, _, j1, j2 in matcher.get_opcodes():
        if op in ("insert", "replace"):
            chars[start + j1 : start + j2] = True
    if not chars.any():
        raise ValueError(
            f"example {example.key}: prompt and prompt_without_instruction are identical"
        )
    encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    mask = torch.tensor([bool(chars[s:e].any()) for s, e in encoded["offset_mapping"]])
    return torch.tensor(encoded["input_ids"]), mask


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch to eager attention (the only kind that returns weights), then back."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def attention_mass(
    model: nn.Module, tokenizer, examples: list[PairedExample], heads: list[Component]
) -> dict[str, list[float]]:
    """Per head, mean over examples of the anchor query's attention per instruction token / per
    other token.
    """
    inst = torch.zeros(len(heads), dtype=torch.float64)
    rest = torch.zeros(len(heads), dtype=torch.float64)
    device = next(model.parameters()).device
    with eager_attention(model):
        for example in examples:
            ids, is_inst = instruction_token_mask(tokenizer, example)
            out = model(
                input_ids=ids.unsqueeze(0).to(device), output_attentions=True, use_cache=False
            )
            for i, h in enumerate(heads):
                row = out.attentions[h.layer][0, h.index, -1].double().cpu()  # anchor query [T]
                inst[i] += row[is_inst].sum() / is_inst.sum()
                rest[i] += row[~is_inst].sum() / max(int((~is_inst).sum()), 1)
    n = len(examples)
    return {"instruction": (inst / n).tolist(), "other": (rest / n).tolist()}


def _plot(groups: dict[str, dict[str, list[float]]], task: str) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names = list(groups)
    xs = torch.arange(len(names)).float()
    inst = [sum(g["instruction"]) / len(g["instruction"]) for g in groups.values()]
    other = [sum(g["other"]) / len(g["other"]) for g in groups.values()]
    ax.bar(xs - 0.2, inst, 0.4, label="instruction tokens")
    ax.bar(xs + 0.2, other, 0.4, label="other tokens")
    ax.set_xticks(xs, names, fontsize=8)
    ax.set(ylabel="attention per token (anchor query)", title=f"selective attention: {task}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


class Options(AnalysisOptions):
    top_heads: int = 10
    tasks: Tasks = "all"


def run(study, report: Report, options: Options) -> AnalysisResult:
    """Top WP heads in the instruct model, the same heads in the base, random heads in the
    instruct.
    """
    k = options.top_heads
    data: dict = {}
    figures = []
    for task in study.tasks_for(options.tasks):
        examples = study.eval_examples(task)
        mask = study.region_mask("head", "upstream")
        top = top_k(study.scores(task, "wp").heads, k, "head", mask)
        rand = random_k(*study.heads_shape, k, "head", study.seed, mask)
        groups = {
            "top WP (instruct)": attention_mass(study.instruct, study.tokenizer, examples, top),
            "top WP (base)": attention_mass(study.base, study.tokenizer, examples, top),
            "random (instruct)": attention_mass(study.instruct, study.tokenizer, examples, rand),
        }
        means = {
            name: {part: sum(v) / len(v) for part, v in g.items()} for name, g in groups.items()
        }
        data[task] = {
            "heads": as_names(top),
            "random_heads": as_names(rand),
            "per_head": groups,
            "mean": means,
        }
        figures.append(report.figure("attention", _plot(groups, task), f"attention_{task}"))
    ratio = {
        t: d["mean"]["top WP (instruct)"]["instruction"]
        / max(d["mean"]["top WP (instruct)"]["other"], 1e-12)
        for t, d in data.items()
    }
    wins = sum(
        d["mean"]["top WP (instruct)"]["instruction"]
        > max(
            d["mean"]["top WP (base)"]["instruction"], d["mean"]["random (instruct)"]["instruction"]
        )
        for d in data.values()
    )
    summary = (
        f"Top WP heads of the instruct model put more attention per instruction token than the "
        f"same heads in the base and random heads in {wins}/{len(data)} tasks; instruction/other "
        f"ratio: " + ", ".join(f"{t} {r:.2f}" for t, r in ratio.items()) + "."
    )
    return AnalysisResult("attention", "Selective attention (Fig. 11)", data, figures, summary)
