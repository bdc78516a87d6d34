"""Greedy, batched, left-padded generation shared by the zoo gates, the anchor sweep and the
evals.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm


def render_chat(tokenizer, user_text: str) -> str:
    """The model's chat template with one user turn and the generation prompt."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )


def pad_token_id(tokenizer, model=None) -> int:
    """The pad id to use: the tokenizer's own, else its eos (models without a pad token).

    With `model`, a pad id beyond its embedding rows (an instruct tokenizer's added `<pad>`
    on the base model) also falls back to eos: pads are masked, any valid row will do.
    """
    rows = None if model is None else model.get_input_embeddings().num_embeddings
    if tokenizer.pad_token_id is not None and (rows is None or tokenizer.pad_token_id < rows):
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
    return tokenizer.eos_token_id


def shared_tokenizer(tokenizer, base):
    """The specialized model's tokenizer (it carries the chat template), usable by the base too.

    Where the specialized model added a pad token the base cannot embed (the zoo's instruct
    expert), the copy pads with eos: padding is masked, any in-vocabulary id serves.
    """
    if (
        tokenizer.pad_token_id is None
        or tokenizer.pad_token_id < base.get_input_embeddings().num_embeddings
    ):
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_left_padded(
    tokenizer, texts: list[str], device: torch.device | str | None = None, model=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids of left-padded, chat-rendered texts.

    Left padding puts every prompt's last token at index -1 (the anchor position); explicit
    position ids keep padding from shifting the real tokens' positions.
    """
    # Chat-rendered text already carries any BOS the template wants.
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    width = max(len(r) for r in rows)
    pad = pad_token_id(tokenizer, model)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"text {i} encodes to no tokens: {texts[i]!r}")
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if device is not None:
        input_ids, attention_mask, position_ids = (
            t.to(device) for t in (input_ids, attention_mask, position_ids)
        )
    return input_ids, attention_mask, position_ids


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy completions of chat-rendered prompts, in input order, special tokens dropped."""
    device = next(model.parameters()).device
    # Length-sorted batches waste less compute on padding; results go back to input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    starts = range(0, len(order), batch_size)
    label = f"generate {len(prompts)} responses x {max_new_tokens} tokens"
    for start in tqdm(starts, desc=label, unit="batch", disable=not progress, leave=False):
        index = order[start : start + batch_size]
        input_ids, attention_mask, _ = encode_left_padded(
            tokenizer, [prompts[i] for i in index], device, model
        )
        tokens = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_token_id(tokenizer, model),
            eos_token_id=tokenizer.eos_token_id,
        )
        new = tokens[:, input_ids.shape[1] :]
        for i, row in zip(index, new):
            outputs[i] = tokenizer.decode(row, skip_special_tokens=True)
    return outputs
