"""Score map format, version 1: per-component scores of one expert, as safetensors.

Keys are `components.score_key`: the Llama-style module path of layer l's heads or neurons, plus
`.q`, `.gate`, ... for optional parts; header metadata says what made the map. In memory the
layers are stacked: `[layers, units]`.
"""

from __future__ import annotations

import json
import operator
import os
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
VERSION = "1"
METHODS = ("wp", "wp_attr", "ap", "ap_attr", "link", "random", "drift")
UTILITIES = ("anchor", "kl", "projection", "none")
_SHAPE_KEYS = (
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


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
    def zeros(cls, shape: ModelShape, **info: Any) -> ScoreMap:
        return cls(
            heads=torch.zeros(shape.num_hidden_layers, shape.num_attention_heads),
            neurons=torch.zeros(shape.num_hidden_layers, shape.intermediate_size),
            num_key_value_heads=shape.num_key_value_heads,
            **info,
        )

    @classmethod
    def from_parts(cls, shape: ModelShape, parts: dict[str, torch.Tensor], **info: Any) -> ScoreMap:
        """A map whose unit scores are the sums of their parts: heads = q + o, neurons = gate +
        up + down (docs/method.md §4: a unit's score adds over the tensors it owns).

        The sums are taken in the parts' dtype (fp64 accumulators) before the map's fp32.
        """
        heads, neurons = unit_scores(parts)
        return cls(
            heads=heads.float(),
            neurons=neurons.float(),
            num_key_value_heads=shape.num_key_value_heads,
            parts={p: v.float() for p, v in parts.items()},
            **info,
        )

    def shape_metadata(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in _SHAPE_KEYS}

    def check_shape(self, shape: ModelShape, source: str = "score map") -> None:
        """Raise ScoreMapError unless this map was made for a model of `shape`."""
        for key in _SHAPE_KEYS:
            have, want = getattr(self, key), getattr(shape, key)
            if have != want:
                raise ScoreMapError(
                    f"{source}: made for a model with {key}={have}, but the model has "
                    f"{key}={want}; score the expert against this model family again"
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


def _part_key(part: str, layer: int) -> str:
    return score_key(part_kind(part), layer, part)


def write_score_map(path: str | os.PathLike, scores: ScoreMap) -> Path:
    """Validate and write atomically: a temp file in the same folder, then rename."""
    path = Path(path)
    _validate_tensors(str(path), scores)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(scores.num_hidden_layers):
        tensors[head_key(layer)] = scores.heads[layer]
        tensors[neuron_key(layer)] = scores.neurons[layer]
        for part, values in scores.parts.items():
            tensors[_part_key(part, layer)] = values[layer]
    tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "version": VERSION,
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
        if meta.get("version") != VERSION:
            raise ScoreMapError(
                f"score map {source}: version {meta.get('version')!r} is not supported "
                f"(this mergekit-wp reads version {VERSION})"
            )
        dims = {}
        for key in _SHAPE_KEYS:
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

        def load(key: str, length: int) -> torch.Tensor:
            if key not in keys:
                raise ScoreMapError(
                    f"score map {source}: missing tensor {key!r} (expected [{length}])"
                )
            value = f.get_tensor(key)
            if tuple(value.shape) != (length,):
                raise ScoreMapError(
                    f"score map {source}: tensor {key!r} has shape {list(value.shape)}, "
                    f"expected [{length}]"
                )
            return value.to(torch.float32)

        heads_n, neurons_n = dims["num_attention_heads"], dims["intermediate_size"]
        heads = torch.stack([load(head_key(layer), heads_n) for layer in range(layers)])
        neurons = torch.stack([load(neuron_key(layer), neurons_n) for layer in range(layers)])
        parts = {}
        for part in HEAD_PARTS + NEURON_PARTS:
            if _part_key(part, 0) in keys:
                n = heads_n if part in HEAD_PARTS else neurons_n
                parts[part] = torch.stack([load(_part_key(part, l), n) for l in range(layers)])
        known = {head_key(l) for l in range(layers)} | {neuron_key(l) for l in range(layers)}
        known |= {_part_key(p, l) for p in parts for l in range(layers)}
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
    named = [("heads", scores.heads, head_key), ("neurons", scores.neurons, neuron_key)]
    for part, values in scores.parts.items():
        named.append((f"part {part}", values, lambda layer, p=part: _part_key(p, layer)))
    for name, values, key_of in named:
        bad = ~torch.isfinite(values)
        if bad.any():
            layer, index = (int(i) for i in bad.nonzero()[0])
            raise ScoreMapError(
                f"score map {source}: {name} has a non-finite value "
                f"({values[layer, index].item()}) at {key_of(layer)}[{index}]; "
                "scores must be finite"
            )
