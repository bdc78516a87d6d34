"""First-order scores from one backward pass at the base model: WP-attr (§4) and AP-attr (§5).

The per-example division by the gap G(x) is folded into the loss weights
(`loss = Σ_x w_x F(M_base, x)`, `w_x = 1/G(x)`, 0 for skipped examples), so one backward per
batch yields every head's and neuron's score; callers sum batches and divide by the count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mergekit_wp.components import HEAD_PARTS, NEURON_PARTS, ModelShape, TensorRole
from mergekit_wp.scoring.forward import (
    TokenBatch,
    forward_to,
    model_shape,
    recording_site_inputs,
)
from mergekit_wp.scoring.utility import Utility, compute_dtype


@dataclass(frozen=True)
class _Slot:
    """One stored tensor a component slice lives in: layer, role and parameter name."""

    layer: int
    role: TensorRole
    name: str


def stop_layer(utility: Utility, model: nn.Module) -> int:
    """Last decoder layer a utility reads; components after it cannot move it."""
    stop = getattr(utility, "stop_layer", None)
    return stop(model) if stop else model_shape(model).num_hidden_layers - 1


def _slots(model: nn.Module, shape: ModelShape, stop: int) -> list[_Slot]:
    params = dict(model.named_parameters())
    out = []
    for layer in range(stop + 1):
        for unit in ("head", "neuron"):
            out += [
                _Slot(layer, role, name)
                for name, role in shape.unit_tensors(layer, unit)
                if name in params
            ]
    return out


def unit_sums(values: torch.Tensor, role: TensorRole, shape: ModelShape) -> torch.Tensor:
    """Sum a tensor of a role's shape over each of its units' slices: `[units of the role]`,
    accumulated in the compute dtype (fp32 for bf16 / fp16 values). Of a fused tensor, only
    the role's block."""
    return shape.unit_sums(role, values, compute_dtype(values))


def empty_parts(shape: ModelShape) -> dict[str, torch.Tensor]:
    """Zero `[L, units]` fp64 sums for every head part and neuron part."""
    layers = shape.num_hidden_layers
    heads, neurons = shape.num_attention_heads, shape.intermediate_size
    parts = {p: torch.zeros(layers, heads, dtype=torch.float64) for p in HEAD_PARTS}
    parts |= {p: torch.zeros(layers, neurons, dtype=torch.float64) for p in NEURON_PARTS}
    return parts


@torch.no_grad()
def task_delta(base_param: torch.Tensor, sft_param: torch.Tensor) -> torch.Tensor:
    """Δθ = θ_sft - θ_base on the base's device, stored in the base's dtype.

    The difference is taken in the compute dtype and rounded once: a bf16 Δθ keeps bf16's
    relative precision of Δθ itself (the gradient it multiplies is bf16 too), at half the memory
    of an fp32 copy that a run keeps for every scored tensor.
    """
    dtype = compute_dtype(base_param)
    return (sft_param.to(base_param.device, dtype) - base_param.to(dtype)).to(base_param.dtype)


def gradient_pass(
    base: nn.Module,
    sft: nn.Module,
    batch: TokenBatch,
    utility: Utility,
    weights: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
    wp_attr: bool = True,
    ap_attr: bool = False,
    deltas: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Weighted sums over the batch of WP-attr parts and AP-attr scores, one backward pass.

    Returns `{"wp_attr": {part: [L, units]}, "ap_attr": {"heads": [L, H], "neurons": [L, I]},
    "utility": {"f_base": [B], "weights": [B]}}` (fp64, on the CPU). `weights` `[B]` are 1/G(x)
    (0 for skipped examples), or a function of F(M_base, x) giving them, so the pass's own
    forward doubles as the base's gap forward. `deltas` is the caller's cache of Δθ (see
    `task_delta`): pass one dict for every batch of a run so Δθ is computed once per run; it
    takes the memory the gradients no longer hold at once.
    """
    shape = model_shape(base)
    stop = stop_layer(utility, base)
    slots = _slots(base, shape, stop) if wp_attr else []
    params = dict(base.named_parameters())
    sft_params = dict(sft.named_parameters())
    sft_acts: dict[tuple[int, str], torch.Tensor] = {}
    if ap_attr:
        # A forward of its own: the utility may answer for the expert from the batch's cache
        # (the KL reference) without running it.
        with torch.no_grad(), recording_site_inputs(sft, stop, sft_acts):
            forward_to(sft, batch, stop)
    acts: dict[tuple[int, str], torch.Tensor] = {}
    deltas = {} if deltas is None else deltas
    parts = empty_parts(shape)

    def consume(name: str) -> Callable[[torch.Tensor], None]:
        # Each gradient is folded into its unit sums as backward produces it and then dropped,
        # so the gradients of the whole model never coexist (a model's worth of memory). A
        # fused tensor (Phi-3's gate_up_proj) feeds one part per role.
        def hook(param: torch.Tensor) -> None:
            grad, param.grad = param.grad, None
            if name not in deltas:
                deltas[name] = task_delta(param, sft_params[name])
            product = deltas[name] * grad  # in the weights' dtype
            for slot in by_name[name]:
                sums = unit_sums(product, slot.role, shape)
                parts[slot.role.part][slot.layer, shape.unit_range(slot.role)] += (
                    sums.double().cpu()
                )

        return hook

    by_name: dict[str, list[_Slot]] = {}
    for slot in slots:
        by_name.setdefault(slot.name, []).append(slot)
    handles = []
    try:
        for name in by_name:
            params[name].requires_grad_(True)
            handles.append(params[name].register_post_accumulate_grad_hook(consume(name)))
        with torch.enable_grad(), recording_site_inputs(base, stop, acts, grad=ap_attr):
            values = utility(base, batch)
            f_base = values.detach().double().cpu()
            weights = weights(f_base) if callable(weights) else weights.double().cpu()
            loss = (values.double() * weights.to(values.device)).sum()
            act_keys = sorted(acts) if ap_attr else []
            loss.backward(inputs=[params[n] for n in by_name] + [acts[k] for k in act_keys])
    finally:
        for handle in handles:
            handle.remove()
        for name in by_name:
            params[name].requires_grad_(False)
            params[name].grad = None
    out: dict[str, dict[str, torch.Tensor]] = {"utility": {"f_base": f_base, "weights": weights}}
    if wp_attr:
        out["wp_attr"] = parts
    if ap_attr:
        act_grads = tuple(acts[k].grad for k in act_keys)
        out["ap_attr"] = _activation_scores(shape, act_keys, act_grads, acts, sft_acts)
    return out


def _activation_scores(
    shape: ModelShape,
    keys: list[tuple[int, str]],
    grads: tuple[torch.Tensor | None, ...],
    acts: dict[tuple[int, str], torch.Tensor],
    sft_acts: dict[tuple[int, str], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """<∇_{z_c} F, z_c(sft) - z_c(base)> summed over positions (and head dims) per component."""
    scores = {
        "heads": torch.zeros(
            shape.num_hidden_layers, shape.num_attention_heads, dtype=torch.float64
        ),
        "neurons": torch.zeros(
            shape.num_hidden_layers, shape.intermediate_size, dtype=torch.float64
        ),
    }
    for (layer, part), grad in zip(keys, grads):
        if grad is None:
            continue
        role = shape.role(part)
        base_act = acts[(layer, part)].detach()
        dtype = compute_dtype(base_act)
        diff = sft_acts[(layer, part)].to(base_act.device, dtype) - base_act.to(dtype)
        per_index = (grad.to(dtype) * diff).flatten(0, -2).sum(0)  # [units * width]
        key = "heads" if role.unit == "head" else "neurons"
        scores[key][layer] = (
            per_index.reshape(shape.unit_count(role.unit), -1).sum(-1).double().cpu()
        )
    return scores
