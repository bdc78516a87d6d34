"""Architecture knowledge: heads, KV groups, MLP neurons and the slices of each HF tensor.

This is the only module that knows how a decoder's stored weights split into components
(docs/method.md §1), where its modules live and how its logits are made. Scoring, the analyses
and the `wp` merge method all ask it; none re-derive it. Each family is data, one table per file
in `mergekit_wp/_data/architectures/` (as mergekit's `_data/architectures/*.json`): adding a
family that is built like these means adding a table.

Glossary (the names used across the package):
- unit: what one score belongs to. `head` (attention head h of layer l, H(l,h)), `kv_group`
  (the K/V heads a group of query heads shares; averaged, never scored), `neuron` (MLP
  neuron j of layer l, N(l,j)) and, in a mixture of experts, `expert` (an expert's gate: its
  router row, or the shared expert's sigmoid gate; averaged, never scored). A *component* is a
  scored unit: a head or a neuron.
- experts (docs/method.md §1): in a mixture of experts every expert's MLP neurons are units.
  A layer's neuron axis holds the routed experts' neurons expert by expert (N(l,e,j) is neuron
  `e * I + j`), then the shared expert's (Qwen2-MoE), so the engine and score maps see `[L, N]`
  like a dense model's; routed tensors stack experts on axis 0 (`experts.gate_up_proj`
  `[E, 2I, d]`). Expert `E` (after the routed ones) is the shared expert.
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

Unit = Literal["head", "kv_group", "neuron", "expert"]
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
    # Parameter names under `module` (fused experts: `experts.gate_up_proj`, no `.weight`).
    weight: str = "weight"
    bias_name: str = "bias"
    routed: bool = False  # a routed expert's: neuron tensors stack experts on axis 0
    interleaved: bool = False  # a fused tensor's blocks alternate entry by entry (GPT-OSS)
    width: int = 0  # entries per unit along the axis, if not the unit's (GPT-OSS sinks: 1)


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
    # Mixtures of experts: config keys of the expert count and sizes ({"count", "intermediate_size",
    # optionally "shared_intermediate_size"}); None for a dense MLP.
    experts: dict[str, str] | None = None

    def site_module(self, site: Site) -> str:
        return self.attention if site == "attention" else self.mlp


_FAMILY_KEYS = {f.name for f in fields(ArchitectureFamily)} - {"experts"}
_ROLE_REQUIRED = {"module", "site", "unit", "axis", "part", "bias"}  # "bias": "unit" or "shared"
_ROLE_KEYS = _ROLE_REQUIRED | {"writes_residual", "after", "spans_units", "weight", "bias_name"}
_ROLE_KEYS |= {"routed", "interleaved", "width"}
# "outputs": "hidden_and_router_scores" where the MLP returns its router scores too (GPT-OSS).
_EXPERT_KEYS = {"count", "intermediate_size", "shared_intermediate_size", "outputs"}


def _family_from_table(source: str, table: dict[str, Any]) -> ArchitectureFamily:
    """Validate one architecture table; errors name the file and the key."""

    def fail(what: str) -> ValueError:
        return ValueError(f"architecture table {source}: {what}")

    keys = set(table) - {"experts"}  # the one optional key
    if keys != _FAMILY_KEYS:
        missing, extra = sorted(_FAMILY_KEYS - keys), sorted(keys - _FAMILY_KEYS)
        raise fail(
            f"keys must be {sorted(_FAMILY_KEYS)} (and optionally experts); missing {missing}, "
            f"unexpected {extra}"
        )
    experts = table.get("experts")
    if experts is not None and not {"count", "intermediate_size"} <= set(experts) <= _EXPERT_KEYS:
        raise fail(
            f"experts must have keys count, intermediate_size, optionally "
            f"shared_intermediate_size and outputs; got {sorted(experts)}"
        )
    if experts and experts.get("outputs", "hidden_and_router_scores") != "hidden_and_router_scores":
        raise fail("experts.outputs must be 'hidden_and_router_scores' (or left out: the hidden)")
    units = get_args(Unit) if experts else ("head", "kv_group", "neuron")
    roles = []
    for i, raw in enumerate(table["roles"]):
        if not _ROLE_REQUIRED <= set(raw) <= _ROLE_KEYS:
            raise fail(
                f"roles[{i}] has keys {sorted(raw)}; expected {sorted(_ROLE_REQUIRED)} "
                f"and optionally {sorted(_ROLE_KEYS - _ROLE_REQUIRED)}"
            )
        if raw["site"] not in get_args(Site) or raw["unit"] not in units:
            raise fail(f"roles[{i}]: site must be one of {get_args(Site)}, unit one of {units}")
        routed = raw.get("routed", False)
        if raw["bias"] not in ("unit", "shared") or raw["axis"] not in (0, 1, 2)[: 2 + routed]:
            raise fail(
                f"roles[{i}]: bias must be 'unit' or 'shared' and axis 0 or 1 (2: routed experts)"
            )
        after = raw.get("after", [])
        if not isinstance(after, list) or not set(after) <= set(get_args(Unit)):
            raise fail(f"roles[{i}]: after must be a list of units out of {get_args(Unit)}")
        role = {k: v for k, v in raw.items() if k not in ("bias", "after")}
        roles.append(TensorRole(**role, unit_bias=raw["bias"] == "unit", after=tuple(after)))
    for tensor in dict.fromkeys(_tensor_key(r) for r in roles):
        # A fused tensor's blocks follow each other: the n-th lists the n before it.
        blocks = sorted((r for r in roles if _tensor_key(r) == tensor), key=lambda r: len(r.after))
        for n, role in enumerate(blocks):
            if role.after != tuple(r.unit for r in blocks[:n]):
                raise fail(
                    f"roles of {_tensor_label(tensor)}: block {n} ({role.part}) "
                    f"must have after {[r.unit for r in blocks[:n]]}, the units of the blocks "
                    f"before it; got {list(role.after)}"
                )
    blocks = [("head", False, HEAD_PARTS), ("neuron", False, NEURON_PARTS)]
    if experts:  # routed experts' neurons; the dense roles are the shared expert's, if any
        blocks = blocks[:1] + [("neuron", True, NEURON_PARTS)]
        blocks += [("neuron", False, NEURON_PARTS)] * ("shared_intermediate_size" in experts)
    for kind, routed, parts in blocks:
        mine = [r for r in roles if r.unit == kind and r.routed == routed]
        have = tuple(dict.fromkeys(r.part for r in mine))
        writers = [r.part for r in mine if r.writes_residual]
        if have != parts or len(writers) != 1:
            raise fail(
                f"{kind} roles{' of routed experts' if routed else ''} must have parts {parts} "
                f"(score map format v1), exactly one writing the residual stream; got parts "
                f"{have}, writers {writers}"
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
            "experts": dict(experts) if experts else None,
        }
    )


def _tensor_key(role: TensorRole) -> tuple[str, str, str]:
    """What identifies a role's stored tensor: roles sharing it are blocks of a fused tensor."""
    return role.site, role.module, role.weight


def _tensor_label(key: tuple[str, str, str]) -> str:
    """`v_proj`, `experts.gate_up_proj`: a tensor as errors name it."""
    _, module, weight = key
    return ".".join(filter(None, (module, weight if weight != "weight" else "")))


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
    intermediate_size: int  # neurons per layer: every routed expert's, then the shared/dense MLP's
    vocab_size: int
    # (op, value) of the family's logit transforms this config sets, e.g. (("softcap", 30.0),)
    logit_ops: tuple[tuple[LogitOp, float], ...] = ()
    num_experts: int = 0  # routed experts per layer (0: a dense MLP)
    expert_intermediate_size: int = 0  # neurons of one routed expert

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
        experts, per_expert, neurons = 0, 0, int(get("intermediate_size"))
        if family.experts:
            keys = family.experts
            experts, per_expert = int(get(keys["count"])), int(get(keys["intermediate_size"]))
            shared = keys.get("shared_intermediate_size")
            neurons = experts * per_expert + (int(get(shared) or 0) if shared else 0)
            # Qwen-MoE can make some layers dense; their units would differ from the others'.
            if get("mlp_only_layers") or (get("decoder_sparse_step") or 1) != 1:
                raise UnsupportedArchitectureError(
                    f"{architecture} with mlp_only_layers={get('mlp_only_layers')} and "
                    f"decoder_sparse_step={get('decoder_sparse_step')}: mergekit-wp needs every "
                    "layer to be a mixture of experts (mlp_only_layers=[], decoder_sparse_step=1)"
                )
        return cls(
            family=family,
            architecture=architecture,
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            hidden_size=hidden,
            intermediate_size=neurons,
            vocab_size=int(get("vocab_size")),
            # A key the config leaves unset (or 0: Gemma 2 without capping) is not applied.
            logit_ops=tuple((op, float(get(key))) for op, key in family.logits if get(key)),
            num_experts=experts,
            expert_intermediate_size=per_expert,
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

    @property
    def routed_neurons(self) -> int:
        """Neurons of all routed experts of a layer: the first of its neuron axis."""
        return self.num_experts * self.expert_intermediate_size

    def neurons_of_expert(self, expert: int) -> range:
        """Neuron units of expert `expert` (`num_experts`: the shared expert)."""
        size = self.expert_intermediate_size
        if expert == self.num_experts:
            return range(self.routed_neurons, self.intermediate_size)
        return range(expert * size, (expert + 1) * size)

    def unit_count(self, unit: Unit) -> int:
        shared = self.num_experts > 0 and self.intermediate_size > self.routed_neurons
        return {
            "head": self.num_attention_heads,
            "kv_group": self.num_key_value_heads,
            "neuron": self.intermediate_size,
            "expert": self.num_experts + shared,
        }[unit]

    def unit_range(self, role: TensorRole) -> range:
        """The units of `role.unit` a role's tensor holds: a routed tensor the routed experts'
        (neurons, or router rows), any other neuron / expert tensor the shared expert's."""
        if role.unit == "neuron":
            routed = self.routed_neurons
            return range(routed) if role.routed else range(routed, self.intermediate_size)
        if role.unit == "expert":
            experts = self.num_experts
            return range(experts) if role.routed else range(experts, experts + 1)
        return range(self.unit_count(role.unit))

    def unit_width(self, unit: Unit) -> int:
        """Rows (or columns) of a tensor that one unit owns."""
        return self.head_dim if unit in ("head", "kv_group") else 1

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
        """HF module path of a role's linear layer, e.g. `model.layers.3.self_attn.q_proj` (the
        site itself for a parameter of its own, GPT-OSS's `self_attn.sinks`)."""
        site = f"{self.layer_prefix(layer)}.{self.family.site_module(role.site)}"
        return f"{site}.{role.module}" if role.module else site

    def tensor_name(self, layer: int, role: TensorRole, param: str = "weight") -> str:
        """Stored name of a role's weight or bias, e.g. `model.layers.3.mlp.experts.down_proj`."""
        param = role.weight if param == "weight" else role.bias_name
        return f"{self.module_path(layer, role)}.{param}"

    def parse(self, name: str) -> WeightInfo:
        """Layer, module, parameter kind and roles of a stored tensor name (blocks in order)."""
        match = re.fullmatch(rf"{re.escape(self.family.layers_prefix)}\.(\d+)\.(.+)", name)
        if not match:
            param = name.rsplit(".", 1)[-1]
            return WeightInfo(name, None, None, param, ())
        layer, rest = int(match[1]), match[2]
        found: dict[str, list[TensorRole]] = {"weight": [], "bias": []}
        for r in self.family.roles:
            path = ".".join(filter(None, (self.family.site_module(r.site), r.module)))
            if rest == f"{path}.{r.weight}":
                found["weight"].append(r)
            elif rest == f"{path}.{r.bias_name}":
                found["bias"].append(r)
        param = next((p for p, roles in found.items() if roles), rest.rsplit(".", 1)[-1])
        roles = tuple(sorted(found.get(param, ()), key=self.role_offset))
        if param == "bias" and not all(r.unit_bias for r in roles):
            roles = ()  # o_proj / down_proj biases are shared by all units of the layer
        return WeightInfo(name, layer, rest.rsplit(".", 1)[0], param, roles)

    def tensor_group(self, name: str) -> TensorGroupName:
        """Which Θ a stored tensor belongs to: head / neuron slices, a KV group's, or none.

        Of the tensors no component owns, `embedding` and `unembedding` (`lm_head`) have one row
        per token; `other` are the norms, shared o/down biases and router rows. Of a fused
        tensor, the group of its first block (`tensor_blocks` gives each block's).
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

    # --- where units lie in a tensor -------------------------------------------------------
    def role_width(self, role: TensorRole) -> int:
        """Entries one unit owns along a role's axis: the unit's width unless the role says."""
        return role.width or self.unit_width(role.unit)

    def _blocks(self, role: TensorRole) -> list[TensorRole]:
        """The roles sharing a role's tensor (one unless fused), in their order along the axis."""
        key = _tensor_key(role)
        return sorted(
            (r for r in self.family.roles if _tensor_key(r) == key), key=lambda r: len(r.after)
        )

    def _block_length(self, role: TensorRole) -> int:
        """Entries of a role's block along its axis (per expert for a routed expert's tensor)."""
        stacked = role.routed and role.unit == "neuron"
        units = self.expert_intermediate_size if stacked else len(self.unit_range(role))
        return units * self.role_width(role)

    def role_offset(self, role: TensorRole) -> int:
        """First row (or column) of a role's block: 0 unless its tensor is fused."""
        blocks = self._blocks(role)
        return sum(self._block_length(r) for r in blocks[: blocks.index(role)])

    def axis_length(self, role: TensorRole) -> int:
        """Entries of a role's tensor along its unit axis (per expert for a routed one)."""
        return sum(self._block_length(r) for r in self._blocks(role))

    def unit_axes(self, role: TensorRole, ndim: int) -> tuple[int, ...]:
        """Axes of a role's tensor (weight, or its bias: one fewer axis) that index its units:
        `(0, axis)` for a routed expert's neuron tensor (experts first), else `(axis,)`."""
        stacked = role.routed and role.unit == "neuron"
        weight = ndim == 2 + stacked
        axis = role.axis if weight else int(stacked)
        return (0, axis) if stacked else (axis,)

    def unit_positions(self, role: TensorRole) -> Any:
        """Where each of the role's units lies in its tensor: `[units * width]` flat indices into
        the tensor's unit axes (`unit_axes`: experts x axis when routed), units in order.

        A fused tensor's blocks follow each other (`after`), or alternate entry by entry
        (`interleaved`: GPT-OSS's gate_up holds gate_0, up_0, gate_1, ...).
        """
        import torch

        blocks = self._blocks(role)
        local = torch.arange(self._block_length(role))
        if role.interleaved:
            at = local * len(blocks) + blocks.index(role)
        else:
            at = local + self.role_offset(role)
        if role.routed and role.unit == "neuron":
            along = self.axis_length(role)
            at = (torch.arange(self.num_experts).unsqueeze(1) * along + at).reshape(-1)
        return at

    def role_block(self, role: TensorRole, ndim: int) -> tuple[slice, ...]:
        """Index expression selecting every unit of a role: the whole tensor unless fused."""
        blocks = self._blocks(role)
        sl = [slice(None)] * ndim
        axis = self.unit_axes(role, ndim)[-1]
        if role.interleaved:
            sl[axis] = slice(blocks.index(role), None, len(blocks))
        else:
            offset = self.role_offset(role)
            sl[axis] = slice(offset, offset + self._block_length(role))
        return tuple(sl)

    def unit_slice(self, role: TensorRole, index: int, ndim: int) -> tuple[slice, ...]:
        """Index expression selecting unit `index` (of `role.unit`) of a tensor with this role:
        slices, keeping every axis (a routed expert's neuron: its expert's, then its rows)."""
        width = self.role_width(role)
        local = index - self.unit_range(role).start
        first = int(self.unit_positions(role)[local * width])
        along = self.axis_length(role)
        sl = [slice(None)] * ndim
        axes = self.unit_axes(role, ndim)
        if len(axes) == 2:
            sl[0] = slice(first // along, first // along + 1)
        sl[axes[-1]] = slice(first % along, first % along + width)  # a unit's rows are contiguous
        return tuple(sl)

    def unit_sums(self, role: TensorRole, values: Any, dtype: Any = None) -> Any:
        """`[units]` sums of `values` (a role's tensor's shape) over each of its units' entries;
        of a fused tensor, the role's block only."""
        axes = self.unit_axes(role, values.ndim)
        others = [a for a in range(values.ndim) if a not in axes]
        if others:
            values = values.sum(dim=others, dtype=dtype)
        flat = values.reshape(-1)[self.unit_positions(role).to(values.device)]
        return flat.reshape(len(self.unit_range(role)), -1).sum(-1, dtype=dtype)

    def unit_rows(self, role: TensorRole, tensor: Any) -> Any:
        """A writer's tensor as `[units * width, rest]`: the rows (or columns) each unit owns."""
        import torch

        axes = self.unit_axes(role, tensor.ndim)
        moved = torch.movedim(tensor, axes, tuple(range(len(axes))))
        lead = moved.shape[: len(axes)].numel()
        return moved.reshape(lead, -1)[self.unit_positions(role).to(tensor.device)]

    def spread(self, role: TensorRole, unit_values: Any, size: Any) -> Any:
        """Per-unit values `[K, units]` (the role's units) as `[K, ...]` broadcasting over a tensor
        of `size`: each entry of a unit's slice gets its value, other entries (other blocks) 0."""
        axes = self.unit_axes(role, len(size))
        plane = [size[a] for a in axes]
        out = unit_values.new_zeros(unit_values.shape[0], plane[0] * (plane[1:] or [1])[0])
        out[:, self.unit_positions(role)] = self.unit_weights_for(role, unit_values)
        view = [unit_values.shape[0]] + [1] * len(size)
        for a in axes:
            view[1 + a] = size[a]
        return out.reshape(view)

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
                    yield self.tensor_name(layer, role, param), role

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
            if component.index not in self.unit_range(role):
                continue  # a routed expert's tensors hold no shared-expert neuron, and back
            # Norm weights (spans_units) and biases are vectors; the rest are [out, in]; a
            # routed expert's have the experts' axis first.
            weight = name == self.tensor_name(component.layer, role) and not role.spans_units
            ndim = 1 + weight + (role.routed and role.unit == "neuron")
            index = self.unit_slice(role, component.index, ndim)
            if name in out:  # a later block of a fused tensor: join the rows as indices
                axis = self.unit_axes(role, ndim)[-1]
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
        return unit_scores.repeat_interleave(self.role_width(role), dim=-1)

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
    # An expert's gate (router row) belongs to no component: like a norm, `other`.
    return {"kv_group": "kv", "expert": "other"}.get(unit, "component")


def load_shape(model_path_or_config: Any) -> ModelShape:
    """ModelShape from a folder / hub id (via transformers' AutoConfig) or a config object."""
    if isinstance(model_path_or_config, (str, bytes)) or hasattr(
        model_path_or_config, "__fspath__"
    ):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_path_or_config))
        return ModelShape.from_config(config)
    return ModelShape.from_config(model_path_or_config)
