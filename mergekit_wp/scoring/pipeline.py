"""`score(config)`: load the pair, build the utility and batches, run the methods, write the
outputs.

Data-parallel when launched by `torchrun` / `accelerate launch` (WORLD_SIZE > 1): batch `b` goes
to rank `b % world`, and score sums and counts are all-reduced. Every work unit is committed
to a per-rank state file, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mergekit_wp.components import ModelShape, load_shape
from mergekit_wp.generation import shared_tokenizer
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
from mergekit_wp.scoring.config import ScoringConfig, UtilityConfig
from mergekit_wp.scoring.engine import ModelPair, score_maps
from mergekit_wp.scoring.forward import weight_bytes
from mergekit_wp.scoring.inputs import load_examples, make_batches
from mergekit_wp.scoring.report import ScoreRun, write_outputs, write_stitched
from mergekit_wp.scoring.state import RunState
from mergekit_wp.scoring.utility import AnchorUtility, KLUtility, ReadoutUtility

log = logging.getLogger(__name__)


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
        raise ValueError(
            f"device: {device} was asked for, but CUDA is not available here; "
            "use device: cpu (or auto)"
        )
    if device == "cuda" and group.world > 1:
        device = f"cuda:{group.local_rank}"
    return device


def fit_anchor_file(config: ScoringConfig, base: nn.Module, sft: nn.Module, tokenizer) -> None:
    """Fit and save the configured anchor (all configured tasks pooled) if it does not exist."""
    from mergekit_wp.scoring.anchor import fit_anchor, save_anchor
    from mergekit_wp.scoring.data import load_paired, split_paired

    data, options = config.data, config.utility
    tokenizer = shared_tokenizer(tokenizer, base)  # the sweep also generates with the base
    extraction, evaluation = split_paired(
        load_paired(data.source, data.tasks), data.seed, data.extraction_fraction
    )
    anchor = fit_anchor(
        base,
        sft,
        tokenizer,
        extraction,
        evaluation[: options.sweep_examples],
        fixed_layer=options.fixed_layer,
        max_new_tokens=options.sweep_max_new_tokens,
        batch_size=config.batch_size,
        mode=options.sweep_mode,
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
            f"anchor file {config.utility.anchor}: vectors have shape "
            f"{list(anchor.vectors.shape)}, but the model needs {list(want)} (layers, hidden size)"
        )
    if config.utility.kind == "projection":
        layer = shape.num_hidden_layers - 1
        return AnchorUtility(layer, anchor.vectors[layer], name="projection")
    layer = anchor.layer if config.utility.layer is None else config.utility.layer
    if not 0 <= layer < shape.num_hidden_layers:
        raise ValueError(f"utility.layer={layer} is outside 0..{shape.num_hidden_layers - 1}")
    return AnchorUtility(layer, anchor.vectors[layer])


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def score(
    config: ScoringConfig, on_step: Callable[[str], None] | None = None, restart: bool = False
) -> ScoreRun:
    """Score `config.model` against `config.base` with every configured method; write the outputs.

    With `utility.downstream`, two runs (anchor utility in `<output>/upstream`, KL utility in
    `<output>/downstream`, each resumable) are stitched at l_a into the maps in `<output>`.
    The models and the output folder are checked first; the output folder is locked for the run.
    """
    for reference in (config.base, config.model):
        check_weights(check_model(resolve_model(reference)))
    check_output_dir(config.output_dir())
    with output_lock(config.output_dir()):
        return _score_stages(config, on_step, restart)


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


def _score_stages(
    config: ScoringConfig, on_step: Callable[[str], None] | None, restart: bool
) -> ScoreRun:
    if config.utility.downstream is None:
        return _score_one(config, on_step, restart)
    out = config.output_dir()
    upstream = _score_one(
        config.model_copy(
            update={
                "output": str(out / "upstream"),
                "utility": config.utility.model_copy(update={"downstream": None}),
            }
        ),
        on_step,
        restart,
        "upstream",
    )
    downstream = _score_one(
        config.model_copy(
            update={
                "output": str(out / "downstream"),
                "utility": UtilityConfig(kind=config.utility.downstream),
            }
        ),
        on_step,
        restart,
        "downstream",
    )
    if upstream.report_path is None:
        return upstream  # not rank 0 of a data-parallel run
    return write_stitched(config, upstream, downstream)


def _score_one(
    config: ScoringConfig,
    on_step: Callable[[str], None] | None,
    restart: bool,
    stage: str | None = None,
) -> ScoreRun:
    """Load the pair, fit the anchor if asked, build batches and run state, score, write
    (rank 0).
    """
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    group = _Group(config.device)
    device = resolve_device(config.device, group)
    # Resolved (and logged) once; both models load in it.
    config = config.model_copy(update={"dtype": resolve_dtype(config.dtype, device)})
    attention = (
        config.attn_implementation
        or load_shape(resolve_model(config.base)).family.attn_implementation
    )
    load = partial(
        load_model,
        dtype=config.dtype,
        device=device,
        attn_implementation=attention,
        device_map=config.device_map,
    )
    pair = ModelPair.of(
        load(config.base),
        load(config.model),
        config.base,
        config.model,
        "Weight Patching needs same-architecture models",
    )
    from transformers import AutoTokenizer

    # The specialized model's tokenizer carries the chat template; both models read the same x.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.model))
    timings = {"load": time.perf_counter() - started}
    if config.utility.fit and not Path(config.utility.anchor).is_file():
        start = time.perf_counter()
        if group.rank == 0:
            fit_anchor_file(config, pair.base, pair.model, tokenizer)
        group.barrier()
        timings["anchor_fit"] = time.perf_counter() - start
    utility = build_utility(config, pair.model, pair.shape, pair.vocab)
    start = time.perf_counter()
    examples = load_examples(config.data, tokenizer, pair.model, config.utility.kind == "kl")
    batches = make_batches(tokenizer, examples, config.batch_size)
    timings["data"] = time.perf_counter() - start
    settings = config.model_dump(exclude={"output", "top_k"})
    settings |= {
        "world": group.world,
        "rank": group.rank,
        "version": 1,
        "inputs": [config.utility.anchor and reference_fingerprint(config.utility.anchor)]
        + [reference_fingerprint(resolve_model(m)) for m in (config.base, config.model)],
    }
    state_path = config.output_dir() / ".state" / f"rank{group.rank}-of-{group.world}.pt"
    if restart:
        state_path.unlink(missing_ok=True)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    scores = score_maps(
        pair,
        batches,
        utility,
        config.methods,
        granularity=config.granularity,
        gap_floor=config.gap_floor,
        max_variant_rows=config.max_variant_rows,
        details={
            "data": config.data.model_dump(),
            "utility": config.utility.model_dump() | {"layer": utility.layer},
        },
        share=[b for b in range(len(batches)) if b % group.world == group.rank],
        ledger=RunState(state_path, settings_fingerprint(settings)),
        collective=group,
        label=f"scoring {stage}" if stage else "scoring",
        quiet=group.rank != 0,
        on_step=on_step,
    )
    timings |= scores.timings
    timings["total"] = time.perf_counter() - started
    peak = int(group.max(float(_peak_bytes(device))))
    if group.rank != 0:
        return ScoreRun({}, None, [])
    return write_outputs(
        config,
        scores.maps,
        scores.gaps,
        timings,
        peak,
        weight_bytes(pair.base),
        group.world,
        device.startswith("cuda"),
    )
