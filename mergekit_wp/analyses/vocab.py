"""Vocabulary projection (Tables 5-7, Fig. 28): task vectors and neuron write-backs through the
unembedding.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from torch import nn

from mergekit_wp.analyses.config import AnalysisOptions, Tasks
from mergekit_wp.analyses.report import AnalysisResult, Report
from mergekit_wp.components import Component, ModelShape
from mergekit_wp.scoring.forward import model_shape


@torch.no_grad()
def project_to_vocab(model: nn.Module, vectors: torch.Tensor) -> torch.Tensor:
    """Logits `[n, vocab]` of residual directions `[n, d]` read out as a final state.

    The direction goes through the model's own final norm and output embedding (Gemma's
    soft-capping is monotone, so it cannot change a top-k and is left out).
    """
    norm = model.get_submodule(model_shape(model).family.final_norm)
    head = model.get_output_embeddings()
    x = vectors.to(head.weight.dtype).to(head.weight.device)
    return head(norm(x)).float().cpu()


def top_tokens(tokenizer, logits: torch.Tensor, k: int) -> list[list[str]]:
    """The k highest-logit tokens of each row, decoded one by one (special tokens kept visible)."""
    logits = logits[..., : len(tokenizer)]  # ids the tokenizer can decode (an added pad may not be)
    ids = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return [[tokenizer.decode([int(i)]) for i in row] for row in ids]


def write_back_directions(
    model: nn.Module, shape: ModelShape, neurons: list[Component]
) -> torch.Tensor:
    """`down_proj[:, j]` of each neuron (its write-back into the residual stream): `[n, d]`."""
    roles = {r.part: r for r in shape.roles("neuron")}
    columns = []
    for n in neurons:
        weight = model.get_submodule(shape.module_path(n.layer, roles["down"])).weight
        columns.append(weight[:, n.index].detach().float())
    return torch.stack(columns) if columns else torch.zeros(0, shape.hidden_size)


def _table_figure(rows: list[tuple[str, list[str]]], title: str) -> plt.Figure:
    cells = [[label, "  ".join(repr(t)[1:-1] for t in tokens)] for label, tokens in rows]
    fig, ax = plt.subplots(figsize=(11, 0.35 * len(cells) + 0.9))
    ax.axis("off")
    table = ax.table(
        cellText=cells,
        colLabels=["", "top tokens"],
        loc="center",
        cellLoc="left",
        colWidths=[0.15, 0.85],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


class Options(AnalysisOptions):
    top_tokens: int = 10
    neurons: int = 5
    layers: list[int] | None = None  # None: every layer
    tasks: Tasks = "all"


def run(study, report: Report, options: Options) -> AnalysisResult:
    """Per task: each chosen layer's task vector and the top downstream neurons' write-backs."""
    k = options.top_tokens
    n_neurons = options.neurons
    layers = options.layers or list(range(study.shape.num_hidden_layers))
    data: dict = {}
    figures = []
    for task in study.tasks:
        anchor = study.anchor(task)
        logits = project_to_vocab(study.instruct, anchor.vectors[layers])
        vector_tokens = dict(zip(layers, top_tokens(study.tokenizer, logits, k)))
        down = study.downstream_scores(task).neurons
        mask = study.region_mask("neuron", "downstream")
        from mergekit_wp.analyses.ranking import top_k

        neurons = top_k(down, n_neurons, "neuron", mask)
        wb = write_back_directions(study.instruct, study.shape, neurons)
        neuron_tokens = dict(
            zip(
                map(str, neurons),
                top_tokens(study.tokenizer, project_to_vocab(study.instruct, wb), k),
            )
        )
        data[task] = {
            "anchor_layer": anchor.layer,
            "task_vector": vector_tokens,
            "downstream_neurons": neuron_tokens,
        }
        rows = [
            (f"layer {layer}" + (" (anchor)" if layer == anchor.layer else ""), toks)
            for layer, toks in vector_tokens.items()
        ]
        rows += [(name, toks) for name, toks in neuron_tokens.items()]
        figures.append(
            report.figure(
                "vocab", _table_figure(rows, f"vocabulary projection: {task}"), f"vocab_{task}"
            )
        )
    summary = "Top tokens of task vectors and downstream write-backs; read the tables for cues."
    return AnalysisResult("vocab", "Vocabulary projection (Tables 5-7)", data, figures, summary)
