"""The family tables (`mergekit_wp/_data/architectures/*.json`) against real HF modules."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergekit_wp.components import (
    FAMILIES,
    Component,
    ModelShape,
    _family_from_table,
    family_of,
    score_key,
)
from mergekit_wp.scoring.forward import logits_from_hidden
from tests.test_components import ARCHS, config_of
from tests.test_families import FAMILIES as TABLE_ONLY
from tests.test_moe import ARCHITECTURES as MOE_ARCHITECTURES
from tests.test_scoring_helpers import ARCHS as PAIRS
from tests.test_scoring_helpers import arch_config


def _model(architecture: str, **overrides):
    config = config_of(architecture, **overrides)
    shape = ModelShape.from_config(config)
    # The table's default, as scoring loads it: transformers refuses sdpa for Gemma 2.
    config._attn_implementation = shape.family.attn_implementation
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval(), shape


def test_every_shipped_table_is_a_family_with_its_architectures():
    folder = resources.files("mergekit_wp") / "_data" / "architectures"
    names = sorted(f.name for f in folder.iterdir() if f.name.endswith(".json"))
    assert names == [f"{family.name}.json" for family in FAMILIES]
    # The families tested here, as added tables (tests/test_families.py) and as mixtures of
    # experts (tests/test_moe.py).
    added = {PAIRS[arch][1].__name__ for arch in TABLE_ONLY} | set(MOE_ARCHITECTURES.values())
    assert {a for family in FAMILIES for a in family.architectures} == set(ARCHS) | added
    assert family_of("Gemma2ForCausalLM").attn_implementation == "eager"
    assert family_of("LlamaForCausalLM").logits == ()


@pytest.mark.parametrize("architecture", list(ARCHS))
def test_table_paths_name_the_models_modules(architecture):
    model, shape = _model(architecture)
    family = shape.family
    assert isinstance(model.get_submodule(family.embedding), torch.nn.Embedding)
    assert model.get_submodule(family.unembedding) is model.get_output_embeddings()
    assert model.get_submodule(family.final_norm) is model.get_decoder().norm
    for unit in ("head", "kv_group", "neuron"):
        site = model.get_submodule(shape.site_path(2, unit))
        assert site is getattr(model.model.layers[2], "self_attn" if unit != "neuron" else "mlp")
        for role in shape.roles(unit):
            assert model.get_submodule(shape.module_path(2, role)).__class__ is torch.nn.Linear
    # The writer's input is the units' outputs: H * head_dim features, I neurons.
    assert model.get_submodule(shape.module_path(0, shape.writer("head"))).in_features == (
        shape.num_attention_heads * shape.head_dim
    )
    assert shape.writer("neuron").part == "down" and shape.role("o") == shape.writer("head")
    with pytest.raises(ValueError, match="has no part 'x'"):
        shape.role("x")


@pytest.mark.parametrize("architecture", ["Gemma2ForCausalLM", "LlamaForCausalLM"])
def test_logits_from_hidden_are_the_models_logits(architecture):
    # A cap small enough that the soft-capping moves every logit of the random model.
    model, shape = _model(architecture, final_logit_softcapping=0.5)
    ids = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        # hidden_states[-1] is after the final norm; the last decoder layer's output is wanted.
        last = {}
        handle = model.model.layers[-1].register_forward_hook(
            lambda m, a, o: last.setdefault("z", o)
        )
        model(input_ids=ids)
        handle.remove()
        logits = logits_from_hidden(model, last["z"])
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)
    if architecture == "Gemma2ForCausalLM":
        assert shape.logit_ops == (("softcap", 0.5),) and out.logits.abs().max() < 0.5
        plain = model.get_output_embeddings()(model.model.norm(last["z"]))
        assert not torch.equal(plain, logits)
    else:
        assert shape.logit_ops == ()  # Llama's config knows no soft-capping


def test_logit_ops_are_applied_in_order():
    shape = ModelShape.from_config(config_of("LlamaForCausalLM"))
    logits = torch.tensor([-3.0, 0.5, 8.0], dtype=torch.float64)
    scaled = dataclasses.replace(
        shape, logit_ops=(("multiply", 2.0), ("divide", 4.0), ("softcap", 1.5))
    )
    expected = torch.tanh(logits * 2.0 / 4.0 / 1.5) * 1.5
    torch.testing.assert_close(scaled.transform_logits(logits), expected, rtol=0, atol=0)
    unset = ModelShape.from_config(config_of("Gemma2ForCausalLM", final_logit_softcapping=None))
    assert unset.logit_ops == () and unset.transform_logits(logits) is logits


def test_score_map_keys_are_format_v1_whatever_the_family():
    assert score_key("head", 3) == "model.layers.3.self_attn.heads"
    assert score_key("neuron", 0, "gate") == "model.layers.0.mlp.neurons.gate"


def _llama_table() -> dict:
    return json.loads(
        (resources.files("mergekit_wp") / "_data" / "architectures" / "llama.json").read_text()
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("final_norm"), r"keys must be .*; missing \['final_norm'\]"),
        (lambda t: t["roles"][2].pop("part"), r"roles\[2\] has keys \['axis', 'bias', 'module'"),
        (lambda t: t["roles"][0].update(unit="expert"), r"roles\[0\]: site must be one of"),
        (
            lambda t: t["roles"][1].update(bias="per-row"),
            r"roles\[1\]: bias must be 'unit' or 'shared'",
        ),
        (
            lambda t: t["roles"][1].pop("writes_residual"),
            r"head roles must have parts \('q', 'o'\)",
        ),
        (lambda t: t["roles"][5].update(part="upper"), r"neuron roles must have parts"),
        (lambda t: t["roles"][3].update(after="head"), r"roles\[3\]: after must be a list"),
        # v_proj is not fused: its only block follows none.
        (
            lambda t: t["roles"][3].update(after=["head"]),
            r"roles of v_proj: block 0 \(v\) must have after \[\]",
        ),
        # Fused like Phi-3's gate_up_proj, but the up block does not say it follows gate.
        (
            lambda t: t["roles"][5].update(module="gate_proj"),
            r"roles of gate_proj: block 1 \(.*\) must have after \['neuron'\]",
        ),
        (lambda t: t["logits"].append({"op": "clip", "config_key": "x"}), r"logits\[0\] must be"),
    ],
)
def test_a_bad_table_is_refused_naming_the_file_and_key(edit, message):
    table = _llama_table()
    edit(table)
    with pytest.raises(
        ValueError, match=r"architecture table _data/architectures/bad\.json: " + message
    ):
        _family_from_table("_data/architectures/bad.json", table)


def test_fused_tensors_split_into_blocks_of_rows():
    # Phi-3 (tests/test_scoring_helpers): H=4, KV=2, head_dim 8, I=16; qkv_proj is [64, 32].
    shape = ModelShape.from_config(arch_config("phi3"))
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    gate_up = "model.layers.1.mlp.gate_up_proj.weight"
    assert [(g, i[0]) for g, i in shape.tensor_blocks(qkv, 2)] == [
        ("component", slice(0, 32)),
        ("kv", slice(32, 48)),
        ("kv", slice(48, 64)),
    ]
    assert shape.slices(Component("head", 1, 2))[qkv] == (slice(16, 24), slice(None))
    rows, columns = shape.slices(Component("neuron", 1, 3))[gate_up]
    assert rows.tolist() == [3, 19] and columns == slice(None)  # gate row j, up row I + j
    k, v = shape.roles("kv_group")
    assert shape.unit_slice(v, 1, 2)[0] == slice(56, 64)
    assert shape.tensor_group(gate_up) == "component" and shape.parse(qkv).roles[1] == k
