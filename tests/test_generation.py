import copy

import torch

from mergekit_wp.generation import encode_left_padded, generate, render_chat
from tests.conftest import tiny_llama


def test_render_chat_uses_template(tiny_tokenizer):
    assert render_chat(tiny_tokenizer, "hi") == "### Instruction:\nhi\n\n### Response:\n"


def test_left_padding_positions_and_mask(tiny_tokenizer):
    ids, mask, pos = encode_left_padded(tiny_tokenizer, ["the dog", "the quick brown fox jumps"])
    assert ids.shape == mask.shape == pos.shape
    short = int(mask[0].sum())
    assert mask[0, : ids.shape[1] - short].sum() == 0
    assert pos[0, -short:].tolist() == list(range(short))
    assert pos[1].tolist() == list(range(ids.shape[1]))


def test_batched_generation_equals_one_by_one(tiny_tokenizer):
    model = tiny_llama(len(tiny_tokenizer), seed=1)
    prompts = [render_chat(tiny_tokenizer, t) for t in ["a", "the quick brown fox", "dog, dog"]]
    batched = generate(model, tiny_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    single = [generate(model, tiny_tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == single
    assert any(batched)
    assert all(isinstance(text, str) for text in batched)
    # Greedy decoding is deterministic.
    assert generate(model, tiny_tokenizer, prompts, max_new_tokens=8) == batched
    assert torch.get_default_dtype() == torch.float32


def test_pad_beyond_model_vocabulary_falls_back_to_eos(tiny_tokenizer):
    # An instruct tokenizer with an added pad row, used on the base model without that row.
    tokenizer = copy.deepcopy(tiny_tokenizer)
    rows = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": "<added_pad>"})
    assert tokenizer.pad_token_id == rows
    model = tiny_llama(rows, seed=2)
    prompts = [render_chat(tokenizer, t) for t in ["a", "the quick brown fox"]]
    ids, mask, _ = encode_left_padded(tokenizer, prompts, model=model)
    assert int(ids.max()) < rows
    assert ids[0, 0] == tokenizer.eos_token_id and mask[0, 0] == 0
    out = generate(model, tokenizer, prompts, max_new_tokens=4)
    assert out == [generate(model, tokenizer, [p], max_new_tokens=4)[0] for p in prompts]
