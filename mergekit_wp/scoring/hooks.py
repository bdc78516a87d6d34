"""Residual-stream access on HF decoders by forward hooks: capture `z_l`, steer along a direction.

`z_l` is the output hidden state of decoder layer `l` (0-based), before any final norm, at the
module path `ModelShape.layer_prefix(l)`. Inputs are left-padded (the anchor position, the
prompt's last token, is index -1 of every row) with explicit position ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from mergekit_wp.components import ModelShape
from mergekit_wp.scoring.forward import decoder_layer, hidden_of, layer_outputs

SteerMode = Literal["anchor", "all"]


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def capture_residuals(
    model: nn.Module,
    shape: ModelShape,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    layers: list[int] | range | None = None,
    stop_early: bool = True,
) -> dict[int, torch.Tensor]:
    """`{l: z_l}` (each `[batch, pos, d_model]`) for the requested layers (default: all).

    Runs under the caller's grad mode (wrap in `torch.no_grad()` for plain reads). With
    `stop_early`, the forward stops after the last requested layer: the rest is not computed.
    """
    wanted = range(shape.num_hidden_layers) if layers is None else layers
    if not wanted:
        raise ValueError("capture_residuals needs at least one layer")
    return layer_outputs(
        model,
        shape,
        wanted,
        lambda: model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ),
        stop_early,
    )


def steer_residual(
    hidden: torch.Tensor, direction: torch.Tensor, target: float | torch.Tensor
) -> torch.Tensor:
    """`z + (target - <z, v̂>) v̂` for each vector of `hidden` `[..., d]`: projection := `target`.

    `direction` must be a unit vector; the arithmetic is done in fp32 whatever the model dtype.
    """
    z = hidden.float()
    unit = direction.to(device=hidden.device, dtype=torch.float32)
    coefficient = target - z @ unit  # a(x) = λ̄ - <z_l(x), v̂>   [...]
    return (z + coefficient.unsqueeze(-1) * unit).to(hidden.dtype)


def _cache_is_empty(attention: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether this call of the layer is a prefill (or a forward without cache)."""
    # transformers 5.24 passes it as `cache`; earlier 5.x releases as `past_key_values`.
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return True
    return cache.get_seq_length(getattr(attention, "layer_idx", 0)) == 0


@contextmanager
def steering(
    model: nn.Module,
    shape: ModelShape,
    layer: int,
    direction: torch.Tensor,
    target: float,
    mode: SteerMode = "anchor",
) -> Iterator[None]:
    """While active, set the projection of `z_layer` on `direction` to `target` (docs/method.md §2).

    `mode="anchor"`: only at the anchor position (index -1 of a prefill or cache-free forward;
    inputs must be left-padded); decoding steps that reuse the KV cache are left alone.
    `mode="all"` (Stolfo et al. 2024): every position of the prompt and every generated token,
    each with its own input-adaptive coefficient. Works under `model.generate` with a KV cache.
    """
    if mode not in ("anchor", "all"):
        raise ValueError(f"steering mode must be 'anchor' or 'all'; got {mode!r}")
    direction = direction.detach().float()
    norm = direction.norm()
    if not torch.isfinite(norm) or norm == 0:
        raise ValueError("steering direction must be a finite, non-zero vector")
    unit = direction / norm
    module = decoder_layer(model, shape, layer)
    attention = module.get_submodule(shape.site("head"))
    prefill: list[bool] = [True]

    def pre_hook(mod: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        # Read before the layer writes its own keys/values into the cache.
        prefill[0] = _cache_is_empty(attention, kwargs)

    def hook(mod: nn.Module, args: Any, output: Any) -> Any:
        hidden = hidden_of(output)
        if mode == "all":
            return _replace_hidden(output, steer_residual(hidden, unit, target))
        if not prefill[0]:
            return output
        steered = hidden.clone()
        steered[:, -1] = steer_residual(hidden[:, -1], unit, target)
        return _replace_hidden(output, steered)

    handles = [
        module.register_forward_pre_hook(pre_hook, with_kwargs=True),
        module.register_forward_hook(hook),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
