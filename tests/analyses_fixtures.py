"""A tiny base/instruct pair, paired IFEval data and a Study over them, built in the test."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mergekit_wp.analyses.config import parse_config
from mergekit_wp.analyses.study import Study
from tests.conftest import make_tokenizer, tiny_llama

TASKS = ("english_capital", "no_comma")
CONTEXTS = [
    "Write a short story about the red fox.",
    "Describe the quiet dog near the river.",
    "Tell me about a day when Ann saw the old cat.",
    "Write a few sentences about the owl in the morning.",
    "Write a note to Bob about the small bird.",
    "Explain what happened to the lazy dog at the farm.",
]
INSTRUCTIONS = {
    "english_capital": (
        "change_case:english_capital",
        "Your entire response should be in English, and in all capital letters.",
    ),
    "no_comma": (
        "punctuation:no_comma",
        "In your entire response, refrain from the use of any commas.",
    ),
}
COMPONENT_TENSORS = ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def paired_rows() -> list[dict]:
    rows = []
    for task in TASKS:
        instruction_id, text = INSTRUCTIONS[task]
        for i, context in enumerate(CONTEXTS):
            rows.append(
                {
                    "key": len(rows),
                    "prompt": f"{context} {text}",
                    "prompt_without_instruction": context,
                    "instruction_id_list": [instruction_id],
                    "kwargs": [{}],
                    "task": task,
                }
            )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tokenizer():
    texts = [r["prompt"] for r in paired_rows()] + [
        "THE RED FOX RAN. the dog sat, and the cat slept."
    ] * 5
    return make_tokenizer(texts, vocab_size=400)


def _llama(vocab: int, **config):
    """conftest's tiny Llama (GQA by default); `num_key_value_heads` may be overridden here."""
    return tiny_llama(vocab, seed=0, **config)


def model_pair(
    vocab: int, only_components: bool = True, dtype=torch.float64, scale: float = 0.3, **config
):
    """Base and an "instruct" that differs by a random Δθ (only in component tensors by default)."""
    base, instruct = _llama(vocab, **config).to(dtype), _llama(vocab, **config).to(dtype)
    base.config.architectures = instruct.config.architectures = ["LlamaForCausalLM"]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in instruct.named_parameters():
            if only_components and not any(t in name for t in COMPONENT_TENSORS):
                continue
            p.add_(
                scale
                * p.std()
                * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(dtype)
            )
    return base.eval(), instruct.eval()


def make_study(tmp_path: Path, analyses: dict | None = None, **overrides) -> Study:
    data = write_jsonl(tmp_path / "paired.jsonl", paired_rows())
    tok = tokenizer()
    base, instruct = model_pair(len(tok), **overrides)
    raw = {
        "output": str(tmp_path / "report"),
        "base": "tiny-base",
        "instruct": "tiny-instruct",
        "data": {"scoring": str(data), "evaluation": str(data)},
        "tasks": list(TASKS),
        "examples": 3,
        "eval_examples": 3,
        "max_new_tokens": 6,
        "batch_size": 4,
        "anchor": {"layer": 1},
        "gap_floor": 1e-6,  # tiny random models: some gaps are under the default 1e-4
        "analyses": analyses or {"drift": {}},
    }
    return Study(parse_config(raw, "test config"), base=base, instruct=instruct, tokenizer=tok)
