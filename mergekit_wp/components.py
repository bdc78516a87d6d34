"""Architecture knowledge: heads, KV groups, MLP neurons and the slices of each HF tensor.

This is the only module that knows how a decoder's stored weights split into components
(docs/method.md §1). Scoring, the analyses and the `wp` merge method all ask it; none re-derive it.
PyTorch `nn.Linear.weight` is `[out, in]`: a head owns *rows* of `q_proj` and *columns* of
`o_proj`; a neuron owns rows of `gate_proj`/`up_proj` and a column of `down_proj`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Literal

Unit = Literal["head", "kv_group", "neuron"]
TensorGroupName = Literal["component", "kv", "embedding", "unembedding", "other"]


@dataclass(frozen=True)
class TensorRole:
    """How one per-layer HF tensor splits into units: which unit, along which axis."""

    module: str  # "self_attn.q_proj"
    unit: Unit
    axis: int  # axis of the stored tensor that indexes units
    part: str  # score-map part name: q, o, k, v, gate, up, down


@dataclass(frozen=True)
class ArchitectureFamily:
    """A small table per family: the HF `architectures` entries and its per-layer tensors."""

    name: str
    architectures: tuple[str, ...]
    layers_prefix: str = "model.layers"
    attention: str = "self_attn"
    mlp: str = "mlp"
    embedding: str = "model.embed_tokens"  # rows indexed by token id, like the unembedding's
    unembedding: str = "lm_head"


_ATTENTION_ROLES = (
    TensorRole("q_proj", "head", 0, "q"),
    TensorRole("o_proj", "head", 1, "o"),
    TensorRole("k_proj", "kv_group", 0, "k"),
    TensorRole("v_proj", "kv_group", 0, "v"),
)
_MLP_ROLES = (
    TensorRole("gate_proj", "neuron", 0, "gate"),
    TensorRole("up_proj", "neuron", 0, "up"),
    TensorRole("down_proj", "neuron", 1, "down"),
)

FAMILIES: tuple[ArchitectureFamily, ...] = (
    ArchitectureFamily("llama", ("LlamaForCausalLM",)),
    ArchitectureFamily("mistral", ("MistralForCausalLM",)),
    ArchitectureFamily("qwen2", ("Qwen2ForCausalLM",)),
    ArchitectureFamily("gemma2", ("Gemma2ForCausalLM",)),
)

HEAD_PARTS = ("q", "o")
NEURON_PARTS = ("gate", "up", "down")


class UnsupportedArchitectureError(ValueError):
    """The model's `architectures` entry has no component table here."""


def family_of(architecture: str) -> ArchitectureFamily:
    for family in FAMILIES:
        if architecture in family.architectures:
            return family
    supported = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise UnsupportedArchitectureError(
        f"architecture {architecture!r} is not supported by mergekit-wp components; "
        f"supported: {supported}"
    )


@dataclass(frozen=True)
class WeightInfo:
    """What a stored tensor name means: its layer, module, parameter kind and role."""

    name: str
    layer: int | None
    module: str | None  # "self_attn.q_proj", "mlp.down_proj", "input_layernorm", ...
    param: str  # "weight" or "bias"
    role: TensorRole | None  # None: not split into components (norms, embeddings, lm_head)


@dataclass(frozen=True)
class Component:
    """One candidate component: head H(l,h) or neuron N(l,j)."""

    kind: Literal["head", "neuron"]
    layer: int
    index: int

    def __str__(self) -> str:
        return f"{'H' if self.kind == 'head' else 'N'}({self.layer},{self.index})"


@dataclass(frozen=True)
class ModelShape:
    """Component dimensions of one model, read from its HF config."""

    family: ArchitectureFamily
    architecture: str
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Build from a transformers `PretrainedConfig` or a plain config dict."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        architectures = get("architectures") or []
        if not architectures:
            raise UnsupportedArchitectureError(
                "model config has no `architectures` entry; cannot tell its components apart"
            )
        architecture = architectures[0]
        family = family_of(architecture)
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        kv_heads = int(get("num_key_value_heads") or heads)
        head_dim = get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ValueError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
            )
        return cls(
            family=family,
            architecture=architecture,
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
        )

    # --- compatibility -------------------------------------------------------------------
    def check_compatible(self, other: ModelShape, mine: str, theirs: str, why: str) -> None:
        """Raise ValueError unless `other` splits into the same components as this model.

        `mine` / `theirs` name the two models in the message, `why` says who needs them equal.
        The vocabulary may differ (added tokens are aligned to the base's rows); the family
        follows the architecture.
        """
        for field in fields(ModelShape):
            if field.name in ("vocab_size", "family"):
                continue
            if getattr(self, field.name) != getattr(other, field.name):
                raise ValueError(
                    f"{theirs} has {field.name}={getattr(other, field.name)}, but {mine} has "
                    f"{field.name}={getattr(self, field.name)}; {why}"
                )

    # --- units -------------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def group_of_head(self, head: int) -> int:
        return head // self.heads_per_group

    def heads_of_group(self, group: int) -> range:
        return range(group * self.heads_per_group, (group + 1) * self.heads_per_group)

    def unit_count(self, unit: Unit) -> int:
        return {
            "head": self.num_attention_heads,
            "kv_group": self.num_key_value_heads,
            "neuron": self.intermediate_size,
        }[unit]

    def unit_width(self, unit: Unit) -> int:
        """Rows (or columns) of a tensor that one unit owns."""
        return 1 if unit == "neuron" else self.head_dim

    def components(self, kind: Literal["head", "neuron"] | None = None) -> Iterator[Component]:
        for layer in range(self.num_hidden_layers):
            if kind in (None, "head"):
                for h in range(self.num_attention_heads):
                    yield Component("head", layer, h)
            if kind in (None, "neuron"):
                for j in range(self.intermediate_size):
                    yield Component("neuron", layer, j)

    # --- names ---------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"{self.family.layers_prefix}.{layer}"

    def attention_path(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}.{self.family.attention}"

    def mlp_path(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}.{self.family.mlp}"

    def module_path(self, layer: int, role: TensorRole) -> str:
        """HF module path of a role's linear layer, e.g. `model.layers.3.self_attn.q_proj`."""
        parent = self.attention_path(layer) if role in _ATTENTION_ROLES else self.mlp_path(layer)
        return f"{parent}.{role.module}"

    def parse(self, name: str) -> WeightInfo:
        """Layer, module, parameter kind and role of a stored tensor name."""
        match = re.fullmatch(
            rf"{re.escape(self.family.layers_prefix)}\.(\d+)\.(.+)\.(weight|bias)", name
        )
        if not match:
            param = name.rsplit(".", 1)[-1]
            return WeightInfo(name, None, None, param, None)
        layer, module, param = int(match[1]), match[2], match[3]
        role = None
        for candidate in _ATTENTION_ROLES:
            if module == f"{self.family.attention}.{candidate.module}":
                role = candidate
        for candidate in _MLP_ROLES:
            if module == f"{self.family.mlp}.{candidate.module}":
                role = candidate
        if role is not None and param == "bias" and role.axis != 0:
            role = None  # o_proj / down_proj biases are shared by all units of the layer
        return WeightInfo(name, layer, module, param, role)

    def tensor_group(self, name: str) -> TensorGroupName:
        """Which Θ a stored tensor belongs to: head / neuron slices, a KV group's, or none.

        Of the tensors no component owns, `embedding` and `unembedding` (`lm_head`) have one row
        per token; `other` are the norms and shared o/down biases.
        """
        role = self.parse(name).role
        if role is not None:
            return "kv" if role.unit == "kv_group" else "component"
        module = name.rsplit(".", 1)[0]
        return {self.family.embedding: "embedding", self.family.unembedding: "unembedding"}.get(module, "other")

    def unit_slice(self, role: TensorRole, index: int, ndim: int) -> tuple[slice, ...]:
        """Index expression selecting unit `index` of a tensor with this role."""
        width = self.unit_width(role.unit)
        sl = [slice(None)] * ndim
        sl[role.axis if ndim > 1 else 0] = slice(index * width, (index + 1) * width)
        return tuple(sl)

    def roles(self, unit: Unit | None = None) -> tuple[TensorRole, ...]:
        return tuple(r for r in _ATTENTION_ROLES + _MLP_ROLES if unit is None or r.unit == unit)

    def slices(self, component: Component, params: tuple[str, ...] = ("weight", "bias")) -> dict[
        str, tuple[slice, ...]
    ]:
        """Θ(c): tensor name -> index expression for every stored slice that component owns.

        Biases are listed for every role whose bias is per-unit (q_proj for heads); callers
        skip names their checkpoint lacks (Llama has no q bias, Qwen2 has one).
        """
        unit: Unit = "head" if component.kind == "head" else "neuron"
        out: dict[str, tuple[slice, ...]] = {}
        for role in self.roles(unit):
            for param in params:
                if param == "bias" and role.axis != 0:
                    continue
                ndim = 2 if param == "weight" else 1
                name = f"{self.module_path(component.layer, role)}.{param}"
                out[name] = self.unit_slice(role, component.index, ndim)
        return out

    def unit_index(self, unit: Unit, units: Any) -> Any:
        """Indices along a role's unit axis owned by `units` (in order): `head_dim` each for heads."""
        import torch

        width = self.unit_width(unit)
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
        return (units * width + torch.arange(width)).reshape(-1)

    def unit_weights_for(self, role: TensorRole, unit_scores: Any) -> Any:
        """Expand per-unit values `[..., units]` to per-row/column values of the tensor axis.

        Heads and KV groups own `head_dim` consecutive rows; a neuron owns one.
        """
        return unit_scores.repeat_interleave(self.unit_width(role.unit), dim=-1)


def load_shape(model_path_or_config: Any) -> ModelShape:
    """ModelShape from a folder / hub id (via transformers' AutoConfig) or a config object."""
    if isinstance(model_path_or_config, (str, bytes)) or hasattr(model_path_or_config, "__fspath__"):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_path_or_config))
        return ModelShape.from_config(config)
    return ModelShape.from_config(model_path_or_config)
