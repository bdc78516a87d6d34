"""The MLP of a mixture of experts, run so that scoring sees its neurons (docs/method.md §1, §5).

A sparse block runs each routed expert only on the tokens routed to it, inside one fused module
(`experts`), and scales its output by the routing weight; Qwen2-MoE adds a shared expert scaled
by a sigmoid gate. No linear layer there takes every neuron's activation, as `down_proj` does in
a dense MLP. While `decomposed` is active the block computes the same output as one that does:

    X[t, e*I + j] = w_e(t) a_ej(t)          (w_e(t) = 0 where token t is not routed to e)
    X[t, E*I + j] = sigmoid(g(t)) a_sj(t)   (the shared expert)
    out = X W^T,  W = [down_0 | ... | down_{E-1} | down_shared]   (`write_matrix`)

so X is the neuron activation (the input of an expert's down projection for the tokens routed to
it, times the routing weight) and W the writer, as `down_proj`'s input and weight are for a dense
MLP. The router, the experts' gating (`experts._apply_gate`) and the shared expert are the
model's own modules; GPT-OSS's per-expert output bias is added as `sum_e w_e(t) b_e`, and its
router scores are returned beside the output as its MLP does. Every expert runs at every token
(E/k times the sparse forward's work): exact sweeps and activation patching need those
activations anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from mergekit_wp.components import ModelShape, TensorRole


def _roles(shape: ModelShape) -> tuple[TensorRole, list[TensorRole], list[TensorRole]]:
    """(router, the experts' own biases of their outputs, the shared expert's roles): the
    router is the routed expert-unit role outside the experts module (GPT-OSS's `down_proj_bias`
    `[E, d]` is inside it: each expert's output bias, scaled by its routing weight)."""
    mlp = [r for r in shape.family.roles if r.site == "mlp"]
    experts = shape.role("gate").module
    router = next(r for r in mlp if r.unit == "expert" and r.routed and r.module != experts)
    biases = [r for r in mlp if r.unit == "expert" and r.routed and r.module == experts]
    return router, biases, [r for r in mlp if not r.routed]


def write_matrix(site: nn.Module, shape: ModelShape, unit: str) -> torch.Tensor:
    """The writer of `unit` as `[d, units * width]`: column u*width.. is unit u's (o_proj's,
    down_proj's weight itself; a mixture of experts' every expert's down projection, side by
    side in neuron order)."""
    writers = sorted(
        (r for r in shape.roles(unit) if r.writes_residual),
        key=lambda r: shape.unit_range(r).start,
    )
    params = [getattr(site.get_submodule(r.module), r.weight) for r in writers]
    if len(writers) == 1 and not writers[0].routed:
        return params[0]
    return torch.cat([shape.unit_rows(r, p) for r, p in zip(writers, params)]).T


def _forward(
    block: nn.Module,
    shape: ModelShape,
    record: Callable[[torch.Tensor], None],
    hidden: torch.Tensor,
) -> torch.Tensor:
    router, biases, shared = _roles(shape)
    x = hidden.reshape(-1, hidden.shape[-1])
    _, weights, index = block.get_submodule(router.module)(x)
    gate = shape.role("gate")  # fused with up: the experts module's gate_up
    experts = block.get_submodule(gate.module)
    gate_up = torch.einsum(
        "nd,eod->neo", x, torch.movedim(getattr(experts, gate.weight), gate.axis, 1)
    )
    if gate.unit_bias:
        gate_up = gate_up + getattr(experts, gate.bias_name)
    acts = experts._apply_gate(gate_up)  # [N, E, I]: the model's own gating
    routing = torch.zeros(acts.shape[:2], dtype=weights.dtype, device=x.device)
    routing = routing.scatter(1, index, weights)
    columns = [(acts * routing.unsqueeze(-1)).to(acts.dtype).flatten(1)]
    if shared:
        down = next(r for r in shared if r.unit == "neuron" and r.writes_residual)
        found: list[torch.Tensor] = []
        handle = block.get_submodule(down.module).register_forward_pre_hook(
            lambda module, args: found.append(args[0])
        )
        try:
            block.get_submodule(down.module.rsplit(".", 1)[0])(x)  # the shared expert's MLP
        finally:
            handle.remove()
        gates = [r for r in shared if r.unit == "expert"]
        scale = torch.sigmoid(block.get_submodule(gates[0].module)(x)) if gates else 1
        columns.append(scale * found[0])
    neurons = torch.cat(columns, dim=-1).unflatten(0, hidden.shape[:-1])  # [B, T, N]
    record(neurons)
    out = neurons @ write_matrix(block, shape, "neuron").T
    for bias in biases:
        b = getattr(experts, bias.weight)  # [E, d]
        out = out + (routing.to(b.dtype) @ b).unflatten(0, hidden.shape[:-1])
    out = out.to(hidden.dtype)
    return (out, weights) if shape.family.experts.get("outputs") else out


@contextmanager
def decomposed(
    block: nn.Module, shape: ModelShape, record: Callable[[torch.Tensor], None]
) -> Iterator[None]:
    """While active, `block` (a layer's MoE MLP) runs as above and passes X `[B, T, N]` to
    `record` at every forward; its parameters are read at each call (`functional_call` works)."""
    before = block.__dict__.get("forward")
    block.forward = partial(_forward, block, shape, record)
    try:
        yield
    finally:
        del block.forward
        if before is not None:
            block.forward = before
