"""Layer-by-layer execution of HF decoders: token batches, traces of the residual stream, variants.

Scoring needs more than `model(...)`: stop at the anchor layer, restart at layer `l` from a
cached residual stream, and run many patched variants of one layer as one batch. Everything
here drives the model's own decoder-layer modules (by their HF paths from `components`), so
family details (Gemma 2 post-norms, sliding-window masks, q biases) stay the model's business.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from mergekit_wp.components import ModelShape, Unit
from mergekit_wp.scoring.moe import decomposed


@dataclass
class TokenBatch:
    """Left-padded examples: the anchor position (last prompt token) is index -1 of every row."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T], explicit so padding never shifts positions
    response_mask: torch.Tensor | None = None  # [B, T] bool: logits scored by the KL utility
    keys: tuple[Any, ...] = ()
    cache: dict[str, Any] = field(default_factory=dict)  # per-batch values a utility reuses

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> TokenBatch:
        move = lambda t: None if t is None else t.to(device)
        return TokenBatch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.position_ids),
            move(self.response_mask),
            self.keys,
        )


class _Stop(Exception):
    """Raised by a hook after the last layer a computation needs."""


def hidden_of(output: Any) -> torch.Tensor:
    # transformers 5 decoder layers return a tensor; older ones a tuple.
    return output[0] if isinstance(output, tuple) else output


def decoder_layers(model: nn.Module, shape: ModelShape) -> nn.ModuleList:
    return model.get_submodule(shape.family.layers_prefix)


def decoder_layer(model: nn.Module, shape: ModelShape, layer: int) -> nn.Module:
    """The decoder-layer module `l` of an HF causal LM, by its native module path."""
    if not 0 <= layer < shape.num_hidden_layers:
        raise ValueError(
            f"layer {layer} is out of range; the model has {shape.num_hidden_layers} decoder layers"
        )
    return model.get_submodule(shape.layer_prefix(layer))


def layer_outputs(
    model: nn.Module,
    shape: ModelShape,
    layers: list[int] | range,
    run: Callable[[], Any],
    stop_early: bool = True,
) -> dict[int, torch.Tensor]:
    """`{l: output of decoder layer l}` for `layers`, recorded while `run()` runs the model.

    With `stop_early`, the forward ends after the last of them: the rest is not computed.
    """
    wanted = sorted(set(layers))
    captured: dict[int, torch.Tensor] = {}

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[layer] = hidden_of(output)
            if stop_early and layer == wanted[-1]:
                raise _Stop

        return hook

    handles = [decoder_layer(model, shape, l).register_forward_hook(make_hook(l)) for l in wanted]
    try:
        run()
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return captured


def model_shape(model: nn.Module) -> ModelShape:
    return ModelShape.from_config(model.config)


def _call(model: nn.Module, batch: TokenBatch) -> None:
    embeddings = model.get_input_embeddings().weight
    mask = batch.attention_mask.bool()
    # A pad token the specialized tokenizer added may be outside the base's vocabulary; padding is
    # masked out, so any id serves there.
    ids = batch.input_ids.masked_fill(~mask, 0)
    if int(ids.max()) >= embeddings.shape[0]:
        raise ValueError(
            f"token id {int(ids.max())} is outside the vocabulary of {model.config.name_or_path} "
            f"({embeddings.shape[0]} tokens); the two models' tokenizers disagree"
        )
    device = embeddings.device
    model(
        input_ids=ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        position_ids=batch.position_ids.to(device),
        use_cache=False,
    )


def forward_to(model: nn.Module, batch: TokenBatch, layer: int) -> torch.Tensor:
    """Output of decoder layer `layer` `[B, T, d]`; the rest of the model is not run.

    Runs under the caller's grad mode, so it serves gradient passes too.
    """
    return layer_outputs(model, model_shape(model), [layer], lambda: _call(model, batch))[layer]


@dataclass
class Trace:
    """The base run of one batch up to a stop layer: each layer's input and call arguments."""

    inputs: list[torch.Tensor]  # hidden state entering layer l, [B, T, d]
    kwargs: list[dict[str, Any]]  # keyword arguments layer l was called with (masks, rotary)
    output: torch.Tensor  # output of the stop layer


@torch.no_grad()
def trace(model: nn.Module, batch: TokenBatch, stop: int) -> Trace:
    """Run `model` up to layer `stop`, recording what every layer received."""
    shape = model_shape(model)
    layers = decoder_layers(model, shape)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def pre_hook(module: nn.Module, args: tuple, kw: dict[str, Any]) -> None:
        kw = dict(kw)
        inputs.append(args[0] if args else kw.pop("hidden_states"))
        kwargs.append(kw)

    handles = [
        layers[l].register_forward_pre_hook(pre_hook, with_kwargs=True) for l in range(stop + 1)
    ]
    try:
        out = layer_outputs(model, shape, [stop], lambda: _call(model, batch))
    finally:
        for handle in handles:
            handle.remove()
    return Trace(inputs, kwargs, out[stop])


def run_layers(
    model: nn.Module, hidden: torch.Tensor, kwargs: list[dict[str, Any]], start: int, stop: int
) -> torch.Tensor:
    """Apply decoder layers `start..stop` (inclusive) to `hidden`, with each layer's arguments."""
    layers = decoder_layers(model, model_shape(model))
    for layer in range(start, stop + 1):
        hidden = hidden_of(layers[layer](hidden, **kwargs[layer]))
    return hidden


def repeat_batch(value: Any, times: int, batch: int) -> Any:
    """Repeat every tensor whose leading dim is the batch `times` along it (variant-major)."""
    if times == 1:
        return value
    if isinstance(value, torch.Tensor):
        if value.ndim and value.shape[0] == batch and batch > 1:
            return value.repeat(times, *([1] * (value.ndim - 1)))
        return value  # broadcast over the batch (e.g. [1, T, d] rotary tables)
    if isinstance(value, tuple):
        return tuple(repeat_batch(v, times, batch) for v in value)
    if isinstance(value, list):
        return [repeat_batch(v, times, batch) for v in value]
    if isinstance(value, dict):
        return {k: repeat_batch(v, times, batch) for k, v in value.items()}
    return value


class _Fixed(nn.Module):
    """Stands in for a submodule and returns a precomputed output."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


@contextmanager
def substituted(parent: nn.Module, name: str, output: Any) -> Iterator[None]:
    """While active, `parent.<name>(...)` returns `output` without computing anything."""
    original = getattr(parent, name)
    setattr(parent, name, _Fixed(output))
    try:
        yield
    finally:
        setattr(parent, name, original)


class _LastPosition(nn.Module):
    """Runs the wrapped module on the last position only; other positions get zeros."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, hidden: torch.Tensor) -> Any:
        out = torch.zeros_like(hidden)
        last = self.inner(hidden[:, -1:])
        out[:, -1:] = hidden_of(last)
        # GPT-OSS's MLP returns its router scores too; the layer discards them.
        return (out, *last[1:]) if isinstance(last, tuple) else out


@contextmanager
def last_position_only(parent: nn.Module, name: str) -> Iterator[None]:
    """While active, `parent.<name>` (a position-wise module: the MLP) computes only index -1.

    For the layer a last-token readout reads, nothing else of its MLP output is ever used.
    """
    original = getattr(parent, name)
    setattr(parent, name, _LastPosition(original))
    try:
        yield
    finally:
        setattr(parent, name, original)


def logits_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's logits from last-layer states: its final norm, LM head and the family's logit
    transforms (Gemma 2 soft-capping), all named by its `components` table."""
    shape = model_shape(model)
    hidden = model.get_submodule(shape.family.final_norm)(hidden)
    logits = model.get_submodule(shape.family.unembedding)(hidden)
    return shape.transform_logits(logits)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@contextmanager
def writer_inputs(
    site: nn.Module, shape: ModelShape, unit: Unit, record: Callable[[torch.Tensor], None]
) -> Iterator[None]:
    """While active, every forward of `site` (a layer's attention or MLP module) passes the
    input of `unit`'s writer (`ModelShape.writer`) to `record`: per-head outputs `[B, T, H*hd]`
    (o_proj) or neuron activations `[B, T, I]` (down_proj; a mixture of experts' MLP runs
    decomposed for it, `scoring.moe`)."""
    if unit == "neuron" and shape.num_experts:
        with decomposed(site, shape, record):
            yield
        return

    def hook(module: nn.Module, args: tuple) -> None:
        record(args[0])

    handle = site.get_submodule(shape.writer(unit).module).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def recording_site_inputs(
    model: nn.Module, stop: int, found: dict[tuple[int, str], torch.Tensor], grad: bool = False
) -> Iterator[None]:
    """While active, forwards store the inputs of the writer roles (`ModelShape.writer`: o_proj,
    down_proj) of layers `0..stop`.

    Keys are `(layer, "o")` `[B, T, H*head_dim]` (per-head outputs) and `(layer, "down")`
    `[B, T, I]` (neuron activations), by the writer's part. With `grad`, the embeddings require
    grad so these inputs join the autograd graph even when no parameter does.
    """
    shape = model_shape(model)
    with ExitStack() as stack:
        for layer in range(stop + 1):
            for unit in ("head", "neuron"):
                key = (layer, shape.writer(unit).part)
                site = model.get_submodule(shape.site_path(layer, unit))
                stack.enter_context(
                    writer_inputs(site, shape, unit, partial(found.__setitem__, key))
                )
        if grad:
            handle = model.get_input_embeddings().register_forward_hook(
                lambda mod, args, out: out.detach().requires_grad_(True)
            )
            stack.callback(handle.remove)
        yield


@torch.no_grad()
def site_inputs(
    model: nn.Module, batch: TokenBatch, stop: int
) -> dict[tuple[int, str], torch.Tensor]:
    """Writer inputs of layers `0..stop` in one forward (see recording_site_inputs)."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    with recording_site_inputs(model, stop, found):
        forward_to(model, batch, stop)
    return found
