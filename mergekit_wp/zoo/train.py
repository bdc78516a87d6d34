"""Deterministic CPU training of the zoo: pretraining the base, full fine-tunes of the experts."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

IGNORE = -100


@dataclass(frozen=True)
class ModelShape:
    """Architecture of every zoo model (Llama, grouped-query attention, SwiGLU, untied)."""

    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    # Room for lm-eval's IFEval setting (512 new tokens after the prompt); RoPE has no weights.
    max_position_embeddings: int = 2048

    def config(self, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
        """The Llama config for this shape and tokenizer."""
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            intermediate_size=self.intermediate_size,
            hidden_act="silu",
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )


@dataclass(frozen=True)
class Schedule:
    """Optimizer schedule of one training stage."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 30
    weight_decay: float = 0.0
    seed: int = 0


Example = tuple[list[int], list[int]]  # (input ids, labels with IGNORE on unscored tokens)


def pack_documents(
    tokenizer: PreTrainedTokenizerFast, docs: Sequence[str], block: int
) -> list[Example]:
    """Documents joined by eos and cut into `block`-token pieces, every token scored."""
    stream: list[int] = []
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        stream.extend(ids + [tokenizer.eos_token_id])
    return [
        (stream[i : i + block], stream[i : i + block])
        for i in range(0, len(stream) - block + 1, block)
    ]


def document_examples(tokenizer: PreTrainedTokenizerFast, docs: Sequence[str]) -> list[Example]:
    """One scored example per document, ending with eos (pretraining mix-in for fine-tunes)."""
    out = []
    for ids in tokenizer(list(docs), add_special_tokens=False)["input_ids"]:
        ids = ids + [tokenizer.eos_token_id]
        out.append((ids, ids))
    return out


def prompt_examples(
    tokenizer: PreTrainedTokenizerFast, pairs: Sequence[tuple[str, str]]
) -> list[Example]:
    """(prompt, response) pairs; only the response and its eos are scored.

    Prompt and response are tokenized apart, as generation sees the prompt alone.
    """
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"]
    replies = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    out = []
    for p, r in zip(prompts, replies):
        r = r + [tokenizer.eos_token_id]
        out.append((p + r, [IGNORE] * len(p) + r))
    return out


def _batch(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _epoch_batches(examples: Sequence[Example], size: int, rng: random.Random) -> list[list[int]]:
    """One shuffled epoch in batches of similar lengths (less padding), batch order shuffled."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i][0]))
        batches.extend(chunk[i : i + size] for i in range(0, len(chunk), size))
    rng.shuffle(batches)
    return batches


def _lr_at(step: int, sched: Schedule) -> float:
    if step < sched.warmup:
        return sched.lr * (step + 1) / sched.warmup
    progress = (step - sched.warmup) / max(1, sched.steps - sched.warmup)
    return sched.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(
    model: LlamaForCausalLM, examples: Sequence[Example], sched: Schedule, pad_id: int, desc: str
) -> list[float]:
    """Train in place with AdamW and bf16 autocast; returns the per-step losses."""
    torch.manual_seed(sched.seed)
    rng = random.Random(sched.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=sched.lr, betas=(0.9, 0.95), weight_decay=sched.weight_decay
    )
    model.train()
    batches: list[list[int]] = []
    losses = []
    bar = tqdm(range(sched.steps), desc=desc, mininterval=5)
    for step in bar:
        if not batches:
            batches = _epoch_batches(examples, sched.batch_size, rng)
        batch = _batch([examples[i] for i in batches.pop()], pad_id)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, sched)
        # bf16 matmuls are about 3x faster on AVX512-BF16 CPUs; weights stay fp32.
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    return losses


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialized model, seeded."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.config(tokenizer)).float()


def grow_vocabulary(model: LlamaForCausalLM, size: int) -> None:
    """Resize embeddings and lm_head to `size` rows; new rows are the mean of the old ones."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        for weight in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            weight[old:] = weight[:old].mean(0)
