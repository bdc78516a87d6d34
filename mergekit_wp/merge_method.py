"""The `wp` merge method (docs/method.md §8): experts fused head by head and neuron by neuron.

`α_k(c) = relu(s_k(c)) / Σ_m relu(s_m(c))` (uniform `1/K` where every expert scores `c` at or
below zero), then `θ(c) = Σ_k α_k(c) θ_k(c)`. Which rows or columns of a tensor belong to which
head, KV group or neuron is asked of `mergekit_wp.components`; this module only weighs.
"""

from __future__ import annotations

import functools
import logging
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
    MergeMethod,
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
from mergekit_wp.io import is_hub_id
from mergekit_wp.scoremap import ScoreMap, ScoreMapError, read_score_map

METHOD_NAME = "wp"
log = logging.getLogger(__name__)


class ScoreMapRejected(Exception):
    """A score map refused while mergekit validates the `scores` parameter.

    Not a ValueError on purpose: pydantic wraps a validator's ValueError in a ValidationError
    whose first line names the validator; any other exception passes through unwrapped, so
    plain `mergekit-yaml` ends with this message.
    """


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
    scores = read_score_map(path)
    if max(scores.heads.max().item(), scores.neurons.max().item()) <= 0:
        # ReLU leaves nothing: the expert gets weight only where no expert scores above zero.
        kind = "zero" if not (scores.heads.any() or scores.neurons.any()) else "at or below zero"
        log.warning(
            "score map %s: every score is %s, so wp gives this expert no component of its own "
            "(it only shares the uniform average where no expert scores above zero)",
            path,
            kind,
        )
    return scores


def _checked_score_path(value: str) -> str:
    # Runs when mergekit plans each tensor, so a missing or malformed map fails before any
    # output exists; the resolved path keeps the kernel independent of the working directory.
    path = _resolved(value)
    try:
        load_score_map(path)
    except ScoreMapError as err:
        raise ScoreMapRejected(str(err)) from None
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
        want.check_compatible(
            model_shape(expert),
            f"the base {base}",
            f"wp: expert {expert}",
            "wp fuses experts fine-tuned from the same base model",
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


def model_identity(reference: Hashable) -> tuple[str, str] | None:
    """("hub", id) or ("folder", real path) of a model reference, so spellings of one model
    compare equal; None when it names neither here (e.g. a folder of another machine)."""
    text = str(reference.model.path if isinstance(reference, ModelReference) else reference)
    if text.startswith("zoo:"):  # how scoring configs name the micro zoo
        from mergekit_wp.io import resolve_model

        try:
            text = resolve_model(text)
        except (FileNotFoundError, ValueError):
            return None
    path = Path(text).expanduser()
    if path.is_dir():
        real = os.path.realpath(path)
        cached = [p for p in Path(real).parts if p.startswith("models--")]  # the Hub's cache
        return (
            ("hub", cached[-1][len("models--") :].replace("--", "/"))
            if cached
            else ("folder", real)
        )
    return ("hub", text) if is_hub_id(text) else None


@functools.lru_cache(maxsize=256)
def check_score_models(path: str, base: Hashable, expert: Hashable) -> None:
    """ScoreMapError if the map at `path` records another base or model than the recipe's.

    A recorded name that cannot be resolved here (or a Hub id against a folder outside the
    Hub's cache) cannot be compared: that is logged, not refused.
    """
    scores = load_score_map(path)
    for role, recorded, given in (
        ("base", scores.base_model, base),
        ("model", scores.model, expert),
    ):
        have, want = model_identity(recorded), model_identity(given)
        if have is None or want is None or have[0] != want[0]:
            log.warning(
                "score map %s: cannot check that its %s %r is the recipe's %s",
                path,
                role,
                recorded,
                given,
            )
        elif have != want:
            raise ScoreMapError(
                f"score map {path}: made for {role} {recorded!r}, but the recipe gives it to "
                f"{'the base' if role == 'base' else 'the expert'} {given}; score that model, or "
                "set `parameters: {ignore_score_metadata: true}` to merge it anyway"
            )


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
    if role.unit in ("neuron", "expert"):
        alpha = fusion_weights(torch.stack([m.neurons[layer] for m in maps]).double())
        if role.unit == "neuron":
            return alpha
        # An expert's gate (its router row, the shared expert's sigmoid gate) serves all of the
        # expert's neurons: it gets their mean α, as a K/V head gets its query heads'.
        experts = range(shape.unit_count("expert"))
        return torch.stack([alpha[:, shape.neurons_of_expert(e)].mean(dim=1) for e in experts], 1)
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
    # One block per role (a fused tensor such as Phi-3's qkv_proj or gate_up_proj has several);
    # each role's coefficients sit on its own entries, zero elsewhere.
    out = torch.zeros((k,) + (1,) * ndim, dtype=torch.float64)
    for role in info.roles:
        axes = shape.unit_axes(role, ndim)
        want = [shape.num_experts, shape.axis_length(role)][-len(axes) :]
        if [size[a] for a in axes] != want:
            implied = " + ".join(f"{r.unit} x {shape.role_width(r)}" for r in info.roles)
            raise ValueError(
                f"wp: {name} has {[size[a] for a in axes]} entries along axes {list(axes)}, but "
                f"the base config implies {want} ({implied})"
            )
        alpha = unit_weights(shape, role, info.layer, maps)[:, shape.unit_range(role)]
        out = out + shape.spread(role, alpha, size)
    return out


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
def _wp_kernel(
    group: TensorGroup, scores: PerNonBase[ScoreMapPath], ignore_score_metadata: bool = False
) -> torch.Tensor:
    """`θ = Σ_k α_k θ_k` for one tensor, α from each expert's score map (docs/method.md §8)."""
    experts = group.non_base
    # Every kernel call checks all of its experts' maps (cached), so a map that does not fit
    # the base, or was made for another model, fails on the first tensor, before any is saved.
    maps = [check_score_map(scores[e.id], group.base.id) for e in experts]
    if not ignore_score_metadata:
        for e in experts:
            check_score_models(scores[e.id], group.base.id, e.id)
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


def register_once(method: MergeMethod) -> None:
    """Register `method` with mergekit unless a method of its name already is."""
    if not any(m.spec.name == method.spec.name for m in registered_methods()):
        register(method)


def register_wp() -> None:
    """Register `wp` with mergekit (idempotent)."""
    register_once(wp_merge)


def check_wp_recipe(config: MergeConfiguration, options: MergeOptions | None = None) -> None:
    """Plan a `wp` recipe without running it; raise ValueError naming the first bad input.

    Finds up front what would otherwise stop the merge midway: a missing base, experts of
    another architecture, an unaligned larger vocabulary, a missing `scores` parameter, a
    parameter wp does not use, score maps that are missing, malformed, non-finite, made for
    another shape, or recorded for another base or expert.
    """
    options = options or MergeOptions()
    if config.merge_method != METHOD_NAME:
        return
    check_wp_parameters(config)
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
    except ScoreMapRejected as err:  # a `scores` value failed _checked_score_path
        raise ScoreMapError(str(err)) from None
    except ValidationError as err:  # another parameter's value, e.g. a non-boolean flag
        first = err.errors()[0]
        raise ValueError(f"wp: {first['msg']} (got {first['input']!r})") from None
    except RuntimeError as err:  # mergekit's own, e.g. "Missing required parameter scores"
        raise ValueError(str(err)) from err
    merges = [t.tensor_task for t in tasks if isinstance(t, SaveTensor)]
    for task in merges:
        for model, params in task.input_parameters.items():
            if "scores" in params:
                check_score_map(params["scores"], task.base_model)
                if not task.parameters.get("ignore_score_metadata"):
                    check_score_models(params["scores"], task.base_model, model)


def check_wp_parameters(config: MergeConfiguration) -> None:
    """ValueError for a parameter `wp` does not take (`weight:`, `density:`, ...): mergekit
    would ignore it without a word, and the merge would not be what the recipe says."""
    known = {p.name for p in wp_merge.spec.parameters}
    places = [("the recipe's `parameters`", config.parameters)]
    places += [(f"model {m.model}", m.parameters) for m in config.models or []]
    places += [
        (f"model {source.model}", source.parameters)
        for piece in config.slices or []
        for source in piece.sources
    ]
    for where, parameters in places:
        unknown = sorted(set(parameters or {}) - known)
        if unknown:
            raise ValueError(
                f"wp: {where} sets {', '.join(unknown)}, which wp does not use (it takes "
                f"{', '.join(sorted(known))}; the fusion weights come from the score maps); "
                "remove it"
            )
