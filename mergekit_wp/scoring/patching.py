"""Set-wise patching (docs/method.md §3): Replace(M_base, M_sft | Θ(S)) in place, its effect E_w(S).

`restore` / `ablate` patch the stored HF tensors through `components.ModelShape.slices` and
undo on exit, so the analyses can run greedy generation or any utility on a patched model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

from mergekit_wp.components import Component, TensorGroupName
from mergekit_wp.scoring.forward import TokenBatch, model_shape
from mergekit_wp.scoring.utility import Utility, batch_context


@contextmanager
def _patched_slices(
    target: nn.Module, source: nn.Module, slices: Iterable[tuple[str, tuple[slice, ...]]]
) -> Iterator[nn.Module]:
    """While active, each `(name, index)` slice of `target` holds `source`'s; undone on exit."""
    target_params = dict(target.named_parameters())
    source_params = dict(source.named_parameters())
    saved: list[tuple[torch.Tensor, tuple[slice, ...], torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, index in slices:
                if name not in target_params:
                    continue  # e.g. q_proj.bias on Llama
                if name not in source_params:
                    raise ValueError(f"source model has no tensor {name!r} that the target has")
                tensor = target_params[name]
                saved.append((tensor, index, tensor[index].clone()))
                tensor[index] = source_params[name][index].to(tensor.device, tensor.dtype)
        yield target
    finally:
        with torch.no_grad():
            for tensor, index, value in reversed(saved):
                tensor[index] = value


def patched(target: nn.Module, source: nn.Module, components: Iterable[Component]):
    """While active, `target` carries `source`'s slices Θ(S) of `components`; undone on exit."""
    shape = model_shape(target)
    return _patched_slices(
        target, source, (item for c in components for item in shape.slices(c).items())
    )


def patched_tensors(target: nn.Module, source: nn.Module, groups: Iterable[TensorGroupName]):
    """While active, every `target` tensor of `groups` (`ModelShape.tensor_group`) is `source`'s;
    of a fused tensor, the blocks of those groups (`ModelShape.tensor_blocks`).

    Where a vocabulary differs (an added pad token), only the token rows both models have are
    copied.
    """
    shape, groups = model_shape(target), set(groups)
    sizes = {name: p.shape for name, p in source.named_parameters()}
    slices = []
    for name, tensor in target.named_parameters():
        for group, block in shape.tensor_blocks(name, tensor.ndim):
            if group in ("embedding", "unembedding"):
                rows = min(tensor.shape[0], sizes.get(name, tensor.shape)[0])
                block = (slice(0, rows),)
            if group in groups:
                slices.append((name, block))
    return _patched_slices(target, source, slices)


def restore(base: nn.Module, sft: nn.Module, components: Iterable[Component]):
    """Context manager: Replace(M_base, M_sft | Θ(S)) in place on `base`, undone on exit."""
    return patched(base, sft, components)


def ablate(sft: nn.Module, base: nn.Module, components: Iterable[Component]):
    """Context manager: Replace(M_sft, M_base | Θ(S)) in place on `sft`, undone on exit."""
    return patched(sft, base, components)


@torch.no_grad()
def set_effect(
    base: nn.Module,
    sft: nn.Module,
    components: Sequence[Component],
    batches: Iterable[TokenBatch],
    utility: Utility,
    mode: Literal["restore", "ablate"] = "restore",
    gap_floor: float = 1e-6,
) -> float:
    """E_w(S): gap fraction restored into the base (or, `ablate`, removed from the sft) by S."""
    total, count = 0.0, 0
    for batch in batches:
        f_base, f_sft, weights = batch_context(base, sft, batch, utility, gap_floor)
        if mode == "restore":
            with restore(base, sft, components):
                change = utility(base, batch).double().cpu() - f_base
        elif mode == "ablate":
            with ablate(sft, base, components):
                change = f_sft - utility(sft, batch).double().cpu()
        else:
            raise ValueError(f"mode must be 'restore' or 'ablate'; got {mode!r}")
        total += float(change @ weights)
        count += int((weights != 0).sum())
    return total / max(count, 1)
