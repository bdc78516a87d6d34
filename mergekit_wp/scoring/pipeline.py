"""`score(config)`: load the pair, build the utility and batches, run the methods, write the outputs.

Data-parallel when launched by `torchrun` / `accelerate launch` (WORLD_SIZE > 1): batch `b` goes
to rank `b % world`, and score sums and counts are all-reduced. Every work unit is committed
to a per-rank state file, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from mergekit_wp.components import ModelShape
from mergekit_wp.io import (
    check_model,
    check_output_dir,
    check_weights,
    load_model,
    reference_fingerprint,
    resolve_dtype,
    resolve_model,
    settings_fingerprint,
)
from mergekit_wp.scoremap import ScoreMap
from mergekit_wp.scoring.attribution import empty_parts, gradient_pass
from mergekit_wp.scoring.config import ScoringConfig, UtilityConfig
from mergekit_wp.scoring.exact import layer_sums
from mergekit_wp.scoring.forward import TokenBatch, site_inputs, trace, weight_bytes
from mergekit_wp.scoring.inputs import load_examples, make_batches
from mergekit_wp.scoring.state import RunState
from mergekit_wp.scoring.utility import (
    AnchorUtility,
    KLUtility,
    ReadoutUtility,
    batch_context,
    gap_weights,
)

log = logging.getLogger(__name__)

@dataclass
class ScoreRun:
    """What a scoring run wrote (rank 0) and its report."""

    maps: dict[str, Path]
    report_path: Path | None
    pictures: list[Path]
    report: dict[str, Any] = field(default_factory=dict)


class _Group:
    """This process's place in a data-parallel run (a group of one without torch.distributed)."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # NCCL reduces CUDA tensors only; gloo (CPU runs, the tests) reduces CPU tensors.
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        self.comm_device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.comm_device)
            dist.init_process_group("nccl" if cuda else "gloo")

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            tensor = tensor.to(self.comm_device, copy=True)
            dist.all_reduce(tensor)
            tensor = tensor.cpu()
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def max(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def gather(self, items: list) -> list:
        if self.world == 1:
            return items
        out: list[list] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]


def resolve_device(device: str, group: _Group) -> str:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device} was asked for, but CUDA is not available here; "
                         "use device: cpu (or auto)")
    if device == "cuda" and group.world > 1:
        device = f"cuda:{group.local_rank}"
    return device


def fit_anchor_file(config: ScoringConfig, base: nn.Module, sft: nn.Module, tokenizer) -> None:
    """Fit and save the configured anchor (all configured tasks pooled) if it does not exist."""
    from mergekit_wp.scoring.anchor import fit_anchor, save_anchor
    from mergekit_wp.scoring.data import load_paired, split_paired

    data, options = config.data, config.utility
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id >= base.get_input_embeddings().weight.shape[0]:
        # The expert added a pad token the base lacks (zoo instruct); the sweep also generates
        # with the base, so pad with eos (padding is masked; any in-vocabulary id serves).
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.pad_token = tokenizer.eos_token
    extraction, evaluation = split_paired(load_paired(data.source, data.tasks), data.seed,
                                          data.extraction_fraction)
    anchor = fit_anchor(
        base, sft, tokenizer, extraction, evaluation[: options.sweep_examples],
        fixed_layer=options.fixed_layer, max_new_tokens=options.sweep_max_new_tokens,
        batch_size=config.batch_size, mode=options.sweep_mode,
    )
    save_anchor(options.anchor, anchor)
    log.info("anchor fitted at layer %d and saved to %s", anchor.layer, options.anchor)


def build_utility(
    config: ScoringConfig, sft: nn.Module, shape: ModelShape, vocab: int | None = None
) -> ReadoutUtility:
    """The configured utility, checked against the model's shape."""
    if config.utility.kind == "kl":
        return KLUtility(sft, vocab, config.kl_chunk_positions)
    from mergekit_wp.scoring.anchor import load_anchor

    anchor = load_anchor(config.utility.anchor)
    want = (shape.num_hidden_layers, shape.hidden_size)
    if tuple(anchor.vectors.shape) != want:
        raise ValueError(
            f"anchor file {config.utility.anchor}: vectors have shape {list(anchor.vectors.shape)}, "
            f"but the model needs {list(want)} (layers, hidden size)"
        )
    if config.utility.kind == "projection":
        layer = shape.num_hidden_layers - 1
        return AnchorUtility(layer, anchor.vectors[layer], name="projection")
    layer = anchor.layer if config.utility.layer is None else config.utility.layer
    if not 0 <= layer < shape.num_hidden_layers:
        raise ValueError(f"utility.layer={layer} is outside 0..{shape.num_hidden_layers - 1}")
    return AnchorUtility(layer, anchor.vectors[layer])


def _check_pair(base_shape: ModelShape, shape: ModelShape, config: ScoringConfig) -> None:
    for key in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "hidden_size", "intermediate_size"):
        if getattr(base_shape, key) != getattr(shape, key):
            raise ValueError(
                f"base {config.base} has {key}={getattr(base_shape, key)} but model {config.model} "
                f"has {getattr(shape, key)}; Weight Patching needs same-architecture models"
            )


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class _Scorer:
    """One run: shared models, batches and state; a phase per family of methods."""

    def __init__(self, config: ScoringConfig, on_unit: Callable[[str], None] | None, restart: bool,
                 stage: str | None = None) -> None:
        self.config, self.on_unit = config, on_unit
        self.label = f"scoring {stage}" if stage else "scoring"  # progress bars of a stitched run
        if config.threads:
            torch.set_num_threads(config.threads)
        self.group = _Group(config.device)
        self.device = resolve_device(config.device, self.group)
        self.timings: dict[str, float] = {}
        start = time.perf_counter()
        # Resolved (and logged) once; both models load in it.
        config = config.model_copy(update={"dtype": resolve_dtype(config.dtype, self.device)})
        load = partial(load_model, dtype=config.dtype, device=self.device,
                       attn_implementation=config.attn_implementation, device_map=config.device_map)
        self.base, self.sft = load(config.base), load(config.model)
        self.shape = ModelShape.from_config(self.sft.config)
        _check_pair(ModelShape.from_config(self.base.config), self.shape, config)
        from transformers import AutoTokenizer

        # The specialized model's tokenizer carries the chat template; both models read the same x.
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
        self.timings["load"] = time.perf_counter() - start
        if config.utility.fit and not Path(config.utility.anchor).is_file():
            start = time.perf_counter()
            if self.group.rank == 0:
                fit_anchor_file(config, self.base, self.sft, self.tokenizer)
            self.group.barrier()
            self.timings["anchor_fit"] = time.perf_counter() - start
        vocab = min(self.shape.vocab_size, self.base.get_output_embeddings().weight.shape[0])
        self.utility = build_utility(config, self.sft, self.shape, vocab)
        self.stop = self.utility.stop_layer(self.base)
        start = time.perf_counter()
        examples = load_examples(config.data, self.tokenizer, self.sft, config.utility.kind == "kl")
        self.batches = make_batches(self.tokenizer, examples, config.batch_size)
        self.mine = [b for b in range(len(self.batches)) if b % self.group.world == self.group.rank]
        self.timings["data"] = time.perf_counter() - start
        settings = config.model_dump(exclude={"output", "top_k"})
        settings |= {"world": self.group.world, "rank": self.group.rank, "version": 1,
                     "inputs": [config.utility.anchor and reference_fingerprint(config.utility.anchor)]
                     + [reference_fingerprint(resolve_model(m)) for m in (config.base, config.model)]}
        state_path = config.output_dir() / ".state" / f"rank{self.group.rank}-of-{self.group.world}.pt"
        if restart:
            state_path.unlink(missing_ok=True)
        self.state = RunState(state_path, settings_fingerprint(settings))
        self.contexts: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.deltas: dict[str, torch.Tensor] = {}  # Δθ per scored tensor, computed once per run

    def _commit(self, unit: str) -> None:
        self.state.commit(unit)
        if self.on_unit is not None:
            self.on_unit(unit)

    def batch(self, b: int) -> TokenBatch:
        return self.batches[b]

    def context(self, b: int, keep_cache: bool = False) -> tuple[torch.Tensor, ...]:
        """(F_base, F_sft, weights) of batch b, computed once.

        Without `keep_cache` the batch's KL reference is dropped: recomputed per phase rather than
        kept for every batch. A phase that goes on with the batch keeps it (no second expert run).
        """
        if b not in self.contexts:
            self.contexts[b] = batch_context(self.base, self.sft, self.batch(b), self.utility,
                                             self.config.gap_floor)
            if not keep_cache:
                self.batch(b).cache.clear()
        return self.contexts[b]

    def gaps(self) -> list[dict[str, Any]]:
        start = time.perf_counter()
        rows = []
        for b in self.mine:
            f_base, f_sft, weights = self.context(b)
            for key, fb, fs, w in zip(self.batch(b).keys, f_base.tolist(), f_sft.tolist(), weights.tolist()):
                rows.append({"key": key, "f_base": fb, "f_sft": fs, "gap": fs - fb, "kept": w != 0})
        self.timings["gaps"] = time.perf_counter() - start
        return rows

    def gradient_phase(self) -> None:
        methods = [m for m in ("wp_attr", "ap_attr") if m in self.config.methods]
        if not methods:
            return
        start = time.perf_counter()
        for b in tqdm(self.mine, desc=f"{self.label}: gradient pass", disable=self.group.rank != 0):
            unit = f"grad/{b}"
            if unit in self.state.done:
                continue
            if b in self.contexts:
                weights = self.contexts[b][2]
            else:  # the pass's own base forward gives F_base: no separate gap forward
                with torch.no_grad():
                    f_sft = self.utility(self.sft, self.batch(b)).double().cpu()
                weights = partial(gap_weights, f_sft=f_sft, gap_floor=self.config.gap_floor)
            out = gradient_pass(self.base, self.sft, self.batch(b), self.utility, weights,
                                "wp_attr" in methods, "ap_attr" in methods, self.deltas)
            found = out.pop("utility")
            if b not in self.contexts:
                self.contexts[b] = (found["f_base"], f_sft, found["weights"])
            for method, values in out.items():
                for name, tensor in values.items():
                    self.state.total(f"{method}.{name}", tensor).add_(tensor)
            self._commit(unit)
            self.batch(b).cache.clear()
        self.deltas.clear()
        self.timings["+".join(methods)] = time.perf_counter() - start

    def exact_plan(self, unit: str, wp_attr_neurons: torch.Tensor | None) -> dict[int, list[int]]:
        """Layer -> units an exact sweep visits (only layers the utility can see)."""
        layers = range(self.stop + 1)
        if unit == "head":
            if not self.config.granularity.heads:
                return {}
            return {l: list(range(self.shape.num_attention_heads)) for l in layers}
        choice = self.config.granularity.exact_neurons
        if not self.config.granularity.neurons or choice == "none":
            return {}
        if choice == "all":
            return {l: list(range(self.shape.intermediate_size)) for l in layers}
        visible = wp_attr_neurons[: self.stop + 1].abs().flatten()
        top = torch.topk(visible, min(choice, visible.numel())).indices
        plan: dict[int, list[int]] = {}
        for flat in sorted(top.tolist()):
            plan.setdefault(flat // self.shape.intermediate_size, []).append(flat % self.shape.intermediate_size)
        return plan

    def exact_phase(self, method: str, plans: dict[str, dict[int, list[int]]]) -> None:
        start = time.perf_counter()
        work = [(b, u, l) for b in self.mine for u, plan in plans.items() for l in plan]
        done = lambda b, u, l: f"{method}/{b}/{u}/{l}" in self.state.done
        # Progress in components (a layer of 8k neurons moves the bar as it goes), with an ETA.
        progress = tqdm(total=sum(len(plans[u][l]) for _, u, l in work),
                        initial=sum(len(plans[u][l]) for b, u, l in work if done(b, u, l)),
                        desc=f"{self.label}: exact {method}", unit="component",
                        disable=self.group.rank != 0)
        with progress:
            for b in self.mine:
                todo = [(u, l) for u, plan in plans.items() for l in plan if not done(b, u, l)]
                if not todo:
                    continue
                batch = self.batch(b)
                _, _, weights = self.context(b, keep_cache=True)
                base_trace = trace(self.base, batch, self.stop)
                sft_in = site_inputs(self.sft, batch, self.stop) if method == "ap" else None
                for unit, layer in todo:
                    units = plans[unit][layer]
                    sums = layer_sums(self.base, self.sft, batch, self.utility, method, unit, layer, units,
                                      weights, self.config.max_variant_rows, base_trace, sft_in,
                                      progress.update)
                    count = self.shape.unit_count(unit)
                    total = self.state.total(f"{method}.{unit}", torch.zeros(self.shape.num_hidden_layers, count))
                    total[layer, units] += sums
                    self._commit(f"{method}/{b}/{unit}/{layer}")
                batch.cache.clear()
        self.timings[method] = time.perf_counter() - start

    def reduced(self, name: str, like: torch.Tensor) -> torch.Tensor:
        return self.group.sum(self.state.total(name, like))


def score(config: ScoringConfig, on_unit: Callable[[str], None] | None = None,
          restart: bool = False) -> ScoreRun:
    """Score `config.model` against `config.base` with every configured method; write the outputs.

    With `utility.downstream`, two runs (anchor utility in `<output>/upstream`, KL utility in
    `<output>/downstream`, each resumable) are stitched at l_a into the maps in `<output>`.
    The models and the output folder are checked first; the output folder is locked for the run.
    """
    for reference in (config.base, config.model):
        check_weights(check_model(resolve_model(reference)))
    check_output_dir(config.output_dir())
    with output_lock(config.output_dir()):
        return _score_stages(config, on_unit, restart)


@contextlib.contextmanager
def output_lock(folder: Path) -> Iterator[None]:
    """Hold `<folder>/.lock` (rank 0): a second run on the folder fails at once, naming the first.

    Two runs on one folder would interleave their resume state and the last writer would win.
    The lock is the kernel's (flock), so it is released when its holder dies, even by kill -9.
    """
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel: rank 0 holds it for the launch
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ValueError(
                f"output folder {folder} is in use by another scoring run (pid {holder}, lock "
                f"file {path}); wait for it to finish, or give this run another output"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield


def _score_stages(config: ScoringConfig, on_unit: Callable[[str], None] | None,
                  restart: bool) -> ScoreRun:
    if config.utility.downstream is None:
        return _score_one(config, on_unit, restart)
    from mergekit_wp.scoring.report import write_stitched

    out = config.output_dir()
    upstream = _score_one(config.model_copy(update={
        "output": str(out / "upstream"), "utility": config.utility.model_copy(update={"downstream": None}),
    }), on_unit, restart, "upstream")
    downstream = _score_one(config.model_copy(update={
        "output": str(out / "downstream"), "utility": UtilityConfig(kind=config.utility.downstream),
    }), on_unit, restart, "downstream")
    if upstream.report_path is None:
        return upstream  # not rank 0 of a data-parallel run
    return write_stitched(config, upstream, downstream)


def _score_one(config: ScoringConfig, on_unit: Callable[[str], None] | None, restart: bool,
               stage: str | None = None) -> ScoreRun:
    from mergekit_wp.scoring.report import write_outputs

    started = time.perf_counter()
    scorer = _Scorer(config, on_unit, restart, stage)
    if scorer.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    scorer.gradient_phase()
    rows = scorer.gaps()
    kept = scorer.group.sum(torch.tensor(float(sum(r["kept"] for r in rows)), dtype=torch.float64))
    count = int(kept.item())
    rows = scorer.group.gather(rows)
    if count == 0:
        raise ValueError(
            f"every one of {len(rows)} examples has |gap| below gap_floor={config.gap_floor}; "
            "the models do not differ under this utility (lower gap_floor or check the anchor)"
        )
    shape = scorer.shape
    heads_like = torch.zeros(shape.num_hidden_layers, shape.num_attention_heads)
    neurons_like = torch.zeros(shape.num_hidden_layers, shape.intermediate_size)
    scores: dict[str, dict[str, torch.Tensor]] = {}
    if "wp_attr" in config.methods:
        parts = {name: scorer.reduced(f"wp_attr.{name}", t) / count for name, t in empty_parts(shape).items()}
        scores["wp_attr"] = {"heads": parts["q"] + parts["o"],
                             "neurons": parts["gate"] + parts["up"] + parts["down"], **parts}
    if "ap_attr" in config.methods:
        scores["ap_attr"] = {"heads": scorer.reduced("ap_attr.heads", heads_like) / count,
                             "neurons": scorer.reduced("ap_attr.neurons", neurons_like) / count}
    plans = {}
    for method in ("wp", "ap"):
        if method not in config.methods:
            continue
        wp_attr_neurons = scores.get("wp_attr", {}).get("neurons")
        plans[method] = {u: scorer.exact_plan(u, wp_attr_neurons) for u in ("head", "neuron")}
        scorer.exact_phase(method, plans[method])
        scores[method] = {"heads": scorer.reduced(f"{method}.head", heads_like) / count,
                          "neurons": scorer.reduced(f"{method}.neuron", neurons_like) / count}
    scorer.timings["total"] = time.perf_counter() - started
    peak = int(scorer.group.max(float(_peak_bytes(scorer.device))))
    if scorer.group.rank != 0:
        return ScoreRun({}, None, [])
    maps = {}
    for method, values in scores.items():
        details = _details(scorer, method, plans.get(method), len(rows), count)
        maps[method] = ScoreMap.zeros(
            shape, method=method, utility=scorer.utility.name, base_model=config.base, model=config.model,
            details=details,
        )
        maps[method].heads, maps[method].neurons = values["heads"].float(), values["neurons"].float()
        maps[method].parts = {k: v.float() for k, v in values.items() if k not in ("heads", "neurons")}
    return write_outputs(config, maps, rows, scorer.timings, peak, weight_bytes(scorer.base),
                         scorer.group.world, scorer.device.startswith("cuda"))


def _details(scorer: _Scorer, method: str, plan: dict[str, dict[int, list[int]]] | None,
             examples: int, kept: int) -> dict[str, Any]:
    """What made a map (deterministic: no timings, so repeated runs give identical files)."""
    config = scorer.config
    details: dict[str, Any] = {
        "data": config.data.model_dump(),
        "utility": config.utility.model_dump() | {"layer": scorer.utility.layer},
        "dtype": str(next(scorer.base.parameters()).dtype).removeprefix("torch."),
        "examples": examples,
        "kept_examples": kept,
        "skipped_examples": examples - kept,
        "gap_floor": config.gap_floor,
        "stop_layer": scorer.stop,
        "note": "components after stop_layer cannot move the utility and score 0",
    }
    if plan is not None:
        details["heads_scored"] = sum(len(v) for v in plan["head"].values())
        details["neurons_scored"] = sum(len(v) for v in plan["neuron"].values())
    return details
