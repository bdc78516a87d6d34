"""Shared test fixtures: tiny tokenizers and models built in the test, never downloaded."""

from __future__ import annotations

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def make_tokenizer(texts: list[str], vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `texts`, with eos/pad and the zoo's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    texts = ["the quick brown fox jumps over the lazy dog, again and again."] * 20
    texts += ["### Instruction:\nwrite a story\n\n### Response:\n", "def f(a, b):\n    return a"]
    return make_tokenizer(texts)


# The shape every tiny test model shares (any architecture): small enough for fp64 checks.
TINY_SHAPE = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A random LlamaForCausalLM with GQA; `overrides` replace any config field."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{"vocab_size": vocab_size, **TINY_SHAPE, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def wp_attr_units(base, sft, batch, utility) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(example weights, `{"head": [L, H], "neuron": [L, N]}`): one WP-attr gradient pass, its
    parts summed into units as the score maps sum them."""
    from mergekit_wp.scoremap import unit_scores
    from mergekit_wp.scoring.attribution import gradient_pass
    from mergekit_wp.scoring.utility import batch_context

    _, _, weights = batch_context(base, sft, batch, utility, 1e-6)
    heads, neurons = unit_scores(gradient_pass(base, sft, batch, utility, weights)["wp_attr"])
    return weights, {"head": heads, "neuron": neurons}


def central_differences(base, sft, batch, utility, weights, unit, eps) -> torch.Tensor:
    """`[L, units]`: d F(base + t (sft - base) on one unit's slices) / dt at t = 0, weighted by
    `weights` over the batch, unit by unit (the reference WP-attr is checked against)."""
    from mergekit_wp.components import Component, ModelShape

    shape = ModelShape.from_config(base.config)
    base_p, sft_p = dict(base.named_parameters()), dict(sft.named_parameters())
    out = torch.zeros(shape.num_hidden_layers, shape.unit_count(unit), dtype=torch.float64)
    for layer in range(shape.num_hidden_layers):
        for index in range(shape.unit_count(unit)):
            slices = [
                (n, s)
                for n, s in shape.slices(Component(unit, layer, index)).items()
                if n in base_p
            ]
            saved = [base_p[n][s].clone() for n, s in slices]
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    for (n, s), old in zip(slices, saved):
                        base_p[n][s] = old + sign * eps * (sft_p[n][s] - old)
                values.append(utility(base, batch).double())
            with torch.no_grad():
                for (n, s), old in zip(slices, saved):
                    base_p[n][s] = old
            out[layer, index] = ((values[0] - values[1]) / (2 * eps)) @ weights
    return out


@pytest.fixture(scope="session", autouse=True)
def registered_merge_methods():
    """`wp` and `widen` registered, as Python code that runs mergekit's merge itself does first
    (importing mergekit_wp no longer registers them)."""
    import mergekit_wp

    mergekit_wp.register()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: tiny models on shared cores mostly spin with more."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
