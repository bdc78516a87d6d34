"""Scoring inputs: chat-rendered prompts (and responses for KL) as left-padded token batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergekit_wp.generation import encode_left_padded, generate, pad_token_id, render_chat
from mergekit_wp.scoring.config import DataConfig
from mergekit_wp.scoring.data import load_domain, load_paired, split_paired
from mergekit_wp.scoring.forward import TokenBatch


@dataclass(frozen=True)
class Example:
    """One scoring input: its key, the chat-rendered prompt, and the response (KL) if any."""

    key: str
    prompt: str
    response: str | None = None


def load_examples(
    data: DataConfig, tokenizer, sft: nn.Module | None = None, need_responses: bool = False
) -> list[Example]:
    """Examples named by a data config; with `need_responses`, attach the responses KL scores."""
    if data.kind == "paired":
        paired = load_paired(data.source, data.tasks)
        if data.split != "all":
            extraction, evaluation = split_paired(paired, data.seed, data.extraction_fraction)
            paired = extraction if data.split == "extraction" else evaluation
        rows = [(str(e.key), e.prompt, None) for e in paired]
    else:
        rows = [(str(e.key), e.prompt, e.reference) for e in load_domain(data.source)]
    rows = rows[: data.max_examples]
    prompts = [_rendered(tokenizer, text, data) for _, text, _ in rows]
    if not need_responses:
        return [Example(key, prompt) for (key, _, _), prompt in zip(rows, prompts)]
    if data.responses == "reference":
        missing = [key for key, _, ref in rows if not ref]
        if missing:
            raise ValueError(f"{data.source}: example {missing[0]!r} has no reference response")
        responses = [ref for _, _, ref in rows]
    else:
        if sft is None:
            raise ValueError("generating responses needs the specialized model")
        responses = generate(
            sft, tokenizer, prompts, max_new_tokens=data.max_new_tokens, progress=True
        )
    return [Example(key, p, r) for (key, _, _), p, r in zip(rows, prompts, responses)]


def _rendered(tokenizer, text: str, data: DataConfig) -> str:
    if not data.chat:
        return text
    try:
        return render_chat(tokenizer, text)
    except ValueError:
        if getattr(tokenizer, "chat_template", None):
            raise
        raise ValueError(
            f"{data.source}: the tokenizer {tokenizer.name_or_path!r} has no chat template; set "
            "`data.chat: false` to score the raw prompts (e.g. a base model or code completion)"
        ) from None


def encode_with_responses(tokenizer, examples: Sequence[Example]) -> TokenBatch:
    """Prompt + response + eos, left-padded; `response_mask` marks logits predicting the
    response.
    """
    rows, starts = [], []
    for example in examples:
        prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
        response = tokenizer(example.response or "", add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response = response + [tokenizer.eos_token_id]
        if not prompt or not response:
            raise ValueError(
                f"example {example.key!r}: empty prompt or response after tokenization"
            )
        rows.append(prompt + response)
        starts.append(len(prompt))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for i, (row, start) in enumerate(zip(rows, starts)):
        pad = width - len(row)
        input_ids[i, pad:] = torch.tensor(row)
        attention_mask[i, pad:] = 1
        # The logit at position t predicts token t+1: response tokens are predicted from start-1 on.
        response_mask[i, pad + start - 1 : width - 1] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return TokenBatch(
        input_ids, attention_mask, position_ids, response_mask, tuple(e.key for e in examples)
    )


def make_batches(tokenizer, examples: Sequence[Example], batch_size: int) -> list[TokenBatch]:
    """Length-sorted batches (less padding); independent of how many processes share them."""
    length = lambda e: len(e.prompt) + len(e.response or "")
    ordered = sorted(examples, key=length)
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        if chunk[0].response is None:
            ids, mask, pos = encode_left_padded(tokenizer, [e.prompt for e in chunk])
            batches.append(TokenBatch(ids, mask, pos, None, tuple(e.key for e in chunk)))
        else:
            batches.append(encode_with_responses(tokenizer, chunk))
    return batches
