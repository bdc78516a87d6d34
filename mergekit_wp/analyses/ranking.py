"""Top-k selections over `[layers, units]` score tensors, their overlaps and layer histograms."""

from __future__ import annotations

from typing import Literal

import torch

from mergekit_wp.components import Component

Kind = Literal["head", "neuron"]
Region = Literal["all", "upstream", "downstream"]


def layer_mask(n_layers: int, units: int, anchor_layer: int | None, region: Region) -> torch.Tensor:
    """Bool `[L, U]`: upstream = layers <= anchor (they can move F_a), downstream = layers after
    it.
    """
    layers = torch.arange(n_layers).unsqueeze(1).expand(n_layers, units)
    if region == "all":
        return torch.ones(n_layers, units, dtype=torch.bool)
    if anchor_layer is None:
        raise ValueError(f"region {region!r} needs an anchor layer")
    if region == "upstream":
        return layers <= anchor_layer
    if region == "downstream":
        return layers > anchor_layer
    raise ValueError(f"region must be all, upstream or downstream; got {region!r}")


def top_k(
    scores: torch.Tensor,
    k: int,
    kind: Kind,
    mask: torch.Tensor | None = None,
    absolute: bool = False,
) -> list[Component]:
    """The k highest-scoring components of `scores` `[L, U]` (ties broken by position)."""
    values = scores.detach().double().abs() if absolute else scores.detach().double()
    flat = values.flatten().clone()
    if mask is not None:
        flat[~mask.flatten()] = float("-inf")
        k = min(k, int(mask.sum()))
    k = min(k, flat.numel())
    # A stable sort on the negated values keeps ties in layer-major order (reproducible).
    order = torch.sort(-flat, stable=True).indices[:k]
    units = scores.shape[1]
    return [Component(kind, int(i) // units, int(i) % units) for i in order]


def random_k(
    n_layers: int, units: int, k: int, kind: Kind, seed: int, mask: torch.Tensor | None = None
) -> list[Component]:
    """k components drawn uniformly without replacement (inside `mask`), reproducibly."""
    allowed = (
        torch.arange(n_layers * units) if mask is None else mask.flatten().nonzero().squeeze(1)
    )
    generator = torch.Generator().manual_seed(seed)
    pick = allowed[torch.randperm(allowed.numel(), generator=generator)[: min(k, allowed.numel())]]
    return [Component(kind, int(i) // units, int(i) % units) for i in pick]


def overlap(a: list[Component], b: list[Component]) -> float:
    """|A ∩ B| / |A| (the paper's intersection rate; 1.0 for a set with itself)."""
    if not a:
        return float("nan")
    return len(set(a) & set(b)) / len(a)


def layer_counts(components: list[Component], n_layers: int) -> list[int]:
    counts = [0] * n_layers
    for c in components:
        counts[c.layer] += 1
    return counts


def as_names(components: list[Component]) -> list[str]:
    return [str(c) for c in components]
