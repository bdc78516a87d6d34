"""Utilities F(M, x): per-example scalars every scoring method explains (docs/method.md §2, §6).

A utility is any callable `utility(model, batch) -> Tensor[B]` (differentiable under grad
mode), so the analyses can plug in their own (e.g. the "need" utility of §7). The ones here
also read from one decoder layer's output (`ReadoutUtility`), which lets exact sweeps share
the base's residual stream and stop the forward at that layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import nn

from mergekit_wp.scoring.forward import TokenBatch, forward_to, logits_from_hidden, model_shape


class Utility(Protocol):
    name: str

    def __call__(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor: ...


class ReadoutUtility(ABC):
    """A utility computed from the output of decoder layer `layer` (nothing later is needed)."""

    name: str
    layer: int
    last_position_only: bool = False  # reads index -1 of `layer` only (lets sweeps skip the rest)

    @abstractmethod
    def readout(self, model: nn.Module, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """`[V*B]` values from `hidden` `[V*B, T, d]`: V variants of the batch, variant-major."""

    def __call__(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        return self.readout(model, forward_to(model, batch, self.layer), batch)

    def stop_layer(self, model: nn.Module) -> int:
        return self.layer


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    # bf16/fp16 states are read in fp32; fp64 runs (tests) stay fp64.
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class AnchorUtility(ReadoutUtility):
    """F_a(M, x) = cos(z_{l_a}(x | M)[t_a], v), t_a = last token (index -1, left padding)."""

    last_position_only = True

    def __init__(self, layer: int, vector: torch.Tensor, name: str = "anchor") -> None:
        if vector.ndim != 1 or not torch.isfinite(vector).all() or vector.norm() == 0:
            raise ValueError(f"{name} utility: the direction must be a finite non-zero vector")
        self.layer, self.vector, self.name = layer, vector.detach(), name

    def readout(self, model: nn.Module, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        state = hidden[:, -1]
        dtype = compute_dtype(state)
        direction = self.vector.to(device=state.device, dtype=dtype)
        return torch.nn.functional.cosine_similarity(state.to(dtype), direction[None], dim=-1)


class KLUtility(ReadoutUtility):
    """F_down(M, x) = -mean_t KL(p_sft(.|x, y_<t) || p_M(.|x, y_<t)) over response positions.

    Log-probabilities over the vocabulary are computed `chunk_positions` response positions at a
    time: with a 128k vocabulary a whole batch of variants would take tens of GB, a chunk does
    not grow with the response length or the number of variants.
    """

    name = "kl"

    def __init__(
        self, sft: nn.Module, vocab: int | None = None, chunk_positions: int = 256
    ) -> None:
        if chunk_positions < 1:
            raise ValueError(f"KL utility: chunk_positions must be >= 1; got {chunk_positions}")
        self.sft = sft
        self.layer = model_shape(sft).num_hidden_layers - 1
        # Compare over the shared vocabulary when an expert added tokens (e.g. a pad token).
        self.vocab = vocab
        self.chunk_positions = chunk_positions

    def __call__(self, model: nn.Module, batch: TokenBatch) -> torch.Tensor:
        if model is not self.sft:
            return self.readout(model, forward_to(model, batch, self.layer), batch)
        # -KL(p_sft || p_sft) = 0 exactly; the expert's one forward of the batch is the reference.
        reference = self.reference(batch)
        return torch.zeros(len(batch), dtype=reference.dtype, device=reference.device)

    @torch.no_grad()
    def reference(self, batch: TokenBatch) -> torch.Tensor:
        """log p_sft at the batch's response positions `[N_r, vocab]`, computed once per batch."""
        if batch.response_mask is None:
            raise ValueError(
                "the KL utility needs batches with a response_mask (prompt + response)"
            )
        if "kl_reference" not in batch.cache:
            hidden = forward_to(self.sft, batch, self.layer)
            selected = hidden[batch.response_mask.to(hidden.device)]
            chunks = [
                self._log_probs(self.sft, selected[s : s + self.chunk_positions])
                for s in range(0, selected.shape[0], self.chunk_positions)
            ]
            batch.cache["kl_reference"] = torch.cat(chunks)
        return batch.cache["kl_reference"]

    def _log_probs(self, model: nn.Module, selected: torch.Tensor) -> torch.Tensor:
        logits = logits_from_hidden(model, selected)[..., : self.vocab]
        return torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)

    def readout(self, model: nn.Module, hidden: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        reference = self.reference(batch)
        times = hidden.shape[0] // len(batch)
        mask = batch.response_mask.to(hidden.device).repeat(times, 1)
        selected = hidden[mask]  # [times * N_r, d], variant-major like the mask
        kl = []
        for start in range(0, selected.shape[0], self.chunk_positions):
            log_p = self._log_probs(model, selected[start : start + self.chunk_positions])
            # Row i of the variants reads reference row i mod N_r.
            index = torch.arange(start, start + log_p.shape[0]) % reference.shape[0]
            log_ref = reference[index.to(reference.device)].to(log_p.device)
            kl.append((log_ref.exp() * (log_ref - log_p)).sum(-1))
        kl = torch.cat(kl) if kl else selected.new_zeros(0)  # [times * N_r]
        rows = mask.nonzero()[:, 0]
        total = torch.zeros(hidden.shape[0], dtype=kl.dtype, device=kl.device).index_add(
            0, rows, kl
        )
        count = torch.zeros_like(total).index_add(0, rows, torch.ones_like(kl))
        return -total / count.clamp_min(1)


@torch.no_grad()
def gaps(
    utility: Utility, base: nn.Module, sft: nn.Module, batch: TokenBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(F(M_base, x), F(M_sft, x))` per example, on the CPU in fp64."""
    return utility(base, batch).double().cpu(), utility(sft, batch).double().cpu()


def batch_context(
    base: nn.Module, sft: nn.Module, batch: TokenBatch, utility: Utility, gap_floor: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(F_base, F_sft, weights)` per example: weights are 1/G(x), 0 where |G(x)| < gap_floor."""
    f_base, f_sft = gaps(utility, base, sft, batch)
    return f_base, f_sft, gap_weights(f_base, f_sft, gap_floor)


def gap_weights(f_base: torch.Tensor, f_sft: torch.Tensor, gap_floor: float) -> torch.Tensor:
    """1/G(x) per example, G = F_sft - F_base; 0 (skipped) where |G(x)| < gap_floor."""
    gap = f_sft - f_base
    kept = gap.abs() >= gap_floor
    return torch.where(
        kept, 1.0 / torch.where(kept, gap, torch.ones_like(gap)), torch.zeros_like(gap)
    )
