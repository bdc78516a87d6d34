"""The vector anchor (docs/method.md §2): per-layer task vectors, input-adaptive steering, layer
sweep.

Task vectors come from the specialized model at the anchor position (the last token of the
chat-rendered prompt). The anchor layer is the layer whose steering best corrects the base
model's IFEval strict accuracy on held-out prompts (correction rate, paper Fig. 5).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mergekit_wp import generation
from mergekit_wp.checkers import ifeval_follows
from mergekit_wp.components import ModelShape
from mergekit_wp.io import atomic_file, atomic_write_text
from mergekit_wp.scoring.data import PairedExample, split_paired
from mergekit_wp.scoring.hooks import SteerMode, capture_residuals, steering

ANCHOR_FORMAT = "mergekit-wp-anchor"
ANCHOR_VERSION = "1"
SteerOn = Literal["inst", "rm"]


@dataclass(frozen=True)
class CorrectionRow:
    """Steering at one layer: IFEval strict accuracy of the steered base and its correction rate."""

    layer: int
    acc_steer: float
    correction_rate: float


@dataclass(frozen=True)
class CorrectionTable:
    """The layer sweep: base and specialized accuracies and one row per steered layer."""

    acc_base: float
    acc_inst: float
    num_examples: int
    rows: tuple[CorrectionRow, ...]
    mode: str = "anchor"
    steer_on: str = "inst"
    max_new_tokens: int = 0

    def best_layer(self) -> int:
        """argmax_l R(l); ranks by steered accuracy, which orders layers as R does when
        Acc_inst > Acc_base and stays defined when the gap is zero. Ties go to the earlier layer."""
        if not self.rows:
            raise ValueError("correction table has no rows")
        return max(self.rows, key=lambda r: (r.acc_steer, -r.layer)).layer

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CorrectionTable:
        data = json.loads(text)
        data["rows"] = tuple(CorrectionRow(**row) for row in data["rows"])
        return cls(**data)


@dataclass
class Anchor:
    """Per-layer task vectors `[L, d]`, λ̄ per layer `[L]`, the chosen layer and its sweep."""

    layer: int
    vectors: torch.Tensor
    lambda_bar: torch.Tensor
    task: str | None = None
    table: CorrectionTable | None = None
    num_extraction: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def vector(self) -> torch.Tensor:
        """The task vector v = v^(l_a)."""
        return self.vectors[self.layer]

    @property
    def unit(self) -> torch.Tensor:
        """v̂ = v / ||v||."""
        return self.vector / self.vector.norm()

    @property
    def target(self) -> float:
        """λ̄ at the anchor layer: the mean projection of instructed specialized states on v̂."""
        return float(self.lambda_bar[self.layer])

    def steer(
        self,
        model: nn.Module,
        shape: ModelShape,
        layer: int | None = None,
        mode: SteerMode = "anchor",
    ) -> AbstractContextManager[None]:
        """Context manager steering `model` with this anchor's vector at `layer` (default l_a)."""
        layer = self.layer if layer is None else layer
        target = float(self.lambda_bar[layer])
        return steering(model, shape, layer, self.vectors[layer], target, mode)


def _render(tokenizer, texts: Sequence[str]) -> list[str]:
    return [generation.render_chat(tokenizer, text) for text in texts]


@torch.no_grad()
def _mean_anchor_states(
    model: nn.Module,
    shape: ModelShape,
    tokenizer,
    texts: Sequence[str],
    batch_size: int,
    desc: str,
) -> torch.Tensor:
    """mean_i z_l(x_i | model) at the anchor position, all layers at once: `[L, d]` in fp64."""
    device = next(model.parameters()).device
    total = torch.zeros(shape.num_hidden_layers, shape.hidden_size, dtype=torch.float64)
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False):
        chunk = list(texts[start : start + batch_size])
        batch = generation.encode_left_padded(tokenizer, chunk, device)
        states = capture_residuals(model, shape, *batch)
        # Left padding: the anchor position (last prompt token) is index -1 of every row.
        anchor = torch.stack([states[l][:, -1] for l in range(shape.num_hidden_layers)], 1)
        total += anchor.double().sum(0).cpu()
    return total / len(texts)


def task_vectors(
    sft: nn.Module,
    tokenizer,
    examples: Sequence[PairedExample],
    batch_size: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(v [L, d], λ̄ [L])` from the specialized model on chat-rendered paired prompts (fp32).

    v^(l) = mean_i [z_l(x_inst) - z_l(x_rm)]; λ̄^(l) = mean_i <z_l(x_inst), v̂^(l)>, computed as
    the projection of the mean, since the projection is linear.
    """
    if not examples:
        raise ValueError("task_vectors needs at least one paired example")
    shape = ModelShape.from_config(sft.config)
    inst = _mean_anchor_states(
        sft,
        shape,
        tokenizer,
        _render(tokenizer, [e.prompt for e in examples]),
        batch_size,
        "anchor: instructed",
    )
    removed = _mean_anchor_states(
        sft,
        shape,
        tokenizer,
        _render(tokenizer, [e.prompt_without_instruction for e in examples]),
        batch_size,
        "anchor: instruction removed",
    )
    vectors = inst - removed
    units = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    lambda_bar = (inst * units).sum(-1)
    return vectors.float(), lambda_bar.float()


def _check_pad_in_vocab(model: nn.Module, tokenizer, role: str) -> None:
    rows = model.get_input_embeddings().num_embeddings
    pad = generation.pad_token_id(tokenizer)
    if pad >= rows:
        raise ValueError(
            f"the tokenizer's pad id {pad} is outside the {role} model's vocabulary ({rows} rows); "
            "pass that model's own tokenizer (base_tokenizer= for the base model)"
        )


def correction_rate(acc_steer: float, acc_base: float, acc_inst: float) -> float:
    """R = (Acc_steer - Acc_base) / (Acc_inst - Acc_base); NaN when the two models tie."""
    gap = acc_inst - acc_base
    return (acc_steer - acc_base) / gap if gap != 0 else math.nan


def ifeval_accuracy(responses: Sequence[str], examples: Sequence[PairedExample]) -> float:
    """IFEval prompt-level strict accuracy (lm-eval's checkers) of responses to `examples`."""
    if len(responses) != len(examples) or not examples:
        raise ValueError(f"got {len(responses)} responses for {len(examples)} examples")
    hits = [
        ifeval_follows(r, e.instruction_id_list, e.kwargs, e.prompt)
        for r, e in zip(responses, examples)
    ]
    return sum(hits) / len(hits)


def correction_sweep(
    base: nn.Module,
    sft: nn.Module,
    tokenizer,
    evaluation: Sequence[PairedExample],
    vectors: torch.Tensor,
    lambda_bar: torch.Tensor,
    layers: Sequence[int] | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    mode: SteerMode = "anchor",
    steer_on: SteerOn = "inst",
    base_tokenizer=None,
) -> CorrectionTable:
    """Greedy generation on held-out prompts: base, specialized, and base steered at each layer.

    Acc_base and Acc_inst are measured on the instructed prompts. `steer_on="inst"` (default)
    steers the base on the same instructed prompts, so R is the fraction of the base-to-instruct
    gap that steering closes; `"rm"` steers the instruction-removed prompts (Stolfo et al.'s
    "steering without the instruction"), still checked against the instruction. Prompts are
    rendered by `tokenizer` for both models; `base_tokenizer` encodes them for the base when its
    vocabulary differs (e.g. the specialized model added a pad token).
    """
    base_tokenizer = tokenizer if base_tokenizer is None else base_tokenizer
    _check_pad_in_vocab(sft, tokenizer, "specialized")
    _check_pad_in_vocab(base, base_tokenizer, "base")
    if steer_on not in ("inst", "rm"):
        raise ValueError(f"steer_on must be 'inst' or 'rm'; got {steer_on!r}")
    shape = ModelShape.from_config(base.config)
    layers = list(range(shape.num_hidden_layers)) if layers is None else list(layers)
    inst_prompts = _render(tokenizer, [e.prompt for e in evaluation])
    steer_prompts = (
        inst_prompts
        if steer_on == "inst"
        else _render(tokenizer, [e.prompt_without_instruction for e in evaluation])
    )

    def accuracy(model: nn.Module, prompts: list[str]) -> float:
        tok = tokenizer if model is sft else base_tokenizer
        responses = generation.generate(model, tok, prompts, max_new_tokens, batch_size)
        return ifeval_accuracy(responses, evaluation)

    acc_base = accuracy(base, inst_prompts)
    acc_inst = accuracy(sft, inst_prompts)
    rows = []
    for layer in tqdm(layers, desc="anchor: steering sweep"):
        with steering(base, shape, layer, vectors[layer], float(lambda_bar[layer]), mode):
            acc = accuracy(base, steer_prompts)
        rows.append(CorrectionRow(layer, acc, correction_rate(acc, acc_base, acc_inst)))
    return CorrectionTable(
        acc_base, acc_inst, len(evaluation), tuple(rows), mode, steer_on, max_new_tokens
    )


def fit_anchor(
    base: nn.Module,
    sft: nn.Module,
    tokenizer,
    extraction: Sequence[PairedExample],
    evaluation: Sequence[PairedExample] = (),
    layers: Sequence[int] | None = None,
    fixed_layer: int | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 16,
    mode: SteerMode = "anchor",
    steer_on: SteerOn = "inst",
    task: str | None = None,
    base_tokenizer=None,
) -> Anchor:
    """Task vectors from `sft` on `extraction`, then l_a by the sweep on `evaluation` (or fixed)."""
    shape = ModelShape.from_config(sft.config)
    base_shape = ModelShape.from_config(base.config)
    if (base_shape.num_hidden_layers, base_shape.hidden_size) != (
        shape.num_hidden_layers,
        shape.hidden_size,
    ):
        raise ValueError("base and specialized models differ in layer count or hidden size")
    overlap = {e.key for e in extraction} & {e.key for e in evaluation}
    if overlap:
        raise ValueError(
            f"extraction and evaluation splits share {len(overlap)} key(s), "
            f"e.g. {sorted(overlap, key=str)[:3]}; use split_paired"
        )
    vectors, lambda_bar = task_vectors(sft, tokenizer, extraction, batch_size)
    if task is None:
        names = sorted({e.task for e in extraction})
        task = names[0] if len(names) == 1 else ",".join(names)
    if fixed_layer is not None:
        if not 0 <= fixed_layer < shape.num_hidden_layers:
            raise ValueError(
                f"fixed_layer={fixed_layer} is outside 0..{shape.num_hidden_layers - 1}"
            )
        return Anchor(fixed_layer, vectors, lambda_bar, task, None, len(extraction))
    if not evaluation:
        raise ValueError("the layer sweep needs evaluation examples (or give fixed_layer)")
    table = correction_sweep(
        base,
        sft,
        tokenizer,
        evaluation,
        vectors,
        lambda_bar,
        layers,
        max_new_tokens,
        batch_size,
        mode,
        steer_on,
        base_tokenizer,
    )
    return Anchor(table.best_layer(), vectors, lambda_bar, task, table, len(extraction))


def save_anchor(path: str | Path, anchor: Anchor) -> None:
    """Write the anchor as safetensors (vectors, lambda_bar; the rest in metadata), atomically."""
    path = Path(path)
    metadata = {
        "format": ANCHOR_FORMAT,
        "version": ANCHOR_VERSION,
        "layer": str(anchor.layer),
        "task": anchor.task or "",
        "num_extraction": str(anchor.num_extraction),
        "table": anchor.table.to_json() if anchor.table is not None else "",
        "extra": json.dumps(anchor.extra),
    }
    tensors = {
        "vectors": anchor.vectors.detach().float().cpu().contiguous(),
        "lambda_bar": anchor.lambda_bar.detach().float().cpu().contiguous(),
    }
    _check(str(path), anchor.layer, tensors["vectors"], tensors["lambda_bar"])
    atomic_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _check(where: str, layer: int, vectors: torch.Tensor, lambda_bar: torch.Tensor) -> None:
    if vectors.ndim != 2:
        raise ValueError(
            f"{where}: tensor 'vectors' must be [layers, d_model]; got {list(vectors.shape)}"
        )
    if lambda_bar.shape != (vectors.shape[0],):
        raise ValueError(
            f"{where}: tensor 'lambda_bar' must be [{vectors.shape[0]}] (one per layer); "
            f"got {list(lambda_bar.shape)}"
        )
    if not 0 <= layer < vectors.shape[0]:
        raise ValueError(f"{where}: anchor layer {layer} is outside 0..{vectors.shape[0] - 1}")


def load_anchor(path: str | Path) -> Anchor:
    """Read an anchor file written by `save_anchor`; ValueError naming the file on any defect."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"anchor file {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: not a readable safetensors anchor file ({error})") from None
    if metadata.get("format") != ANCHOR_FORMAT:
        raise ValueError(
            f"{path}: metadata format is {metadata.get('format')!r}, expected {ANCHOR_FORMAT!r}; "
            "write anchors with mergekit_wp.scoring.anchor.save_anchor"
        )
    if metadata.get("version") != ANCHOR_VERSION:
        raise ValueError(
            f"{path}: anchor version {metadata.get('version')!r} is not {ANCHOR_VERSION!r}"
        )
    missing = [name for name in ("vectors", "lambda_bar") if name not in tensors]
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing)}")
    try:
        layer = int(metadata["layer"])
        table = CorrectionTable.from_json(metadata["table"]) if metadata.get("table") else None
        extra = json.loads(metadata.get("extra") or "{}")
        num_extraction = int(metadata.get("num_extraction", "0"))
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: malformed anchor metadata ({error!r})") from None
    _check(str(path), layer, tensors["vectors"], tensors["lambda_bar"])
    return Anchor(
        layer,
        tensors["vectors"],
        tensors["lambda_bar"],
        metadata.get("task") or None,
        table,
        num_extraction,
        extra,
    )


def plot_correction_rates(tables: Mapping[str, CorrectionTable], path: str | Path) -> None:
    """Correction rate by steering layer, one line per task, the chosen layer marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for task, table in tables.items():
        xs = [row.layer for row in table.rows]
        ys = [row.correction_rate for row in table.rows]
        tie = table.acc_inst == table.acc_base
        undefined = " (R undefined: Acc_inst = Acc_base)" if tie else ""
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=task + undefined)
        best = table.best_layer()
        best_row = next(r for r in table.rows if r.layer == best)
        ax.plot([best], [best_row.correction_rate], "*", markersize=12, color=line.get_color())
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.axhline(1, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("steering layer")
    ax.set_ylabel("correction rate R")
    ax.set_title("Layer-wise recovery under task-vector steering")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_file(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def format_table(tables: Mapping[str, CorrectionTable]) -> str:
    """A markdown table: one row per task, Acc_base, Acc_inst, l_a, R(l_a) and R per layer."""
    layers = sorted({row.layer for table in tables.values() for row in table.rows})
    head = ["task", "n", "Acc_base", "Acc_inst", "l_a", "R(l_a)"] + [f"R{l}" for l in layers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, table in tables.items():
        rates = {row.layer: row.correction_rate for row in table.rows}
        best = table.best_layer()
        cells = [
            task,
            str(table.num_examples),
            f"{table.acc_base:.3f}",
            f"{table.acc_inst:.3f}",
            str(best),
            f"{rates[best]:.2f}",
        ]
        cells += [f"{rates.get(l, math.nan):.2f}" for l in layers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_task_anchors(
    base: nn.Module,
    sft: nn.Module,
    tokenizer,
    examples: Sequence[PairedExample],
    out_dir: str | Path,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    **fit_options,
) -> dict[str, Anchor]:
    """One anchor per task (the paper's setting): split, fit, and write
    `anchor-<task>.safetensors`, `correction_rates.png` and `correction_rates.md` in `out_dir`."""
    out_dir = Path(out_dir)
    tasks = sorted({e.task for e in examples}) if tasks is None else list(tasks)
    anchors: dict[str, Anchor] = {}
    for task in tasks:
        extraction, evaluation = split_paired([e for e in examples if e.task == task], seed)
        if not extraction:
            raise ValueError(f"no paired examples of task {task!r}")
        anchors[task] = fit_anchor(
            base, sft, tokenizer, extraction, evaluation, task=task, **fit_options
        )
        save_anchor(out_dir / f"anchor-{task}.safetensors", anchors[task])
    tables = {task: a.table for task, a in anchors.items() if a.table is not None}
    if tables:
        plot_correction_rates(tables, out_dir / "correction_rates.png")
        text = format_table(tables) + "\n"
        atomic_write_text(out_dir / "correction_rates.md", text)
    return anchors
