"""The `widen` merge method: WIDEN, Yu et al. 2024 (arXiv:2408.03092), as in the authors' code.

Per input column of a 2-D weight (per token row of the input embedding), each expert's change
against the base is split into a magnitude change and a direction change; both are ranked within
the expert, turned into scores by a softmax across experts and calibrated, and the column's delta
is weighted by the mean of the two scores. 1-D tensors are scored element by element on the raw
change. docs/widen.md says which choices come from the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method

from mergekit_wp.components import FAMILIES
from mergekit_wp.merge_method import register_once

METHOD_NAME = "widen"
# The input embedding is stored [vocab, hidden] (nn.Embedding), the transpose of a linear layer's
# [out, in]; its "columns" are its token rows. Its name is each family table's `embedding`.
TOKEN_EMBEDDINGS = frozenset(f"{family.embedding}.weight" for family in FAMILIES)


def within_expert_ranks(changes: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its expert's row of `changes` `[K, n]`: 0 for the smallest.

    Ties keep their index order (a stable sort), as in the authors' code.
    """
    order = torch.argsort(changes, dim=1, stable=True)
    positions = torch.arange(changes.shape[1], device=changes.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions).double()


def calibrated_scores(
    logits: torch.Tensor, significance: torch.Tensor, ratio: float, value: float
) -> torch.Tensor:
    """Softmax of `logits` `[K, n]` across experts; `value` where an expert's `significance`
    exceeds `ratio` times that expert's mean significance."""
    above = significance > ratio * significance.mean(dim=1, keepdim=True)
    return torch.where(above, value, torch.softmax(logits, dim=0))


def rank_scores(changes: torch.Tensor, ratio: float, value: float) -> torch.Tensor:
    """Scores `[K, n]` from one kind of change: the softmax runs on rank / n."""
    ranks = within_expert_ranks(changes)
    # The mean rank is (n-1)/2 exactly on integer ranks, so the middle entry never flips.
    return calibrated_scores(ranks / changes.shape[1], ranks, ratio, value)


def column_changes(
    base: torch.Tensor, deltas: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Magnitude change `|‖θ‖ - ‖b‖|` and direction change `1 - cos(θ, b)` `[K, n]` per column.

    `base` `[out, in]`, `deltas` `[K, out, in]`; columns are reduced over `dim` of `base`. Both are
    written in terms of the delta, so fp32 keeps their precision when deltas are small (the
    authors' `1 - cosine_similarity` in fp32 reorders near-equal columns). A zero column counts
    as a zero direction.
    """
    tiny = torch.finfo(base.dtype).tiny
    experts = base + deltas
    base_norm = torch.linalg.vector_norm(base, dim=dim, keepdim=True).clamp_min(tiny)
    expert_norm = torch.linalg.vector_norm(experts, dim=dim + 1, keepdim=True).clamp_min(tiny)
    # ‖θ‖ - ‖b‖ = Σ δ (2b + δ) / (‖θ‖ + ‖b‖)
    norm_change = (deltas * (base + experts)).sum(dim + 1, keepdim=True)
    norm_change = norm_change / (expert_norm + base_norm)
    # θ̂ - b̂ = (δ - b̂ (‖θ‖ - ‖b‖)) / ‖θ‖, and 1 - cos = ‖θ̂ - b̂‖² / 2
    unit_change = (deltas - base / base_norm * norm_change) / expert_norm
    direction_change = unit_change.square().sum(dim + 1) / 2
    return norm_change.squeeze(dim + 1).abs(), direction_change


def column_weights(
    base: torch.Tensor, deltas: torch.Tensor, dim: int, ratio: float, value: float
) -> torch.Tensor:
    """Per-expert weight `[K, n]` of each column: the mean of its magnitude and direction scores."""
    magnitude_change, direction_change = column_changes(base, deltas, dim)
    magnitude_scores = rank_scores(magnitude_change, ratio, value)
    direction_scores = rank_scores(direction_change, ratio, value)
    return (magnitude_scores + direction_scores) / 2


def widen(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    token_embedding: bool = False,
    above_average_value_ratio: float = 1.0,
    score_calibration_value: float = 1.0,
    name: str = "tensor",
) -> torch.Tensor:
    """WIDEN of one tensor: `base + Σ_k w_k ⊙ (θ_k - base)` in fp32 (fp64 inputs: fp64)."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    base_acc = base.to(acc)
    deltas = torch.stack([e.to(device=base.device, dtype=acc) for e in experts]) - base_acc
    ratio, value = above_average_value_ratio, score_calibration_value
    if base.ndim == 1:
        change = deltas.abs()
        weights = calibrated_scores(change, change, ratio, value).to(acc)
    elif base.ndim == 2:
        # A linear weight [out, in] is scored per input column (reduce over rows); the token
        # embedding [vocab, hidden] per token row (reduce over columns).
        dim = 1 if token_embedding else 0
        weights = column_weights(base_acc, deltas, dim, ratio, value).to(acc)
        weights = weights.unsqueeze(dim + 1)
    else:
        raise ValueError(
            f"widen: {name} has shape {tuple(base.shape)}; WIDEN merges 1-D and 2-D tensors only"
        )
    return (base_acc + (weights * deltas).sum(dim=0)).to(base.dtype)


@merge_method(
    name=METHOD_NAME,
    pretty_name="WIDEN (weight disentanglement)",
    reference_url="https://arxiv.org/abs/2408.03092",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def widen_merge(
    group: TensorGroup,
    above_average_value_ratio: float = 1.0,
    score_calibration_value: float = 1.0,
) -> torch.Tensor:
    """`widen` for one output tensor; the defaults are those of the authors' scripts."""
    name = group.metadata.name or "tensor"
    return widen(
        group.base.tensor,
        [entry.tensor for entry in group.non_base],
        token_embedding=name in TOKEN_EMBEDDINGS,
        above_average_value_ratio=above_average_value_ratio,
        score_calibration_value=score_calibration_value,
        name=name,
    )


def register_widen() -> None:
    """Register `widen` with mergekit (idempotent)."""
    register_once(widen_merge)
