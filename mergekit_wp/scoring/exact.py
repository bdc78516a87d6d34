"""Exact single-component sweeps: Weight Patching (§3) and activation patching (§5).

One generic driver, `layer_effects`, plus tiny setters: a setter turns a chunk of units of
layer `l` into the change each one makes to its site's output (`ModelShape.site`: the
attention module for heads, the MLP for neurons), `[V, B, T, d]`. The driver reuses the base's
residual stream up to `l` (a `Trace`), runs layer `l` once for all V variants stacked along the
batch, then layers `l+1..stop` on the `V*B` batch, and stops where the utility reads. Variants
whose change is exactly zero (unchanged weights, equal activations) are not run: their effect
is 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from mergekit_wp.components import Component, ModelShape, Unit
from mergekit_wp.scoring.forward import (
    TokenBatch,
    Trace,
    decoder_layers,
    hidden_of,
    last_position_only,
    model_shape,
    repeat_batch,
    run_layers,
    site_inputs,
    substituted,
    trace,
    writer_inputs,
)
from mergekit_wp.scoring.moe import write_matrix
from mergekit_wp.scoring.utility import ReadoutUtility, batch_context, compute_dtype

__all__ = [
    "LayerRun",
    "ap_setter",
    "batch_scores",
    "exact_scores",
    "layer_effects",
    "layer_sums",
    "run_layer",
    "wp_setter",
]

Method = Literal["wp", "ap"]
Setter = Callable[[Sequence[int]], torch.Tensor]  # units -> site-output changes [V, B, T, d]


@dataclass
class LayerRun:
    """One base run of layer `l`: the site modules' call arguments, inputs and outputs."""

    attn_args: tuple
    attn_kwargs: dict[str, Any]
    attn_out: Any  # the attention site's return value (tuple: output, weights)
    mlp_in: torch.Tensor
    mlp_out: Any  # the MLP site's return value (GPT-OSS: output, router scores)
    write_in: dict[str, torch.Tensor]  # writer part -> its input: "o" [B,T,H*dh], "down" [B,T,I]


def _site_module(model: nn.Module, shape: ModelShape, layer: int, unit: Unit) -> nn.Module:
    return model.get_submodule(shape.site_path(layer, unit))


@torch.no_grad()
def run_layer(
    model: nn.Module, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any]
) -> LayerRun:
    """Run decoder layer `layer` of `model` once, recording what its sites saw and produced."""
    shape = model_shape(model)
    seen: dict[str, Any] = {}

    def keep(key: str, with_kwargs: bool = False) -> Callable:
        def hook(module: nn.Module, args: tuple, *rest: Any) -> None:
            seen[key] = (args, rest[0]) if with_kwargs else (args[0] if rest == () else rest[0])

        return hook

    attn = _site_module(model, shape, layer, "head")
    mlp = _site_module(model, shape, layer, "neuron")
    hooks = [
        attn.register_forward_pre_hook(keep("attn_call", True), with_kwargs=True),
        attn.register_forward_hook(keep("attn_out")),
        mlp.register_forward_pre_hook(keep("mlp_in")),
        mlp.register_forward_hook(keep("mlp_out")),
    ]
    writers = [shape.writer(unit) for unit in ("head", "neuron")]
    try:
        with ExitStack() as stack:
            for site, role in zip((attn, mlp), writers):
                record = partial(seen.__setitem__, role.part)
                stack.enter_context(writer_inputs(site, shape, role.unit, record))
            decoder_layers(model, shape)[layer](hidden, **kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    args, kw = seen["attn_call"]
    return LayerRun(
        args,
        kw,
        seen["attn_out"],
        seen["mlp_in"],
        seen["mlp_out"],
        {role.part: seen[role.part] for role in writers},
    )


def _write(
    inputs: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, width: int
) -> torch.Tensor:
    """What each unit of `index` writes through `weight` `[d, units*width]`: `[V, B, T, d]`."""
    dtype = compute_dtype(inputs)
    x = inputs[..., index.to(inputs.device)].to(dtype).unflatten(-1, (-1, width))  # [B,T,V,w]
    w = weight[:, index.to(weight.device)].to(x.device, dtype).unflatten(-1, (-1, width))  # [d,V,w]
    return torch.einsum("btvw,dvw->vbtd", x, w)


def _write_weight(model: nn.Module, shape: ModelShape, layer: int, unit: Unit) -> torch.Tensor:
    return write_matrix(_site_module(model, shape, layer, unit), shape, unit)


def wp_setter(base: nn.Module, sft: nn.Module, layer: int, unit: Unit, run: LayerRun) -> Setter:
    """Weight Patching: unit `u`'s read-side rows (q / gate, up) and write-side columns from `sft`.

    The read-side rows of every unit are independent, so one run of the site module with all
    of `sft`'s read-side rows gives every unit's patched input to the write-side projection.
    Where a norm spans the units (`TensorRole.spans_units`, OLMo 2's q_norm) they are not:
    see `_unit_by_unit_setter`.
    """
    shape = model_shape(base)
    if any(role.spans_units for role in shape.roles(unit)):
        return _unit_by_unit_setter(base, sft, layer, unit, run)
    module = _site_module(base, shape, layer, unit)
    prefix = shape.site_path(layer, unit)
    base_params, sft_params = dict(base.named_parameters()), dict(sft.named_parameters())
    overrides: dict[str, torch.Tensor] = {}
    for name, role in shape.unit_tensors(layer, unit):
        if not role.writes_residual and name in sft_params:
            # The unit's block only: a fused tensor's other blocks (Phi-3's k, v) stay the base's.
            key = name[len(prefix) + 1 :]
            tensor = overrides.setdefault(key, base_params[name].detach().clone())
            block = shape.role_block(role, tensor.ndim)
            tensor[block] = sft_params[name][block].to(tensor.device)
    part = shape.writer(unit).part
    patched_in: dict[str, torch.Tensor] = {}
    with torch.no_grad(), writer_inputs(module, shape, unit, partial(patched_in.setdefault, "x")):
        if unit == "head":
            functional_call(module, overrides, run.attn_args, run.attn_kwargs)
        else:
            functional_call(module, overrides, (run.mlp_in,))
    old_w, new_w = _write_weight(base, shape, layer, unit), _write_weight(sft, shape, layer, unit)
    changed = _changed_units(base, sft, shape, layer, unit)
    width = shape.unit_width(unit)

    def setter(units: Sequence[int]) -> torch.Tensor:
        index = shape.unit_index(unit, units)
        new = _write(patched_in["x"], new_w, index, width)
        delta = new - _write(run.write_in[part], old_w, index, width)
        # Unchanged slices patch nothing: make that exact rather than a rounding residue.
        return delta * changed[list(units)].to(delta.device, delta.dtype).view(-1, 1, 1, 1)

    return setter


def _unit_by_unit_setter(
    base: nn.Module, sft: nn.Module, layer: int, unit: Unit, run: LayerRun
) -> Setter:
    """Weight Patching one unit per run of the site module, with only that unit's slices from
    `sft`: its change to the site output is taken whole, since through a norm over all units
    (OLMo 2's q_norm `[H*hd]`) its q rows move every head's normalised query."""
    shape = model_shape(base)
    module = _site_module(base, shape, layer, unit)
    prefix = shape.site_path(layer, unit)
    base_params, sft_params = dict(base.named_parameters()), dict(sft.named_parameters())
    changed = _changed_units(base, sft, shape, layer, unit)
    site_out = hidden_of(run.attn_out if unit == "head" else run.mlp_out)

    def patched(index: int) -> torch.Tensor:
        overrides: dict[str, torch.Tensor] = {}
        for name, where in shape.slices(Component(unit, layer, index)).items():
            if name in base_params:
                tensor = overrides.setdefault(
                    name[len(prefix) + 1 :], base_params[name].detach().clone()
                )
                tensor[where] = sft_params[name][where].to(tensor.device)
        with torch.no_grad():
            if unit == "head":
                out = functional_call(module, overrides, run.attn_args, run.attn_kwargs)
            else:
                out = functional_call(module, overrides, (run.mlp_in,))
        return hidden_of(out) - site_out

    def setter(units: Sequence[int]) -> torch.Tensor:
        # Unchanged slices patch nothing: zero, not a rerun's rounding residue.
        return torch.stack(
            [patched(u) if changed[u] else torch.zeros_like(site_out) for u in units]
        )

    return setter


def _changed_units(
    base: nn.Module, sft: nn.Module, shape: ModelShape, layer: int, unit: Unit
) -> torch.Tensor:
    """`[units]` bool: whether any parameter of the unit's slice differs between the models."""
    changed = torch.zeros(shape.unit_count(unit), dtype=torch.bool)
    base_params, sft_params = dict(base.named_parameters()), dict(sft.named_parameters())
    for name, role in shape.unit_tensors(layer, unit):
        if name not in base_params:
            continue
        diff = base_params[name].detach() != sft_params[name].detach().to(base_params[name].device)
        changed[shape.unit_range(role)] |= shape.unit_sums(role, diff.int()).cpu() > 0
    return changed


def ap_setter(
    base: nn.Module, sft_inputs: torch.Tensor, layer: int, unit: Unit, run: LayerRun
) -> Setter:
    """Activation patching: unit `u`'s input to the write-side projection taken from the sft run."""
    shape = model_shape(base)
    part = shape.writer(unit).part
    weight = _write_weight(base, shape, layer, unit)
    diff = sft_inputs.to(run.write_in[part].device) - run.write_in[part]
    width = shape.unit_width(unit)
    return lambda units: _write(diff, weight, shape.unit_index(unit, units), width)


def layer_effects(
    base: nn.Module,
    base_trace: Trace,
    run: LayerRun,
    batch: TokenBatch,
    utility: ReadoutUtility,
    layer: int,
    unit: Unit,
    units: Sequence[int],
    setter: Setter,
    baseline: torch.Tensor,
    max_variant_rows: int = 64,
    on_units: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """`F(patched_u, x) - F(base, x)` for every unit `u` of `units` at `layer`: `[len(units), B]`.

    `on_units(n)` is told after every chunk of `n` units (progress within a long layer).
    """
    shape = model_shape(base)
    stop = utility.stop_layer(base)
    size = len(batch)
    chunk = max(1, max_variant_rows // size)
    out = torch.zeros(len(units), size, dtype=torch.float64)
    for start in range(0, len(units), chunk):
        part = list(units[start : start + chunk])
        delta = setter(part)
        live = (delta.flatten(1) != 0).any(1).cpu()
        if live.any():
            values = _run_variants(
                base, shape, base_trace, run, batch, utility, layer, unit, delta[live], stop
            )
            out[start : start + len(part)][live] = values.double().cpu() - baseline
        if on_units is not None:
            on_units(len(part))
    return out


def _run_variants(
    base: nn.Module,
    shape: ModelShape,
    base_trace: Trace,
    run: LayerRun,
    batch: TokenBatch,
    utility: ReadoutUtility,
    layer: int,
    unit: Unit,
    delta: torch.Tensor,
    stop: int,
) -> torch.Tensor:
    variants, size = delta.shape[0], len(batch)
    site_out = hidden_of(run.attn_out if unit == "head" else run.mlp_out)
    patched = (site_out.to(delta.dtype).unsqueeze(0) + delta).to(site_out.dtype).flatten(0, 1)
    kwargs = [
        repeat_batch(k, variants, size) if i >= layer else k
        for i, k in enumerate(base_trace.kwargs)
    ]
    hidden = base_trace.inputs[layer].repeat(variants, 1, 1)
    module = decoder_layers(base, shape)[layer]
    attn_name, mlp_name = shape.site("head"), shape.site("neuron")
    with ExitStack() as stack, torch.no_grad():
        if unit == "head":
            new_attn = (patched, *run.attn_out[1:]) if isinstance(run.attn_out, tuple) else patched
            stack.enter_context(substituted(module, attn_name, _blank_weights(new_attn)))
        else:
            repeated = hidden_of(run.attn_out).repeat(variants, 1, 1)
            attn = (repeated, *run.attn_out[1:]) if isinstance(run.attn_out, tuple) else repeated
            stack.enter_context(substituted(module, attn_name, _blank_weights(attn)))
            mlp_out = (patched, *run.mlp_out[1:]) if isinstance(run.mlp_out, tuple) else patched
            stack.enter_context(substituted(module, mlp_name, _blank_weights(mlp_out)))
        if utility.last_position_only:
            last = decoder_layers(base, shape)[stop]
            if not (layer == stop and unit == "neuron"):  # else the MLP is already substituted
                stack.enter_context(last_position_only(last, mlp_name))
        hidden = hidden_of(module(hidden, **kwargs[layer]))
        hidden = run_layers(base, hidden, kwargs, layer + 1, stop)
        return utility.readout(base, hidden, batch).view(variants, size)


def _blank_weights(attn_out: Any) -> Any:
    # Attention weights (GPT-OSS's MLP: router scores), if returned, have the base batch size;
    # the layer discards them.
    if isinstance(attn_out, tuple):
        return (attn_out[0], *(None for _ in attn_out[1:]))
    return attn_out


def exact_scores(
    base: nn.Module,
    sft: nn.Module,
    batches: Iterable[TokenBatch],
    utility: ReadoutUtility,
    method: Method = "wp",
    unit: Unit = "head",
    units: dict[int, Sequence[int]] | None = None,
    gap_floor: float = 1e-6,
    max_variant_rows: int = 64,
) -> torch.Tensor:
    """E_w (method "wp") or E_a ("ap") of single components: `[L, units]`, mean over kept examples.

    `units` maps layer -> unit indices to score (default: every unit of every layer up to the
    utility's layer); the rest stay 0.
    """
    shape = model_shape(base)
    stop = utility.stop_layer(base)
    plan = (
        units if units is not None else {l: range(shape.unit_count(unit)) for l in range(stop + 1)}
    )
    total = torch.zeros(shape.num_hidden_layers, shape.unit_count(unit), dtype=torch.float64)
    count = 0
    for batch in batches:
        _, _, weights = batch_context(base, sft, batch, utility, gap_floor)
        count += int((weights != 0).sum())
        total += batch_scores(
            base, sft, batch, utility, method, unit, plan, weights, max_variant_rows
        )
    return total / max(count, 1)


def batch_scores(
    base: nn.Module,
    sft: nn.Module,
    batch: TokenBatch,
    utility: ReadoutUtility,
    method: Method,
    unit: Unit,
    plan: dict[int, Sequence[int]],
    weights: torch.Tensor,
    max_variant_rows: int = 64,
    base_trace: Trace | None = None,
    sft_inputs: dict[tuple[int, str], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Weighted sums over one batch, `Σ_x w_x (F(patched_u, x) - F(base, x))`: `[L, units]`."""
    shape = model_shape(base)
    total = torch.zeros(shape.num_hidden_layers, shape.unit_count(unit), dtype=torch.float64)
    for layer, units in sorted(plan.items()):
        total[layer, list(units)] = layer_sums(
            base,
            sft,
            batch,
            utility,
            method,
            unit,
            layer,
            units,
            weights,
            max_variant_rows,
            base_trace,
            sft_inputs,
        )
    return total


def layer_sums(
    base: nn.Module,
    sft: nn.Module,
    batch: TokenBatch,
    utility: ReadoutUtility,
    method: Method,
    unit: Unit,
    layer: int,
    units: Sequence[int],
    weights: torch.Tensor,
    max_variant_rows: int = 64,
    base_trace: Trace | None = None,
    sft_inputs: dict[tuple[int, str], torch.Tensor] | None = None,
    on_units: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """Weighted sums over one batch of one layer's unit effects: `[len(units)]` fp64."""
    stop = utility.stop_layer(base)
    if layer > stop or not len(units):
        if on_units is not None:
            on_units(len(units))
        return torch.zeros(len(units), dtype=torch.float64)
    base_trace = base_trace or trace(base, batch, stop)
    baseline = utility.readout(base, base_trace.output, batch).double().cpu()
    run = run_layer(base, layer, base_trace.inputs[layer], base_trace.kwargs[layer])
    if method == "wp":
        setter = wp_setter(base, sft, layer, unit, run)
    elif method == "ap":
        if sft_inputs is None:
            sft_inputs = site_inputs(sft, batch, stop)
        setter = ap_setter(
            base, sft_inputs[(layer, model_shape(base).writer(unit).part)], layer, unit, run
        )
    else:
        raise ValueError(f"exact method must be 'wp' or 'ap'; got {method!r}")
    effects = layer_effects(
        base,
        base_trace,
        run,
        batch,
        utility,
        layer,
        unit,
        units,
        setter,
        baseline,
        max_variant_rows,
        on_units,
    )
    return effects @ weights.double()
