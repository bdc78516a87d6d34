"""Component tables: tensor names, head / KV-group / neuron slices, against real HF modules."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.models.llama.modeling_llama import repeat_kv

from mergekit_wp.components import (
    Component,
    ModelShape,
    UnsupportedArchitectureError,
)

SMALL = {
    "vocab_size": 40,
    "hidden_size": 32,
    "intermediate_size": 20,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
ARCHS = {
    "LlamaForCausalLM": LlamaConfig,
    "MistralForCausalLM": MistralConfig,
    "Qwen2ForCausalLM": Qwen2Config,
    "Gemma2ForCausalLM": Gemma2Config,
}


def config_of(architecture: str, **overrides):
    extra = {"head_dim": 6} if architecture == "Gemma2ForCausalLM" else {}  # != 32 / 8
    return ARCHS[architecture](**{**SMALL, **extra, **overrides}, architectures=[architecture])


@pytest.fixture(scope="module", params=list(ARCHS))
def model_and_shape(request):
    config = config_of(request.param)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config), ModelShape.from_config(config)


def test_dimensions_come_from_the_config():
    gemma = ModelShape.from_config(config_of("Gemma2ForCausalLM"))
    assert (gemma.head_dim, gemma.heads_per_group, gemma.family.name) == (6, 4, "gemma2")
    llama = ModelShape.from_config(config_of("LlamaForCausalLM"))
    assert (llama.head_dim, llama.intermediate_size, llama.vocab_size) == (4, 20, 40)
    as_dict = ModelShape.from_config({**SMALL, "architectures": ["MistralForCausalLM"]})
    assert as_dict.num_key_value_heads == 2 and as_dict.head_dim == 4
    mha = ModelShape.from_config(
        {**SMALL, "num_key_value_heads": None, "architectures": ["LlamaForCausalLM"]}
    )
    assert mha.num_key_value_heads == 8 and mha.heads_per_group == 1


def test_unsupported_architecture_names_the_architectures_entry():
    with pytest.raises(UnsupportedArchitectureError, match="'GPT2LMHeadModel'.*LlamaForCausalLM"):
        ModelShape.from_config({**SMALL, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedArchitectureError, match="no `architectures` entry"):
        ModelShape.from_config(SMALL)
    with pytest.raises(
        ValueError, match="num_attention_heads=8 is not a multiple of num_key_value_heads=3"
    ):
        ModelShape.from_config(
            {**SMALL, "num_key_value_heads": 3, "architectures": ["LlamaForCausalLM"]}
        )


def test_every_projection_parses_to_its_role(model_and_shape):
    model, shape = model_and_shape
    expected = {
        "q_proj": ("head", 0, "q"),
        "o_proj": ("head", 1, "o"),
        "k_proj": ("kv_group", 0, "k"),
        "v_proj": ("kv_group", 0, "v"),
        "gate_proj": ("neuron", 0, "gate"),
        "up_proj": ("neuron", 0, "up"),
        "down_proj": ("neuron", 1, "down"),
    }
    roles = 0
    for name, tensor in model.state_dict().items():
        info = shape.parse(name)
        projection = name.split(".")[-2]
        if info.layer is None or projection not in expected:
            assert info.role is None, name  # embeddings, norms, lm_head
            continue
        assert info.role is not None, name
        roles += 1
        assert (info.role.unit, info.role.axis, info.role.part) == expected[projection]
        assert tensor.shape[info.role.axis if tensor.ndim > 1 else 0] == (
            shape.unit_count(info.role.unit) * shape.unit_width(info.role.unit)
        ), name
    assert roles == shape.num_hidden_layers * (7 + 3 * (shape.family.name == "qwen2"))


def test_tensor_groups_cover_every_stored_tensor_by_its_projection(model_and_shape):
    model, shape = model_and_shape
    for name in model.state_dict():
        projection = name.split(".")[-2]
        expected = {"k_proj": "kv", "v_proj": "kv"}.get(projection, "component")
        if projection in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") or (
            projection in ("o_proj", "down_proj") and name.endswith(".weight")
        ):
            assert shape.tensor_group(name) == expected, name
        elif name == "model.embed_tokens.weight":
            assert shape.tensor_group(name) == "embedding", name
        elif name == "lm_head.weight":
            assert shape.tensor_group(name) == "unembedding", name
        else:  # norms, shared output biases
            assert shape.tensor_group(name) == "other", name


def test_shared_output_biases_have_no_role():
    shape = ModelShape.from_config(config_of("Qwen2ForCausalLM"))
    assert shape.parse("model.layers.1.self_attn.q_proj.bias").role.part == "q"
    assert shape.parse("model.layers.1.self_attn.o_proj.bias").role is None
    assert shape.parse("model.layers.1.mlp.down_proj.bias").role is None
    info = shape.parse("model.layers.2.post_attention_layernorm.weight")
    assert (info.layer, info.module, info.role) == (2, "post_attention_layernorm", None)
    assert shape.parse("lm_head.weight").layer is None


def test_head_and_neuron_slices_are_the_stored_rows_and_columns():
    shape = ModelShape.from_config(config_of("Gemma2ForCausalLM"))
    d = 6
    head = shape.slices(Component("head", 1, 3))
    attn = "model.layers.1.self_attn"
    assert head == {
        f"{attn}.q_proj.weight": (slice(3 * d, 4 * d), slice(None)),
        f"{attn}.q_proj.bias": (slice(3 * d, 4 * d),),
        f"{attn}.o_proj.weight": (slice(None), slice(3 * d, 4 * d)),
    }
    mlp = "model.layers.2.mlp"
    assert shape.slices(Component("neuron", 2, 7), params=("weight",)) == {
        f"{mlp}.gate_proj.weight": (slice(7, 8), slice(None)),
        f"{mlp}.up_proj.weight": (slice(7, 8), slice(None)),
        f"{mlp}.down_proj.weight": (slice(None), slice(7, 8)),
    }
    assert shape.module_path(0, shape.roles("neuron")[2]) == "model.layers.0.mlp.down_proj"
    assert str(Component("head", 1, 3)) == "H(1,3)"
    assert sum(1 for _ in shape.components()) == 3 * (8 + 20)
    assert sum(1 for _ in shape.components("head")) == 3 * 8


def test_kv_groups_match_transformers_repeat_kv():
    shape = ModelShape.from_config(config_of("LlamaForCausalLM"))
    groups = torch.arange(shape.num_key_value_heads, dtype=torch.float32).view(1, -1, 1, 1)
    served = repeat_kv(groups, shape.heads_per_group).flatten().long().tolist()
    assert served == [shape.group_of_head(h) for h in range(shape.num_attention_heads)]
    for g in range(shape.num_key_value_heads):
        assert [h for h in range(8) if served[h] == g] == list(shape.heads_of_group(g))


def test_unit_values_expand_to_rows():
    shape = ModelShape.from_config(config_of("LlamaForCausalLM"))
    q, k, gate = (shape.roles(u)[0] for u in ("head", "kv_group", "neuron"))
    per_head = torch.arange(8.0).expand(2, 8)
    assert shape.unit_weights_for(q, per_head).shape == (2, 32)
    assert shape.unit_weights_for(q, per_head)[1, 4:8].tolist() == [1.0] * 4
    assert shape.unit_weights_for(k, torch.tensor([5.0, 7.0])).tolist() == [5.0] * 4 + [7.0] * 4
    assert torch.equal(shape.unit_weights_for(gate, torch.arange(20.0)), torch.arange(20.0))
