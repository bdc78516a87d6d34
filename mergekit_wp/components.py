"""Architecture knowledge: heads, KV groups, MLP neurons and the slices of each HF tensor.

This is the only module that knows how a decoder's stored weights split into components
(docs/method.md §1), where its modules live and how its logits are made. Scoring, the analyses
and the `wp` merge method all ask it; none re-derive it. Each family is data, one table per file
in `mergekit_wp/_data/architectures/` (as mergekit's `_data/architectures/*.json`): adding a
family that is built like these means adding a table.

Glossary (the names used across the package):
- unit: what one score belongs to. `head` (attention head h of layer l, H(l,h)), `kv_group`
  (the K/V heads a group of query heads shares; averaged, never scored) and `neuron` (MLP
  neuron j of layer l, N(l,j)). A *component* is a scored unit: a head or a neuron.
- part: a unit's share of one projection, named after it: q, o (heads), k, v (KV groups),
  gate, up, down (neurons). Score maps keep the head and neuron parts.
- role: how one per-layer HF tensor splits into units: its module, unit, the axis that indexes
  units, its part, whether its bias is per unit or shared by the layer, and whether it writes
  the unit's output into the residual stream (o, down). A fused tensor (Phi-3's `qkv_proj`,
  `gate_up_proj`) has one role per block of rows; a block starts after the blocks of the units
  its role names in `after`. A role may be a norm's weight split per unit (OLMo 2's `q_norm`
  `[H*head_dim]`, part q), whose statistics span every unit (`spans_units`).
- site: the module holding a unit's roles (`self_attn` for heads and KV groups, `mlp` for
  neurons); its output is what a unit changes.
- tensor group: which set a stored tensor falls in: `component` (head / neuron slices), `kv`,
  `embedding`, `unembedding` (one row per token) or `other` (norms, shared biases).

PyTorch `nn.Linear.weight` is `[out, in]`: a head owns *rows* of `q_proj` and *columns* of
`o_proj`; a neuron owns rows of `gate_proj`/`up_proj` and a column of `down_proj`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, fields
from importlib import resources
from typing import Any, Literal, get_args

Unit = Literal["head", "kv_group", "neuron"]
ComponentKind = Literal["head", "neuron"]
Site = Literal["attention", "mlp"]
TensorGroupName = Literal["component", "kv", "embedding", "unembedding", "other"]
LogitOp = Literal["multiply", "divide", "softcap"]

# Score-map parts (file format v1) and the map keys they are stored under. The keys are spelled
# like Llama's module paths for every family, so a map reads the same whatever the model calls
# its modules.
HEAD_PARTS = ("q", "o")
NEURON_PARTS = ("gate", "up", "down")
_SCORE_KEYS = {
    "head": "model.layers.{layer}.self_attn.heads",
    "neuron": "model.layers.{layer}.mlp.neurons",
}


def score_key(kind: ComponentKind, layer: int, part: str | None = None) -> str:
    """Score-map key of layer `layer`'s heads or neurons, or of one part of them."""
    return _SCORE_KEYS[kind].format(layer=layer) + (f".{part}" if part else "")


def part_kind(part: str) -> ComponentKind:
    """The component kind a score-map part belongs to."""
    return "head" if part in HEAD_PARTS else "neuron"


@dataclass(frozen=True)
class TensorRole:
    """How one per-layer HF tensor splits into units: which unit, along which axis."""

    module: str  # "q_proj", under the role's site
    site: Site
    unit: Unit
    axis: int  # axis of the stored tensor that indexes units
    part: str  # score-map part name: q, o, k, v, gate, up, down
    unit_bias: bool  # its bias splits like its rows (q_proj); else the layer shares it (o_proj)
    writes_residual: bool = False  # its input is the units' outputs (o_proj, down_proj)
    # Units whose blocks come first in a fused tensor: Phi-3's qkv_proj holds q rows, then k
    # (after ["head"]), then v (after ["head", "kv_group"]).
    after: tuple[Unit, ...] = ()
    # The weight of a norm over all of the layer's units at once (OLMo 2's q_norm [H*hd]): it
    # splits per unit, but one unit's read rows change every unit's normalised input.
    spans_units: bool = False


@dataclass(frozen=True)
class ArchitectureFamily:
    """One family's table: HF `architectures` entries, module paths, roles and logit transforms."""

    name: str
    architectures: tuple[str, ...]
    layers_prefix: str
    attention: str
    mlp: str
    embedding: str  # rows indexed by token id, like the unembedding's
    unembedding: str
    final_norm: str
    logits: tuple[tuple[LogitOp, str], ...]  # (op, config key), applied in order after the LM head
    attn_implementation: str  # what scoring loads it with unless told (Gemma 2 refuses sdpa)
    roles: tuple[TensorRole, ...]

    def site_module(self, site: Site) -> str:
        return self.attention if site == "attention" else self.mlp


_FAMILY_KEYS = {f.name for f in fields(ArchitectureFamily)}
_ROLE_REQUIRED = {"module", "site", "unit", "axis", "part", "bias"}  # "bias": "unit" or "shared"
_ROLE_KEYS = _ROLE_REQUIRED | {"writes_residual", "after", "spans_units"}


def _family_from_table(source: str, table: dict[str, Any]) -> ArchitectureFamily:
    """Validate one architecture table; errors name the file and the key."""

    def fail(what: str) -> ValueError:
        return ValueError(f"architecture table {source}: {what}")

    if set(table) != _FAMILY_KEYS:
        missing, extra = sorted(_FAMILY_KEYS - set(table)), sorted(set(table) - _FAMILY_KEYS)
        raise fail(f"keys must be {sorted(_FAMILY_KEYS)}; missing {missing}, unexpected {extra}")
    roles = []
    for i, raw in enumerate(table["roles"]):
        if not _ROLE_REQUIRED <= set(raw) <= _ROLE_KEYS:
            raise fail(
                f"roles[{i}] has keys {sorted(raw)}; expected {sorted(_ROLE_REQUIRED)} "
                f"and optionally {sorted(_ROLE_KEYS - _ROLE_REQUIRED)}"
            )
        if raw["site"] not in get_args(Site) or raw["unit"] not in get_args(Unit):
            raise fail(
                f"roles[{i}]: site must be one of {get_args(Site)}, unit one of {get_args(Unit)}"
            )
        if raw["bias"] not in ("unit", "shared") or raw["axis"] not in (0, 1):
            raise fail(f"roles[{i}]: bias must be 'unit' or 'shared' and axis 0 or 1")
        after = raw.get("after", [])
        if not isinstance(after, list) or not set(after) <= set(get_args(Unit)):
            raise fail(f"roles[{i}]: after must be a list of units out of {get_args(Unit)}")
        role = {k: v for k, v in raw.items() if k not in ("bias", "after")}
        roles.append(TensorRole(**role, unit_bias=raw["bias"] == "unit", after=tuple(after)))
    for module in dict.fromkeys((r.site, r.module) for r in roles):
        # A fused tensor's blocks follow each other: the n-th lists the n before it.
        blocks = sorted(
            (r for r in roles if (r.site, r.module) == module), key=lambda r: len(r.after)
        )
        for n, role in enumerate(blocks):
            if role.after != tuple(r.unit for r in blocks[:n]):
                raise fail(
                    f"roles of {module[1]}: block {n} ({role.part}) must have after "
                    f"{[r.unit for r in blocks[:n]]}, the units of the blocks before it; "
                    f"got {list(role.after)}"
                )
    for kind, parts in (("head", HEAD_PARTS), ("neuron", NEURON_PARTS)):
        have = tuple(dict.fromkeys(r.part for r in roles if r.unit == kind))
        writers = [r.part for r in roles if r.unit == kind and r.writes_residual]
        if have != parts or len(writers) != 1:
            raise fail(
                f"{kind} roles must have parts {parts} (score map format v1), exactly one "
                f"writing the residual stream; got parts {have}, writers {writers}"
            )
    logits = []
    for i, raw in enumerate(table["logits"]):
        if set(raw) != {"op", "config_key"} or raw["op"] not in get_args(LogitOp):
            raise fail(f"logits[{i}] must be {{op: one of {get_args(LogitOp)}, config_key: ...}}")
        logits.append((raw["op"], raw["config_key"]))
    return ArchitectureFamily(
        **{
            **table,
            "architectures": tuple(table["architectures"]),
            "roles": tuple(roles),
            "logits": tuple(logits),
        }
    )


def _load_families() -> tuple[ArchitectureFamily, ...]:
    """Every family table shipped in `mergekit_wp/_data/architectures/`, by file name."""
    folder = resources.files("mergekit_wp") / "_data" / "architectures"
    tables = sorted((f for f in folder.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    return tuple(
        _family_from_table(f"_data/architectures/{f.name}", json.loads(f.read_text()))
        for f in tables
    )


FAMILIES: tuple[ArchitectureFamily, ...] = _load_families()


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
    # One per block of rows (several in a fused tensor); none: not split into components
    # (norms, embeddings, lm_head).
    roles: tuple[TensorRole, ...]

    @property
    def role(self) -> TensorRole | None:
        """The role of the tensor's first (in an unfused tensor, its only) block."""
        return self.roles[0] if self.roles else None


@dataclass(frozen=True)
class Component:
    """One candidate component: head H(l,h) or neuron N(l,j)."""

    kind: ComponentKind
    layer: int
    index: int

    def __str__(self) -> str:
        """The label reports use: `H(l,h)` or `N(l,j)`."""
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
    # (op, value) of the family's logit transforms this config sets, e.g. (("softcap", 30.0),)
    logit_ops: tuple[tuple[LogitOp, float], ...] = ()

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
            # A key the config leaves unset (or 0: Gemma 2 without capping) is not applied.
            logit_ops=tuple((op, float(get(key))) for op, key in family.logits if get(key)),
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

    def components(self, kind: ComponentKind | None = None) -> Iterator[Component]:
        for layer in range(self.num_hidden_layers):
            if kind in (None, "head"):
                for h in range(self.num_attention_heads):
                    yield Component("head", layer, h)
            if kind in (None, "neuron"):
                for j in range(self.intermediate_size):
                    yield Component("neuron", layer, j)

    # --- names ---------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        """Module path of decoder layer `layer`, e.g. `model.layers.3`."""
        return f"{self.family.layers_prefix}.{layer}"

    def site(self, unit: Unit) -> str:
        """Name of the site module under a decoder layer holding `unit`'s roles (`self_attn`)."""
        return self.family.site_module(self.roles(unit)[0].site)

    def site_path(self, layer: int, unit: Unit) -> str:
        """Module path of `unit`'s site in layer `layer`, e.g. `model.layers.3.mlp`."""
        return f"{self.layer_prefix(layer)}.{self.site(unit)}"

    def module_path(self, layer: int, role: TensorRole) -> str:
        """HF module path of a role's linear layer, e.g. `model.layers.3.self_attn.q_proj`."""
        return f"{self.layer_prefix(layer)}.{self.family.site_module(role.site)}.{role.module}"

    def parse(self, name: str) -> WeightInfo:
        """Layer, module, parameter kind and role of a stored tensor name."""
        match = re.fullmatch(
            rf"{re.escape(self.family.layers_prefix)}\.(\d+)\.(.+)\.(weight|bias)", name
        )
        if not match:
            param = name.rsplit(".", 1)[-1]
            return WeightInfo(name, None, None, param, ())
        layer, module, param = int(match[1]), match[2], match[3]
        roles = tuple(
            sorted(
                (
                    r
                    for r in self.family.roles
                    if f"{self.family.site_module(r.site)}.{r.module}" == module
                ),
                key=self.role_offset,
            )
        )
        if param == "bias" and not all(r.unit_bias for r in roles):
            roles = ()  # o_proj / down_proj biases are shared by all units of the layer
        return WeightInfo(name, layer, module, param, roles)

    def tensor_group(self, name: str) -> TensorGroupName:
        """Which Θ a stored tensor belongs to: head / neuron slices, a KV group's, or none.

        Of the tensors no component owns, `embedding` and `unembedding` (`lm_head`) have one row
        per token; `other` are the norms and shared o/down biases. Of a fused tensor, the group
        of its first block (`tensor_blocks` gives each block's).
        """
        role = self.parse(name).role
        if role is not None:
            return _unit_group(role.unit)
        module = name.rsplit(".", 1)[0]
        return {self.family.embedding: "embedding", self.family.unembedding: "unembedding"}.get(
            module, "other"
        )

    def tensor_blocks(
        self, name: str, ndim: int
    ) -> tuple[tuple[TensorGroupName, tuple[slice, ...]], ...]:
        """(tensor group, index expression) of each block of a stored tensor: one per role of
        a fused tensor (Phi-3's qkv_proj: component, kv, kv), else the whole tensor's group."""
        roles = self.parse(name).roles
        if not roles:
            return ((self.tensor_group(name), (slice(None),) * ndim),)
        return tuple((_unit_group(r.unit), self.role_block(r, ndim)) for r in roles)

    def role_offset(self, role: TensorRole) -> int:
        """First row (or column) of a role's block: 0 unless its tensor is fused."""
        return sum(self.unit_count(u) * self.unit_width(u) for u in role.after)

    def _axis_slice(self, role: TensorRole, ndim: int, start: int, stop: int) -> tuple[slice, ...]:
        offset = self.role_offset(role)
        sl = [slice(None)] * ndim
        sl[role.axis if ndim > 1 else 0] = slice(offset + start, offset + stop)
        return tuple(sl)

    def role_block(self, role: TensorRole, ndim: int) -> tuple[slice, ...]:
        """Index expression selecting every unit of a role: the whole tensor unless fused."""
        return self._axis_slice(
            role, ndim, 0, self.unit_count(role.unit) * self.unit_width(role.unit)
        )

    def unit_slice(self, role: TensorRole, index: int, ndim: int) -> tuple[slice, ...]:
        """Index expression selecting unit `index` of a tensor with this role."""
        width = self.unit_width(role.unit)
        return self._axis_slice(role, ndim, index * width, (index + 1) * width)

    def roles(self, unit: Unit | None = None) -> tuple[TensorRole, ...]:
        return tuple(r for r in self.family.roles if unit is None or r.unit == unit)

    def role(self, part: str) -> TensorRole:
        """The role of a part name (q, o, k, v, gate, up, down); its first, a projection's,
        where a norm's weight shares the part (OLMo 2's q_norm)."""
        for role in self.family.roles:
            if role.part == part:
                return role
        raise ValueError(
            f"{self.family.name} has no part {part!r}; parts: "
            f"{', '.join(r.part for r in self.family.roles)}"
        )

    def writer(self, unit: Unit) -> TensorRole:
        """The role whose input is `unit`'s output and writes it to the residual stream."""
        return next(r for r in self.family.roles if r.unit == unit and r.writes_residual)

    def unit_tensors(
        self, layer: int, unit: Unit, params: tuple[str, ...] = ("weight", "bias")
    ) -> Iterator[tuple[str, TensorRole]]:
        """(tensor name, role) of every stored tensor of layer `layer` that `unit`s split.

        Biases are listed only where they are per-unit (q_proj); callers skip names their
        checkpoint lacks (Llama has no q bias, Qwen2 has one). A fused tensor is listed once per
        role (Phi-3's gate_up_proj: gate, then up); `role_block` selects the role's rows.
        """
        for role in self.roles(unit):
            for param in params:
                if param == "weight" or role.unit_bias:
                    yield f"{self.module_path(layer, role)}.{param}", role

    def slices(
        self, component: Component, params: tuple[str, ...] = ("weight", "bias")
    ) -> dict[str, tuple[Any, ...]]:
        """Θ(c): tensor name -> index expression for every stored slice that component owns.

        Biases as in `unit_tensors`. A unit with rows in several blocks of a fused tensor
        (Phi-3's neuron j: rows j and I + j of gate_up_proj) gets them as one index tensor.
        """
        import torch

        out: dict[str, tuple[Any, ...]] = {}
        for name, role in self.unit_tensors(component.layer, component.kind, params):
            # Norm weights (spans_units) and biases are vectors; the rest are [out, in].
            ndim = 1 if role.spans_units or name.endswith(".bias") else 2
            index = self.unit_slice(role, component.index, ndim)
            if name in out:  # a later block of a fused tensor: join the rows as indices
                axis = role.axis if ndim > 1 else 0
                rows = [out[name][axis], index[axis]]
                joined = torch.cat(
                    [
                        r if isinstance(r, torch.Tensor) else torch.arange(r.start, r.stop)
                        for r in rows
                    ]
                )
                index = index[:axis] + (joined,) + index[axis + 1 :]
            out[name] = index
        return out

    def unit_index(self, unit: Unit, units: Any) -> Any:
        """Indices along a role's unit axis owned by `units` (in order): `head_dim` per head."""
        import torch

        width = self.unit_width(unit)
        units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
        return (units * width + torch.arange(width)).reshape(-1)

    def unit_weights_for(self, role: TensorRole, unit_scores: Any) -> Any:
        """Expand per-unit values `[..., units]` to per-row/column values of the tensor axis.

        Heads and KV groups own `head_dim` consecutive rows; a neuron owns one.
        """
        return unit_scores.repeat_interleave(self.unit_width(role.unit), dim=-1)

    # --- logits ---------------------------------------------------------------------------
    def transform_logits(self, logits: Any) -> Any:
        """The family's transforms after the LM head (`logit_ops`), as its forward does them."""
        import torch

        for op, value in self.logit_ops:
            if op == "multiply":
                logits = logits * value
            elif op == "divide":
                logits = logits / value
            else:  # softcap
                logits = torch.tanh(logits / value) * value
        return logits


def _unit_group(unit: Unit) -> TensorGroupName:
    return "kv" if unit == "kv_group" else "component"


def load_shape(model_path_or_config: Any) -> ModelShape:
    """ModelShape from a folder / hub id (via transformers' AutoConfig) or a config object."""
    if isinstance(model_path_or_config, (str, bytes)) or hasattr(
        model_path_or_config, "__fspath__"
    ):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_path_or_config))
        return ModelShape.from_config(config)
    return ModelShape.from_config(model_path_or_config)
