"""Tiny random model pairs, a tokenizer and data files for the scoring tests (no tests here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Cohere2Config,
    Cohere2ForCausalLM,
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Olmo3Config,
    Olmo3ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from mergekit_wp.components import Component, ModelShape

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "### Instruction:\n{{ message['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
DIMS = {
    "vocab_size": 300,
    "hidden_size": 32,
    "intermediate_size": 16,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        {"head_dim": 8, "sliding_window": 4, "query_pre_attn_scalar": 8},
    ),
    # Shared [head_dim] q_norm / k_norm (Qwen3 defaults head_dim to 128).
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
    # Soft-capping small enough to bend the random logits; sliding and global layers.
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "head_dim": 8,
            "sliding_window": 4,
            "query_pre_attn_scalar": 8,
            "final_logit_softcapping": 0.5,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
    # Every multiplier away from 1, so a missed one shows; biases on.
    "granite": (
        GraniteConfig,
        GraniteForCausalLM,
        {
            "embedding_multiplier": 3.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.2,
            "logits_scaling": 4.0,
            "attention_bias": True,
            "mlp_bias": True,
        },
    ),
    # Parallel attention and MLP; per-head [H, head_dim] q/k LayerNorms (averaged, not owned).
    "cohere": (CohereConfig, CohereForCausalLM, {"logit_scale": 0.5, "use_qk_norm": True}),
    # Fused qkv_proj and gate_up_proj (pad ids inside the tiny vocabulary).
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0}),
    # Fused gate_up_proj, q/k/v biases, partial rotary; GLM-4 adds two post-norms.
    "glm4": (Glm4Config, Glm4ForCausalLM, {"head_dim": 8, "pad_token_id": 0, "eos_token_id": 1}),
    "glm": (GlmConfig, GlmForCausalLM, {"head_dim": 8, "pad_token_id": 0, "eos_token_id": 1}),
    # q_norm over all heads [H*hd], k_norm over all KV heads; OLMo 3 with sliding layers.
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {"pad_token_id": 0}),
    "olmo3": (
        Olmo3Config,
        Olmo3ForCausalLM,
        {
            "pad_token_id": 0,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
    "cohere2": (
        Cohere2Config,
        Cohere2ForCausalLM,
        {
            "logit_scale": 0.5,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        },
    ),
    # Layer 1 without rotary embeddings (NoPE).
    "smollm3": (
        SmolLM3Config,
        SmolLM3ForCausalLM,
        {"no_rope_layers": [1, 0, 1], "pad_token_id": 0},
    ),
    # Llama 3.x: llama3 rope scaling, its original context shorter than the test's positions.
    "llama3": (
        LlamaConfig,
        LlamaForCausalLM,
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 4,
            }
        },
    ),
}
PAIRED_ROWS = [
    ("Write a note about the river.", "no_comma", "punctuation:no_comma", "Do not use any commas."),
    (
        "Describe a quiet town.",
        "english_capital",
        "change_case:english_capital",
        "Answer in capitals.",
    ),
    ("Tell me about the old bridge.", "no_comma", "punctuation:no_comma", "Avoid commas."),
    ("Explain how bread is made.", "title", "detectable_format:title", "Add a title in << >>."),
    (
        "Give advice to a new gardener.",
        "english_capital",
        "change_case:english_capital",
        "Use capitals only.",
    ),
    ("Summarize a long walk home.", "title", "detectable_format:title", "Wrap a title in << >>."),
]


def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with the zoo's chat template; eos doubles as pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [" ".join(r[:1] + r[3:]) for r in PAIRED_ROWS] * 4
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def arch_config(arch: str, **dims):
    """The tiny config of `arch` (ARCHS), its `architectures` entry set as a checkpoint's is."""
    config_cls, model_cls, extra = ARCHS[arch]
    config = config_cls(**(DIMS | extra | dims))
    config.architectures = [model_cls.__name__]
    return config


def model_pair(
    arch: str = "llama",
    dtype: torch.dtype = torch.float64,
    noise: float = 0.05,
    planted: list[Component] | None = None,
    seed: int = 0,
    **dims,
):
    """(base, sft): random base; sft = base + noise everywhere, or only on `planted` slices."""
    model_cls = ARCHS[arch][1]
    config = arch_config(arch, **dims)
    torch.manual_seed(seed)
    base = model_cls(config).to(dtype).eval().requires_grad_(False)
    sft = model_cls(config).to(dtype).eval().requires_grad_(False)
    sft.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed + 1)
    params = dict(sft.named_parameters())
    with torch.no_grad():
        if planted is None:
            for p in params.values():
                p.add_(noise * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        else:
            shape = ModelShape.from_config(config)
            for component in planted:
                for name, index in shape.slices(component).items():
                    if name in params:
                        part = params[name][index]
                        params[name][index] = part + noise * 20 * torch.randn(
                            part.shape, generator=generator, dtype=part.dtype
                        )
    return base, sft


def save_pair(folder: Path, base, sft) -> tuple[Path, Path]:
    tok = tokenizer()
    paths = folder / "base", folder / "sft"
    for model, path in zip((base, sft), paths):
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return paths


def write_paired(path: Path, copies: int = 2) -> Path:
    """IFEval-schema JSONL (one instruction per prompt), `copies` x the six rows."""
    with path.open("w") as handle:
        for copy in range(copies):
            for i, (text, task, iid, instruction) in enumerate(PAIRED_ROWS):
                handle.write(
                    json.dumps(
                        {
                            "key": copy * 100 + i,
                            "prompt": f"{text} {instruction}",
                            "prompt_without_instruction": text + " " * copy,
                            "instruction_id_list": [iid],
                            "kwargs": [{}],
                            "task": task,
                        }
                    )
                    + "\n"
                )
    return path


def write_domain(path: Path) -> Path:
    """GSM8K-schema JSONL with reference answers."""
    rows = [
        ("What is 2 plus 3?", "2 plus 3 is 5.\n#### 5"),
        ("What is 7 minus 4?", "7 minus 4 is 3.\n#### 3"),
        ("Add 10 and 5.", "10 and 5 make 15.\n#### 15"),
        ("What is 6 plus 6?", "6 plus 6 is 12.\n#### 12"),
        ("Take 9 from 20.", "20 minus 9 is 11.\n#### 11"),
    ]
    with path.open("w") as handle:
        for question, answer in rows:
            handle.write(json.dumps({"question": question, "answer": answer}) + "\n")
    return path


def write_anchor(
    path: Path, layers: int = 3, width: int = 32, layer: int = 1, seed: int = 0
) -> Path:
    """A random anchor (independent of the anchor sweep): vectors [L, d], chosen layer."""
    from mergekit_wp.scoring.anchor import Anchor, save_anchor

    generator = torch.Generator().manual_seed(seed)
    save_anchor(
        path, Anchor(layer, torch.randn(layers, width, generator=generator), torch.ones(layers))
    )
    return path
