"""Score map format, versions 1 and 2: per-component scores of one expert, as safetensors.

Keys are `components.score_key`: the Llama-style module path of layer l's heads or neurons, plus
`.q`, `.gate`, ... for optional parts; header metadata says what made the map. In memory the
layers are stacked: `[layers, units]`.

Version 2 adds the expert axis of a mixture of experts: a layer's routed experts' neurons are
one tensor `model.layers.{l}.mlp.experts.neurons` `[experts, expert neurons]`, a shared
expert's (Qwen2-MoE) `model.layers.{l}.mlp.shared_expert.neurons`; metadata adds `num_experts`
and `expert_intermediate_size`. In memory they stay one neuron axis (`components`: experts' in
order, then the shared expert's). A map without experts is written as version 1, byte for byte
as before; both versions are read.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergekit_wp.components import HEAD_PARTS, NEURON_PARTS, ModelShape, part_kind, score_key
from mergekit_wp.io import atomic_file

FORMAT = "mergekit-wp/score-map"
VERSION = "1"  # a dense model's map
EXPERTS_VERSION = "2"  # a map with the expert axis
METHODS = ("wp", "wp_attr", "ap", "ap_attr", "link", "random", "drift")
UTILITIES = ("anchor", "kl", "projection", "none")
_SHAPE_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
_EXPERT_KEYS = ("num_experts", "expert_intermediate_size")  # version 2 only


class ScoreMapError(ValueError):
    """A score map that cannot be used as asked; the message names file, key and expectation."""


@dataclass
class ScoreMap:
    """Scores of one expert: heads `[L, H]`, neurons `[L, I]`, optional parts of each."""

    heads: torch.Tensor
    neurons: torch.Tensor
    method: str
    utility: str
    base_model: str
    model: str
    num_key_value_heads: int
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # "q","o","gate","up","down"
    details: dict[str, Any] = field(default_factory=dict)
    num_experts: int = 0  # routed experts per layer: neurons are theirs first (0: dense)
    expert_intermediate_size: int = 0

    @property
    def num_hidden_layers(self) -> int:
        return self.heads.shape[0]

    @property
    def num_attention_heads(self) -> int:
        return self.heads.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.neurons.shape[1]

    @classmethod
    def of(cls, shape: ModelShape, heads: torch.Tensor, neurons: torch.Tensor, **info: Any):
        """A map of a model of `shape`: its KV heads and experts recorded with the scores."""
        return cls(
            heads=heads,
            neurons=neurons,
            num_key_value_heads=shape.num_key_value_heads,
            num_experts=shape.num_experts,
            expert_intermediate_size=shape.expert_intermediate_size,
            **info,
        )

    @classmethod
    def zeros(cls, shape: ModelShape, **info: Any) -> ScoreMap:
        layers = shape.num_hidden_layers
        heads, neurons = shape.num_attention_heads, shape.intermediate_size
        return cls.of(shape, torch.zeros(layers, heads), torch.zeros(layers, neurons), **info)

    @classmethod
    def from_parts(cls, shape: ModelShape, parts: dict[str, torch.Tensor], **info: Any) -> ScoreMap:
        """A map whose unit scores are the sums of their parts: heads = q + o, neurons = gate +
        up + down (docs/method.md §4: a unit's score adds over the tensors it owns).

        The sums are taken in the parts' dtype (fp64 accumulators) before the map's fp32.
        """
        heads, neurons = unit_scores(parts)
        parts = {p: v.float() for p, v in parts.items()}
        return cls.of(shape, heads.float(), neurons.float(), parts=parts, **info)

    @property
    def version(self) -> str:
        """The file format version that holds this map: 2 only where it has experts."""
        return EXPERTS_VERSION if self.num_experts else VERSION

    def shape_metadata(self) -> dict[str, int]:
        keys = _SHAPE_KEYS + (_EXPERT_KEYS if self.num_experts else ())
        return {k: int(getattr(self, k)) for k in keys}

    def check_shape(self, shape: ModelShape, source: str = "score map") -> None:
        """Raise ScoreMapError unless this map was made for a model of `shape`."""
        for key in _SHAPE_KEYS + _EXPERT_KEYS:
            have, want = getattr(self, key), getattr(shape, key)
            if have != want:
                raise ScoreMapError(
                    f"{source}: made for a model with {key}={have}, but the model has "
                    f"{key}={want}; score the expert against this model family again"
                )


NeuronBlock = tuple[Callable[[int], str], slice, tuple[int, ...]]


def neuron_blocks(num_experts: int, expert_size: int, neurons: int) -> list[NeuronBlock]:
    """(key of layer l, slice of a layer's neuron axis, stored shape) of each neuron tensor of a
    layer: one for a dense MLP (v1); routed experts `[E, I]`, then a shared expert's (v2)."""
    if not num_experts:
        return [(neuron_key, slice(0, neurons), (neurons,))]
    routed = num_experts * expert_size
    blocks: list[NeuronBlock] = [
        ("model.layers.{}.mlp.experts.neurons".format, slice(0, routed), (num_experts, expert_size))
    ]
    if neurons > routed:
        shared = "model.layers.{}.mlp.shared_expert.neurons".format
        blocks.append((shared, slice(routed, neurons), (neurons - routed,)))
    return blocks


def _blocks(scores: ScoreMap) -> list[NeuronBlock]:
    return neuron_blocks(
        scores.num_experts, scores.expert_intermediate_size, scores.intermediate_size
    )


def unit_scores(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, neurons) from part scores, left to right in the parts' dtype: q + o, gate + up +
    down."""
    heads, neurons = (
        reduce(operator.add, (parts[p] for p in names)) for names in (HEAD_PARTS, NEURON_PARTS)
    )
    return heads, neurons


def head_key(layer: int) -> str:
    return score_key("head", layer)


def neuron_key(layer: int) -> str:
    return score_key("neuron", layer)


def _part_key(part: str, layer: int, key_of: Callable[[int], str] | None = None) -> str:
    """Key of a part: `<heads key>.q`, `<neurons key>.gate` (a v2 neuron block's: `key_of`)."""
    return f"{key_of(layer)}.{part}" if key_of else score_key(part_kind(part), layer, part)


def _map_tensors(scores: ScoreMap) -> dict[str, torch.Tensor]:
    """Every stored tensor of a map, by key, in the order they are written."""
    tensors: dict[str, torch.Tensor] = {}
    blocks = _blocks(scores)
    for layer in range(scores.num_hidden_layers):
        tensors[head_key(layer)] = scores.heads[layer]
        for key_of, span, shape in blocks:
            tensors[key_of(layer)] = scores.neurons[layer, span].reshape(shape)
        for part, values in scores.parts.items():
            if part in HEAD_PARTS:
                tensors[_part_key(part, layer)] = values[layer]
                continue
            for key_of, span, shape in blocks:
                tensors[_part_key(part, layer, key_of)] = values[layer, span].reshape(shape)
    return tensors


def write_score_map(path: str | os.PathLike, scores: ScoreMap) -> Path:
    """Validate and write atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    _validate_tensors(str(path), scores)
    tensors = {
        k: v.detach().to(torch.float32).contiguous().cpu() for k, v in _map_tensors(scores).items()
    }
    metadata = {
        "format": FORMAT,
        "version": scores.version,
        "method": scores.method,
        "utility": scores.utility,
        "base_model": scores.base_model,
        "model": scores.model,
        "details": json.dumps(scores.details, sort_keys=True, default=str),
        **{k: str(v) for k, v in scores.shape_metadata().items()},
    }

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)
        Path(tmp).write_bytes(_canonical(Path(tmp).read_bytes()))

    return atomic_file(path, write)


def _canonical(blob: bytes) -> bytes:
    """Sort the safetensors header: its metadata comes out in hash order, so equal maps would
    otherwise give different bytes."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size :]


def read_score_map(path: str | os.PathLike, shape: ModelShape | None = None) -> ScoreMap:
    """Read and validate; with `shape`, also check the map fits that model."""
    source = str(path)
    if not Path(path).is_file():
        raise ScoreMapError(f"score map {source}: file not found")
    try:
        handle = safe_open(source, framework="pt")
    except Exception as err:  # safetensors raises several types for a corrupt header
        raise ScoreMapError(f"score map {source}: not a safetensors file ({err})") from err
    with handle as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ScoreMapError(
                f"score map {source}: metadata format is {meta.get('format')!r}, "
                f"expected {FORMAT!r}"
            )
        version = meta.get("version")
        if version not in (VERSION, EXPERTS_VERSION):
            raise ScoreMapError(
                f"score map {source}: version {version!r} is not supported "
                f"(this mergekit-wp reads versions {VERSION} and {EXPERTS_VERSION})"
            )
        dims = {k: 0 for k in _EXPERT_KEYS}
        for key in _SHAPE_KEYS + (_EXPERT_KEYS if version == EXPERTS_VERSION else ()):
            try:
                dims[key] = int(meta[key])
            except (KeyError, ValueError):
                raise ScoreMapError(
                    f"score map {source}: metadata {key!r} missing or not an integer"
                ) from None
        keys = set(f.keys())
        layers = dims["num_hidden_layers"]
        if layers < 1:
            raise ScoreMapError(
                f"score map {source}: metadata num_hidden_layers must be at least 1"
            )

        def load(key: str, shape: tuple[int, ...]) -> torch.Tensor:
            if key not in keys:
                raise ScoreMapError(
                    f"score map {source}: missing tensor {key!r} (expected {list(shape)})"
                )
            value = f.get_tensor(key)
            if tuple(value.shape) != shape:
                raise ScoreMapError(
                    f"score map {source}: tensor {key!r} has shape {list(value.shape)}, "
                    f"expected {list(shape)}"
                )
            return value.to(torch.float32).reshape(-1)

        heads_n, neurons_n = dims["num_attention_heads"], dims["intermediate_size"]
        blocks = neuron_blocks(dims["num_experts"], dims["expert_intermediate_size"], neurons_n)
        if blocks[-1][1].stop != neurons_n:
            raise ScoreMapError(
                f"score map {source}: metadata num_experts x expert_intermediate_size exceeds "
                f"intermediate_size={neurons_n}"
            )

        def load_neurons(part: str | None) -> torch.Tensor:
            """`[L, N]` from each layer's neuron tensors (v2: experts', then the shared's)."""
            per_layer = (
                [load(_part_key(part, l, k) if part else k(l), shape) for k, _, shape in blocks]
                for l in range(layers)
            )
            return torch.stack([torch.cat(tensors) for tensors in per_layer])

        heads = torch.stack([load(head_key(layer), (heads_n,)) for layer in range(layers)])
        neurons = load_neurons(None)
        parts = {}
        for part in HEAD_PARTS:
            if _part_key(part, 0) in keys:
                parts[part] = torch.stack(
                    [load(_part_key(part, l), (heads_n,)) for l in range(layers)]
                )
        for part in NEURON_PARTS:
            if _part_key(part, 0, blocks[0][0]) in keys:
                parts[part] = load_neurons(part)
        known = {head_key(l) for l in range(layers)}
        known |= {k(l) for k, _, _ in blocks for l in range(layers)}
        known |= {_part_key(p, l) for p in parts if p in HEAD_PARTS for l in range(layers)}
        known |= {
            _part_key(p, l, k)
            for p in parts
            if p in NEURON_PARTS
            for k, _, _ in blocks
            for l in range(layers)
        }
        extra = sorted(keys - known)
        if extra:
            raise ScoreMapError(
                f"score map {source}: unexpected tensor {extra[0]!r} for a map with {layers} layers"
            )
    try:
        details = json.loads(meta.get("details") or "{}")
    except json.JSONDecodeError as err:
        raise ScoreMapError(f"score map {source}: metadata 'details' is not JSON ({err})") from err
    scores = ScoreMap(
        heads=heads,
        neurons=neurons,
        method=meta.get("method", ""),
        utility=meta.get("utility", ""),
        base_model=meta.get("base_model", ""),
        model=meta.get("model", ""),
        num_key_value_heads=dims["num_key_value_heads"],
        parts=parts,
        details=details,
        num_experts=dims["num_experts"],
        expert_intermediate_size=dims["expert_intermediate_size"],
    )
    _validate_tensors(source, scores)
    if shape is not None:
        scores.check_shape(shape, f"score map {source}")
    return scores


def _validate_tensors(source: str, scores: ScoreMap) -> None:
    if scores.heads.dim() != 2 or scores.neurons.dim() != 2:
        raise ScoreMapError(
            f"score map {source}: heads and neurons must be [layers, units]; got "
            f"{list(scores.heads.shape)} and {list(scores.neurons.shape)}"
        )
    layers, heads = scores.heads.shape
    if scores.neurons.shape[0] != layers:
        raise ScoreMapError(
            f"score map {source}: heads cover {layers} layers but neurons cover "
            f"{scores.neurons.shape[0]}"
        )
    if heads % scores.num_key_value_heads:
        raise ScoreMapError(
            f"score map {source}: {heads} heads is not a multiple of "
            f"num_key_value_heads={scores.num_key_value_heads}"
        )
    for part, values in scores.parts.items():
        if part not in HEAD_PARTS + NEURON_PARTS:
            raise ScoreMapError(f"score map {source}: unknown part {part!r}")
        want = scores.heads.shape if part in HEAD_PARTS else scores.neurons.shape
        if values.shape != want:
            raise ScoreMapError(
                f"score map {source}: part {part!r} has shape {list(values.shape)}, "
                f"expected {list(want)}"
            )
    if scores.num_experts * scores.expert_intermediate_size > scores.intermediate_size:
        raise ScoreMapError(
            f"score map {source}: {scores.num_experts} experts x "
            f"{scores.expert_intermediate_size} neurons exceed the {scores.intermediate_size} "
            "neurons per layer"
        )
    named: list[tuple[str, torch.Tensor, str | None]] = [
        ("heads", scores.heads, None),
        ("neurons", scores.neurons, None),
    ]
    named += [(f"part {part}", values, part) for part, values in scores.parts.items()]
    for name, values, part in named:
        bad = ~torch.isfinite(values)
        if bad.any():
            layer, index = (int(i) for i in bad.nonzero()[0])
            raise ScoreMapError(
                f"score map {source}: {name} has a non-finite value "
                f"({values[layer, index].item()}) at {_where(scores, name, part, layer, index)}; "
                "scores must be finite"
            )


def _where(scores: ScoreMap, name: str, part: str | None, layer: int, index: int) -> str:
    """Stored key and index of one score: `...self_attn.heads[3]`, `...experts.neurons[1, 4]`."""
    if name == "heads" or part in HEAD_PARTS:
        return f"{_part_key(part, layer) if part else head_key(layer)}[{index}]"
    for key_of, span, shape in _blocks(scores):
        if span.start <= index < span.stop:
            at = divmod(index - span.start, shape[-1]) if len(shape) == 2 else (index - span.start,)
            key = _part_key(part, layer, key_of) if part else key_of(layer)
            return f"{key}[{', '.join(map(str, at))}]"
    raise AssertionError("unreachable: neuron_blocks cover the neuron axis")
