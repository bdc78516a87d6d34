"""The `wp` merge method (METHOD.md §8): experts fused head by head and neuron by neuron.

`α_k(c) = relu(s_k(c)) / Σ_m relu(s_m(c))` (uniform `1/K` where every expert scores `c` at or
below zero), then `θ(c) = Σ_k α_k(c) θ_k(c)`. Which rows or columns of a tensor belong to which
head, KV group or neuron is asked of `mergekit_wp.components`; this module only weighs.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Annotated

import torch
from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache, SaveTensor
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorGroup,
    merge_method,
    register,
    registered_methods,
)
from mergekit.merge_methods.base import FunctionalGroupMergeMethod
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from pydantic import AfterValidator, ValidationError

from mergekit_wp.components import ModelShape, TensorRole, load_shape
from mergekit_wp.scoremap import ScoreMap, ScoreMapError, read_score_map

METHOD_NAME = "wp"


# --- score maps: read once per process ----------------------------------------------------
def _resolved(path: str | os.PathLike) -> Path:
    # abspath, not resolve(): no filesystem walk on every tensor of a merge.
    return Path(os.path.abspath(os.path.expanduser(path)))


def load_score_map(path: str | os.PathLike) -> ScoreMap:
    """Read and validate a score map; cached on (resolved path, mtime, size)."""
    resolved = _resolved(path)
    try:
        stat = resolved.stat()
    except OSError:
        raise ScoreMapError(f"score map {resolved}: file not found") from None
    return _read_cached(str(resolved), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _read_cached(path: str, mtime_ns: int, size: int) -> ScoreMap:
    return read_score_map(path)


def _checked_score_path(value: str) -> str:
    # Runs when mergekit plans each tensor, so a missing or malformed map fails before any
    # output exists; the resolved path keeps the kernel independent of the working directory.
    path = _resolved(value)
    load_score_map(path)
    return str(path)


ScoreMapPath = Annotated[str, AfterValidator(_checked_score_path)]


# --- models: shape from config, experts must match the base ---------------------------------
@functools.lru_cache(maxsize=32)
def model_shape(model: Hashable) -> ModelShape:
    """Component dimensions of a merge input: a mergekit ModelReference, a folder or hub id."""
    if isinstance(model, ModelReference):
        return ModelShape.from_config(model.config())
    if isinstance(model, (str, os.PathLike)):
        return load_shape(model)
    raise ValueError(
        f"wp needs the base model's config, but the base input id is {model!r}; use its "
        "folder, hub id or mergekit ModelReference as the id"
    )


def check_same_architecture(base: Hashable, experts: Sequence[Hashable]) -> None:
    """Raise ValueError unless every expert has the base's architecture and dimensions."""
    want = model_shape(base)
    for expert in experts:
        have = model_shape(expert)
        for field in dataclasses.fields(ModelShape):
            if field.name in ("vocab_size", "family"):
                continue  # added tokens are aligned to the base; family follows architecture
            if getattr(have, field.name) != getattr(want, field.name):
                raise ValueError(
                    f"wp: expert {expert} has {field.name}={getattr(have, field.name)}, but the "
                    f"base {base} has {field.name}={getattr(want, field.name)}; wp fuses experts "
                    "fine-tuned from the same base model"
                )


def check_same_vocabulary(base: Hashable, experts: Sequence[Hashable]) -> None:
    """Raise ValueError if an expert's vocabulary size differs and nothing aligns it."""
    want = model_shape(base).vocab_size
    for expert in experts:
        have = model_shape(expert).vocab_size
        if have != want:  # mergekit would stop at the first embedding, after creating the output
            raise ValueError(
                f"wp: expert {expert} has vocab_size={have}, the base {base} has {want}; add "
                "`tokenizer: {source: base}` to the recipe to align its rows to the base's tokens"
            )


def check_score_map(path: str | os.PathLike, base: Hashable) -> ScoreMap:
    """The score map at `path`, checked against the base model's components."""
    path = _resolved(path)
    scores = load_score_map(path)
    scores.check_shape(model_shape(base), f"score map {path}")
    return scores


# --- fusion weights --------------------------------------------------------------------------
def fusion_weights(scores: torch.Tensor) -> torch.Tensor:
    """α `[K, units]` from raw scores `[K, units]`: ReLU, normalize over experts, 1/K if all 0."""
    positive = scores.clamp(min=0)
    total = positive.sum(dim=0, keepdim=True)
    uniform = torch.full_like(positive, 1.0 / scores.shape[0])
    return torch.where(total > 0, positive / torch.where(total > 0, total, 1), uniform)


def unit_weights(
    shape: ModelShape, role: TensorRole, layer: int, maps: Sequence[ScoreMap]
) -> torch.Tensor:
    """α `[K, units]` of one layer for the units that `role` splits a tensor into."""
    if role.unit == "neuron":
        return fusion_weights(torch.stack([m.neurons[layer] for m in maps]).double())
    alpha = fusion_weights(torch.stack([m.heads[layer] for m in maps]).double())
    if role.unit == "head":
        return alpha
    # A K/V head serves every query head of its group: it gets their mean α (per expert).
    groups = range(shape.num_key_value_heads)
    return torch.stack([alpha[:, list(shape.heads_of_group(g))].mean(dim=1) for g in groups], 1)


def tensor_coefficients(
    shape: ModelShape, name: str | None, maps: Sequence[ScoreMap], size: torch.Size
) -> torch.Tensor:
    """Per-expert coefficients `[K, ...]` broadcasting over a tensor named `name` of `size`."""
    info = shape.parse(name) if name else None
    k, ndim = len(maps), len(size)
    if info is None or info.role is None:  # embeddings, norms, lm_head, shared biases
        return torch.full((k,) + (1,) * ndim, 1.0 / k, dtype=torch.float64)
    per_index = shape.unit_weights_for(info.role, unit_weights(shape, info.role, info.layer, maps))
    axis = info.role.axis if ndim > 1 else 0
    if per_index.shape[1] != size[axis]:
        raise ValueError(
            f"wp: {name} has {size[axis]} entries along axis {axis}, but the base config "
            f"implies {per_index.shape[1]} ({info.role.unit} x {shape.unit_width(info.role.unit)})"
        )
    view = [k] + [1] * ndim
    view[1 + axis] = -1
    return per_index.reshape(view)


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """`Σ_k c_k * t_k` accumulated in fp32 (fp64 for fp64 inputs), returned in the inputs' dtype."""
    first = tensors[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    coefficients = coefficients.to(device=first.device, dtype=acc)
    out = coefficients[0] * first  # promotes to `acc`: one pass, no zero-filled buffer
    for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
        out.addcmul_(tensor, coefficient)
    return out.to(first.dtype)


# --- the method --------------------------------------------------------------------------------
def _wp_kernel(group: TensorGroup, scores: PerNonBase[ScoreMapPath]) -> torch.Tensor:
    """`θ = Σ_k α_k θ_k` for one tensor, α from each expert's score map (METHOD.md §8)."""
    experts = group.non_base
    # Every kernel call checks all of its experts' maps (cached), so a map that does not fit
    # the base fails on the first tensor, before mergekit saves any.
    maps = [check_score_map(scores[e.id], group.base.id) for e in experts]
    shape = model_shape(group.base.id)
    first = experts[0].tensor
    coefficients = tensor_coefficients(shape, group.metadata.name, maps, first.shape)
    return weighted_sum([e.tensor for e in experts], coefficients)


class WPMergeMethod(FunctionalGroupMergeMethod):
    """`wp` with a planning-time check that every expert has the base's architecture."""

    def validate_inputs(
        self,
        input_ids: Sequence[Hashable],
        base_id: Hashable | None = None,
        *,
        group_name: str | None = None,
    ) -> None:
        super().validate_inputs(input_ids, base_id, group_name=group_name)
        if isinstance(base_id, ModelReference):  # mergekit's planner: configs are at hand
            check_same_architecture(base_id, [i for i in input_ids if i != base_id])


_spec = merge_method(
    name=METHOD_NAME,
    pretty_name="Weight Patching (mechanism-aware)",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)(_wp_kernel).spec
wp_merge = WPMergeMethod(_spec, _wp_kernel)


def register_wp() -> None:
    """Register `wp` with mergekit (idempotent)."""
    if not any(m.spec.name == METHOD_NAME for m in registered_methods()):
        register(wp_merge)


def check_wp_recipe(config: MergeConfiguration, options: MergeOptions | None = None) -> None:
    """Plan a `wp` recipe without running it; raise ValueError naming the first bad input.

    Finds up front what would otherwise stop the merge midway: a missing base, experts of
    another architecture, an unaligned larger vocabulary, a missing `scores` parameter, score
    maps that are missing, malformed, non-finite or made for another shape.
    """
    options = options or MergeOptions()
    if config.merge_method != METHOD_NAME:
        return
    base = config.base_model
    if base is None:
        raise ValueError("wp needs a `base_model:` (the model every expert was fine-tuned from)")
    experts = [m for m in config.referenced_models() if m != base]
    check_same_architecture(base, experts)
    if not (config.tokenizer or config.tokenizer_source or options.unsafe_truncate_embeddings):
        check_same_vocabulary(base, experts)
    LoaderCache().setup(options=options)
    try:
        planner = MergePlanner(
            config.model_copy(deep=True),  # planning rewrites `models:` into slices in place
            get_architecture_info(config, options),
            options=options,
            out_model_config=base.config(trust_remote_code=options.trust_remote_code),
        )
        # Planning only builds task objects; nothing is written until an executor runs them.
        tasks = planner.plan_to_disk(out_path=os.devnull)
    except ValidationError as err:  # a `scores` value failed _checked_score_path
        raise _first_cause(err) from err
    except RuntimeError as err:  # mergekit's own, e.g. "Missing required parameter scores"
        raise ValueError(str(err)) from err
    merges = [t.tensor_task for t in tasks if isinstance(t, SaveTensor)]
    for task in merges:
        for params in task.input_parameters.values():
            if "scores" in params:
                check_score_map(params["scores"], task.base_model)


def _first_cause(err: ValidationError) -> Exception:
    cause = err.errors()[0].get("ctx", {}).get("error")
    return cause if isinstance(cause, Exception) else ValueError(str(err))
