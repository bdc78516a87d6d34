"""The scoring engine: score maps of one model pair over token batches, in memory.

`score_maps(pair, batches, utility, methods)` is the one place that turns a gradient pass
(WP-attr, AP-attr) and exact sweeps (WP, AP) into `ScoreMap`s (docs/method.md §3-§5).
`mergekit-wp score` (`pipeline.py`: loading, resuming, data-parallel distribution, writing) and
the analyses (`analyses/scoring_api.py`) both call it.

Work is cut into *steps* (one batch of the gradient pass; one batch x unit kind x layer of an
exact sweep), each added to fp64 running sums and then committed to a ledger: the pipeline's
ledger is a resumable state file, an in-memory one serves everywhere else. Only this process's
`share` of the batches is run; `collective` sums the totals over processes (one process: as is).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from mergekit_wp.components import ModelShape
from mergekit_wp.scoremap import ScoreMap, unit_scores
from mergekit_wp.scoring.attribution import empty_parts, gradient_pass
from mergekit_wp.scoring.config import GranularityConfig, MethodName
from mergekit_wp.scoring.exact import layer_sums
from mergekit_wp.scoring.forward import TokenBatch, site_inputs, trace
from mergekit_wp.scoring.state import RunState
from mergekit_wp.scoring.utility import ReadoutUtility, batch_context, gap_weights

ExactPlan = dict[str, dict[int, list[int]]]  # unit kind ("head", "neuron") -> layer -> units


@dataclass(frozen=True)
class ModelPair:
    """A base and a model fine-tuned from it, checked to split into the same components."""

    base: nn.Module
    model: nn.Module
    shape: ModelShape
    base_name: str = "base"
    model_name: str = "model"

    @classmethod
    def of(
        cls,
        base: nn.Module,
        model: nn.Module,
        base_name: str = "base",
        model_name: str = "model",
        why: str = "Weight Patching compares two checkpoints of one architecture",
    ) -> ModelPair:
        shape = ModelShape.from_config(model.config)
        ModelShape.from_config(base.config).check_compatible(
            shape, f"base {base_name}", f"model {model_name}", why
        )
        return cls(base, model, shape, base_name, model_name)

    @property
    def vocab(self) -> int:
        """Vocabulary both models read out (the model may add tokens, e.g. a pad, the base
        lacks).
        """
        return min(self.shape.vocab_size, self.base.get_output_embeddings().weight.shape[0])


class Collective(Protocol):
    """Reductions over the processes of a data-parallel run."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def gather(self, items: list) -> list: ...


class _OneProcess:
    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, items: list) -> list:
        return items


ONE_PROCESS: Collective = _OneProcess()


@dataclass
class Scores:
    """What `score_maps` found: a map per method, and the per-example gaps behind them."""

    maps: dict[str, ScoreMap]
    gaps: list[dict[str, Any]]  # key, f_base, f_sft, gap, kept: every example of every process
    kept: int
    timings: dict[str, float] = field(default_factory=dict)


class _Run:
    """One engine run: shared batch contexts, Δθ cache and the ledger of finished steps."""

    def __init__(
        self,
        pair: ModelPair,
        batches: Sequence[TokenBatch],
        utility: ReadoutUtility,
        share: Sequence[int],
        ledger: RunState,
        gap_floor: float,
        max_variant_rows: int,
        label: str,
        quiet: bool,
        on_step: Callable[[str], None] | None,
    ) -> None:
        self.pair, self.batches, self.utility, self.share = pair, batches, utility, share
        self.ledger, self.gap_floor, self.max_variant_rows = ledger, gap_floor, max_variant_rows
        self.label, self.quiet, self.on_step = label, quiet, on_step
        self.stop = utility.stop_layer(pair.base)
        self.timings: dict[str, float] = {}
        self.contexts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.deltas: dict[str, torch.Tensor] = {}  # Δθ per scored tensor, computed once per run

    def _commit(self, step: str) -> None:
        self.ledger.commit(step)
        if self.on_step is not None:
            self.on_step(step)

    def context(self, b: int, keep_cache: bool = False) -> tuple[torch.Tensor, ...]:
        """(F_base, F_sft, weights) of batch b, computed once.

        Without `keep_cache` the batch's KL reference is dropped: recomputed per phase rather than
        kept for every batch. A phase that goes on with the batch keeps it (no second expert run).
        """
        if b not in self.contexts:
            self.contexts[b] = batch_context(
                self.pair.base, self.pair.model, self.batches[b], self.utility, self.gap_floor
            )
            if not keep_cache:
                self.batches[b].cache.clear()
        return self.contexts[b]

    def gaps(self) -> list[dict[str, Any]]:
        start = time.perf_counter()
        rows = []
        for b in self.share:
            f_base, f_sft, weights = self.context(b)
            for key, fb, fs, w in zip(
                self.batches[b].keys, f_base.tolist(), f_sft.tolist(), weights.tolist()
            ):
                rows.append({"key": key, "f_base": fb, "f_sft": fs, "gap": fs - fb, "kept": w != 0})
        self.timings["gaps"] = time.perf_counter() - start
        return rows

    def gradient_phase(self, methods: list[str]) -> None:
        if not methods:
            return
        base, model = self.pair.base, self.pair.model
        start = time.perf_counter()
        for b in tqdm(self.share, desc=f"{self.label}: gradient pass", disable=self.quiet):
            step = f"grad/{b}"
            if step in self.ledger.done:
                continue
            batch = self.batches[b]
            if b in self.contexts:
                weights = self.contexts[b][2]
            else:  # the pass's own base forward gives F_base: no separate gap forward
                with torch.no_grad():
                    f_sft = self.utility(model, batch).double().cpu()
                weights = partial(gap_weights, f_sft=f_sft, gap_floor=self.gap_floor)
            out = gradient_pass(
                base,
                model,
                batch,
                self.utility,
                weights,
                "wp_attr" in methods,
                "ap_attr" in methods,
                self.deltas,
            )
            found = out.pop("utility")
            if b not in self.contexts:
                self.contexts[b] = (found["f_base"], f_sft, found["weights"])
            for method, values in out.items():
                for name, tensor in values.items():
                    self.ledger.total(f"{method}.{name}", tensor).add_(tensor)
            self._commit(step)
            batch.cache.clear()
        self.deltas.clear()
        self.timings["+".join(methods)] = time.perf_counter() - start

    def exact_plan(
        self, unit: str, granularity: GranularityConfig, wp_attr_neurons: torch.Tensor | None
    ) -> dict[int, list[int]]:
        """Layer -> units an exact sweep visits (only layers the utility can see)."""
        shape = self.pair.shape
        layers = range(self.stop + 1)
        if unit == "head":
            if not granularity.heads:
                return {}
            return {l: list(range(shape.num_attention_heads)) for l in layers}
        choice = granularity.exact_neurons
        if not granularity.neurons or choice == "none":
            return {}
        if choice == "all":
            return {l: list(range(shape.intermediate_size)) for l in layers}
        visible = wp_attr_neurons[: self.stop + 1].abs().flatten()
        top = torch.topk(visible, min(choice, visible.numel())).indices
        plan: dict[int, list[int]] = {}
        for flat in sorted(top.tolist()):
            plan.setdefault(flat // shape.intermediate_size, []).append(
                flat % shape.intermediate_size
            )
        return plan

    def exact_phase(self, method: str, plans: ExactPlan) -> None:
        base, model, shape = self.pair.base, self.pair.model, self.pair.shape
        start = time.perf_counter()
        work = [(b, u, l) for b in self.share for u, plan in plans.items() for l in plan]
        done = lambda b, u, l: f"{method}/{b}/{u}/{l}" in self.ledger.done
        # Progress in components (a layer of 8k neurons moves the bar as it goes), with an ETA.
        progress = tqdm(
            total=sum(len(plans[u][l]) for _, u, l in work),
            initial=sum(len(plans[u][l]) for b, u, l in work if done(b, u, l)),
            desc=f"{self.label}: exact {method}",
            unit="component",
            disable=self.quiet,
        )
        with progress:
            for b in self.share:
                todo = [(u, l) for u, plan in plans.items() for l in plan if not done(b, u, l)]
                if not todo:
                    continue
                batch = self.batches[b]
                _, _, weights = self.context(b, keep_cache=True)
                base_trace = trace(base, batch, self.stop)
                model_in = site_inputs(model, batch, self.stop) if method == "ap" else None
                for unit, layer in todo:
                    units = plans[unit][layer]
                    sums = layer_sums(
                        base,
                        model,
                        batch,
                        self.utility,
                        method,
                        unit,
                        layer,
                        units,
                        weights,
                        self.max_variant_rows,
                        base_trace,
                        model_in,
                        progress.update,
                    )
                    like = torch.zeros(shape.num_hidden_layers, shape.unit_count(unit))
                    self.ledger.total(f"{method}.{unit}", like)[layer, units] += sums
                    self._commit(f"{method}/{b}/{unit}/{layer}")
                batch.cache.clear()
        self.timings[method] = time.perf_counter() - start


def score_maps(
    pair: ModelPair,
    batches: Sequence[TokenBatch],
    utility: ReadoutUtility,
    methods: Sequence[MethodName],
    *,
    granularity: GranularityConfig | None = None,
    gap_floor: float,
    max_variant_rows: int = 64,
    exact_plans: ExactPlan | None = None,
    details: dict[str, Any] | None = None,
    share: Sequence[int] | None = None,
    ledger: RunState | None = None,
    collective: Collective = ONE_PROCESS,
    label: str = "scoring",
    quiet: bool = False,
    on_step: Callable[[str], None] | None = None,
) -> Scores:
    """Score `pair.model` against `pair.base` with each of `methods`; a `ScoreMap` per method.

    Scores are means over the examples whose gap |G(x)| reaches `gap_floor` (docs/method.md §3).
    `granularity` says which units the exact sweeps (wp, ap) visit; `exact_plans` names them
    outright (layer -> units per unit kind) instead. `details` are added to every map's own
    (what made it, deterministic). `share`, `ledger` and `collective` are for the pipeline's
    resumable, data-parallel runs; by default every batch runs here, in memory.
    """
    granularity = granularity or GranularityConfig()
    if (
        isinstance(granularity.exact_neurons, int)
        and "wp_attr" not in methods
        and exact_plans is None
    ):
        raise ValueError(
            "granularity.exact_neurons: K picks the top-K by WP-attr; add wp_attr to methods"
        )
    share = list(range(len(batches))) if share is None else list(share)
    run = _Run(
        pair,
        batches,
        utility,
        share,
        ledger or RunState(None, ""),
        gap_floor,
        max_variant_rows,
        label,
        quiet,
        on_step,
    )
    started = time.perf_counter()
    run.gradient_phase([m for m in ("wp_attr", "ap_attr") if m in methods])
    rows = run.gaps()
    kept = int(
        collective.sum(
            torch.tensor(float(sum(r["kept"] for r in rows)), dtype=torch.float64)
        ).item()
    )
    rows = collective.gather(rows)
    if kept == 0:
        raise ValueError(
            f"every one of {len(rows)} examples has |gap| below gap_floor={gap_floor}; "
            "the models do not differ under this utility (lower gap_floor or check the anchor)"
        )
    shape = pair.shape
    reduced = lambda name, like: collective.sum(run.ledger.total(name, like)) / kept
    heads_like = torch.zeros(shape.num_hidden_layers, shape.num_attention_heads)
    neurons_like = torch.zeros(shape.num_hidden_layers, shape.intermediate_size)
    about = {"utility": utility.name, "base_model": pair.base_name, "model": pair.model_name}
    common = {
        "dtype": str(next(pair.base.parameters()).dtype).removeprefix("torch."),
        "examples": len(rows),
        "kept_examples": kept,
        "skipped_examples": len(rows) - kept,
        "gap_floor": gap_floor,
        "stop_layer": run.stop,
        "note": "components after stop_layer cannot move the utility and score 0",
    } | (details or {})
    maps: dict[str, ScoreMap] = {}
    if "wp_attr" in methods:
        parts = {name: reduced(f"wp_attr.{name}", t) for name, t in empty_parts(shape).items()}
        maps["wp_attr"] = ScoreMap.from_parts(
            shape, parts, method="wp_attr", details=dict(common), **about
        )
    if "ap_attr" in methods:
        maps["ap_attr"] = ScoreMap.of(
            shape,
            reduced("ap_attr.heads", heads_like).float(),
            reduced("ap_attr.neurons", neurons_like).float(),
            method="ap_attr",
            details=dict(common),
            **about,
        )
    for method in ("wp", "ap"):
        if method not in methods:
            continue
        wp_attr_neurons = (
            unit_scores(parts)[1] if "wp_attr" in maps else None
        )  # fp64: ties as before
        plans = exact_plans or {
            u: run.exact_plan(u, granularity, wp_attr_neurons) for u in ("head", "neuron")
        }
        run.exact_phase(method, plans)
        counted = {
            "heads_scored": sum(len(v) for v in plans.get("head", {}).values()),
            "neurons_scored": sum(len(v) for v in plans.get("neuron", {}).values()),
        }
        maps[method] = ScoreMap.of(
            shape,
            reduced(f"{method}.head", heads_like).float(),
            reduced(f"{method}.neuron", neurons_like).float(),
            method=method,
            details=common | counted,
            **about,
        )
    run.timings["total"] = time.perf_counter() - started
    return Scores(maps, rows, kept, run.timings)
