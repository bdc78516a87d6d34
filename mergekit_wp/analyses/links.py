"""Supplier -> target link strength E_link (docs/method.md §7), by the scoring package's WP-attr
pass.

Need direction of a target: `g_need = ∂F_a(M_base, x)/∂Ψ`, where Ψ is the target's *own* copy of
the residual-stream input it reads (the normed layer input entering its q / k / v rows, or its
gate / up rows). It is found by adding a zero perturbation δ `[B, T, d]` to exactly those reads
(`out[..., rows] += δ @ W[rows]ᵀ`) and taking ∂F_a/∂δ, so other components reading the same stream
do not leak into it. With grouped-query attention a head's k/v rows serve its whole KV group;
the perturbation goes through them anyway (the head does read them).

Need utility: `F_need(M, x) = <Ψ(M, x), g_need(x)>` summed over positions. Its WP-attr scores,
weighted by 1/G(x) of the anchor gap, are E_link of every earlier component.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from typing import Any

import torch
from torch import nn

from mergekit_wp.components import Component, ModelShape, TensorRole
from mergekit_wp.scoring.attribution import gradient_pass
from mergekit_wp.scoring.forward import TokenBatch, model_shape
from mergekit_wp.scoring.utility import Utility, batch_context


class _Stop(Exception):
    """Raised once Ψ is captured: nothing after the target's read is needed."""


def read_roles(shape: ModelShape, target: Component) -> list[tuple[TensorRole, int]]:
    """The read-side projections of a target and the unit index it owns in each."""
    if target.kind == "head":
        group = shape.group_of_head(target.index)
        return [
            (r, target.index if r.unit == "head" else group)
            for r in shape.roles()
            # a norm spanning every head (OLMo 2's q_norm) is not a projection to hook
            if not r.writes_residual and r.unit in ("head", "kv_group") and not r.spans_units
        ]
    return [(r, target.index) for r in shape.roles("neuron") if not r.writes_residual]


def _add_read(delta: torch.Tensor, weight: torch.Tensor, rows: slice) -> Any:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        extra = torch.zeros_like(output)
        extra[..., rows] = delta.to(output.dtype) @ weight[rows].T.to(output.dtype)
        return output + extra

    return hook


def need_directions(
    base: nn.Module, batch: TokenBatch, anchor_utility: Utility, targets: list[Component]
) -> dict[Component, torch.Tensor]:
    """`{target: g_need [B, T, d]}` from one backward of F_a through per-target perturbations."""
    shape = model_shape(base)
    b, t = batch.input_ids.shape
    device = base.get_input_embeddings().weight.device
    dtype = base.get_input_embeddings().weight.dtype
    deltas = {
        c: torch.zeros(b, t, shape.hidden_size, device=device, dtype=dtype, requires_grad=True)
        for c in targets
    }
    with ExitStack() as stack, torch.enable_grad():
        for target, delta in deltas.items():
            for role, unit in read_roles(shape, target):
                module = base.get_submodule(shape.module_path(target.layer, role))
                rows = shape.unit_slice(role, unit, 1)[0]
                handle = module.register_forward_hook(
                    _add_read(delta, module.weight.detach(), rows)
                )
                stack.callback(handle.remove)
        values = anchor_utility(base, batch)
        grads = torch.autograd.grad(values.sum(), list(deltas.values()), allow_unused=True)
    return {
        c: (g.detach() if g is not None else torch.zeros_like(d))
        for (c, d), g in zip(deltas.items(), grads)
    }


class NeedUtility:
    """F_need(M, x) = Σ_t <Ψ_t(M, x), g_need_t(x)> for one target; g_need cached per batch."""

    def __init__(
        self,
        target: Component,
        anchor_utility: Utility,
        base: nn.Module,
        targets: list[Component] | None = None,
    ) -> None:
        self.target = target
        self.name = f"need:{target}"
        self.anchor_utility = anchor_utility
        self.base = base
        # Computing every target's g_need in one backward is as cheap as computing one.
        self.targets = targets or [target]

    def stop_layer(self, model: nn.Module) -> int:
        return self.target.layer

    def need(self, batch: TokenBatch) -> torch.Tensor:
        key = ("need", self.target)
        if key not in batch.cache:
            for c, g in need_directions(
                self.base, batch, self.anchor_utility, self.targets
            ).items():
                batch.cache[("need", c)] = g
        return batch.cache[key]

    def __call__(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        g = self.need(batch)
        shape = model_shape(model)
        role, _ = read_roles(shape, self.target)[0]
        module = model.get_submodule(shape.module_path(self.target.layer, role))
        seen: list[torch.Tensor] = []

        def grab(mod: nn.Module, args: Any) -> None:
            seen.append(args[0])
            raise _Stop

        handle = module.register_forward_pre_hook(grab)
        device = model.get_input_embeddings().weight.device
        try:
            model(
                input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device),
                use_cache=False,
            )
        except _Stop:
            pass
        finally:
            handle.remove()
        psi = seen[0]
        dtype = torch.float64 if psi.dtype == torch.float64 else torch.float32
        return (psi.to(dtype) * g.to(psi.device, dtype)).sum(dim=(1, 2))


def link_strengths(
    base: nn.Module,
    sft: nn.Module,
    batches: Iterable[TokenBatch],
    anchor_utility: Utility,
    targets: list[Component],
    gap_floor: float = 1e-6,
) -> dict[Component, dict[str, torch.Tensor]]:
    """`{target: {"heads": [L, H], "neurons": [L, I]}}`: E_link of every component to each target.

    Only components before the target's read can have a non-zero link (earlier layers; for a
    neuron target also the heads of its own layer).
    """
    shape = model_shape(base)
    totals = {
        t: {
            "heads": torch.zeros(
                shape.num_hidden_layers, shape.num_attention_heads, dtype=torch.float64
            ),
            "neurons": torch.zeros(
                shape.num_hidden_layers, shape.intermediate_size, dtype=torch.float64
            ),
        }
        for t in targets
    }
    count = 0
    for batch in batches:
        _, _, weights = batch_context(base, sft, batch, anchor_utility, gap_floor)
        count += int((weights != 0).sum())
        for target in targets:
            if target.kind == "head" and target.layer == 0:
                continue  # it reads the embeddings alone: no component can supply it
            utility = NeedUtility(target, anchor_utility, base, targets)
            parts = gradient_pass(base, sft, batch, utility, weights)["wp_attr"]
            totals[target]["heads"] += parts["q"] + parts["o"]
            totals[target]["neurons"] += parts["gate"] + parts["up"] + parts["down"]
    return {t: {k: v / max(count, 1) for k, v in d.items()} for t, d in totals.items()}
