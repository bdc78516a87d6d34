"""Families added as tables (#14): scoring against references, `wp` through plain mergekit-yaml.

Each family runs the same checks on tiny random models: WP-attr against central differences,
batched exact WP against naive patching, a `wp` merge by `mergekit-yaml` against the dense
reference of tests/test_merge_method.py (q_norm / k_norm are averaged like every norm: Qwen3's
and Gemma 3's `[head_dim]` are shared by all heads; Cohere's `[H, head_dim]` rows are per head
but no unit owns them yet), an expert owning a unit exactly, and the merged folder loading in
transformers key for key.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergekit_wp.components import Component, ModelShape, load_shape
from mergekit_wp.scoring.attribution import gradient_pass
from mergekit_wp.scoring.exact import batch_scores
from mergekit_wp.scoring.forward import logits_from_hidden
from mergekit_wp.scoring.utility import KLUtility, batch_context
from tests.test_merge_method import (
    Family,
    assert_matches_reference,
    load_output,
    mergekit_yaml,
    random_scores,
    save_model,
    score_files,
    wp_recipe,
)
from tests.test_scoring_helpers import arch_config, model_pair
from tests.test_scoring_numerics import _all, _anchor, _batch, _naive_wp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Table entry -> the logit transform its tiny config sets (tests/test_scoring_helpers.ARCHS).
FAMILIES = {
    "qwen3": (),
    "gemma3": (("softcap", 0.5),),
    "granite": (("divide", 4.0),),
    "cohere": (("multiply", 0.5),),
}


def _kl_context(arch: str):
    """A pair, a batch with responses and F = -KL(p_sft || p_M): every layer and the logits."""
    base, sft = model_pair(arch)
    batch, utility = _batch(with_response=True), KLUtility(sft)
    _, _, weights = batch_context(base, sft, batch, utility, 1e-9)
    return base, sft, batch, utility, weights


def _central_differences(base, sft, batch, utility, weights, unit, eps=3e-3) -> torch.Tensor:
    """d F(base + t (sft - base) on one unit's slices) / dt at t = 0, unit by unit."""
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


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_logits_from_hidden_are_the_models_logits(arch):
    base, _ = model_pair(arch)
    shape = ModelShape.from_config(base.config)
    assert shape.logit_ops == FAMILIES[arch]
    ids = torch.randint(2, 280, (2, 7), generator=torch.Generator().manual_seed(0))
    last = {}
    handle = base.model.layers[-1].register_forward_hook(lambda m, a, o: last.setdefault("z", o))
    with torch.no_grad():
        out = base(input_ids=ids)
        logits = logits_from_hidden(base, last["z"])
    handle.remove()
    torch.testing.assert_close(logits, out.logits, rtol=0, atol=0)
    if shape.logit_ops:  # the transform is needed: without it the logits differ
        plain = base.get_output_embeddings()(base.model.norm(last["z"]))
        assert (plain - logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_wp_attr_matches_central_differences(arch):
    # The anchor on the last layer: every layer moves it. transformers' norms compute in fp32
    # even in an fp64 model, so F carries ~1e-8 noise: the step (3e-3) is kept large enough for
    # it, and the KL readout's differences are too small for it (KL is checked exactly below).
    base, sft = model_pair(arch)
    batch, utility = _batch(), _anchor(layer=2)
    _, _, weights = batch_context(base, sft, batch, utility, 1e-6)
    parts = gradient_pass(base, sft, batch, utility, weights)["wp_attr"]
    attr = {"head": parts["q"] + parts["o"], "neuron": parts["gate"] + parts["up"] + parts["down"]}
    for unit in ("head", "neuron"):
        fd = _central_differences(base, sft, batch, utility, weights, unit)
        scale = attr[unit].abs().max()
        assert scale > 0 and fd.abs().min() > 0, unit
        assert (attr[unit] - fd).abs().max() <= 1e-3 * scale, unit


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_batched_exact_wp_equals_naive_patching(arch):
    base, sft, batch, utility, weights = _kl_context(arch)
    shape = ModelShape.from_config(base.config)
    stop = shape.num_hidden_layers - 1
    for unit in ("head", "neuron"):
        batched = batch_scores(
            base, sft, batch, utility, "wp", unit, _all(shape, unit, stop), weights, 7
        )
        naive = _naive_wp(base, sft, batch, utility, unit, stop, weights)
        assert (batched - naive).abs().max() <= 1e-10, unit
        assert naive.abs().min() > 0, unit


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_wp_through_mergekit_yaml_matches_reference_and_loads(arch, tmp_path):
    config = arch_config(arch)
    paths = [save_model(tmp_path / name, config, seed) for seed, name in enumerate("bxyz")]
    fam = Family(arch, tmp_path, paths[0], paths[1:], config, load_shape(paths[0]))
    scores = random_scores(fam, seed=1)
    for k, (heads, neurons) in enumerate(scores):
        # Expert 1 alone is positive on KV group 0 of layer 0 (heads 0, 1), expert 2 alone on
        # neuron 5 of layer 1: each must come out as that expert's slice, bit for bit.
        heads[0, :2] = 3.0 if k == 1 else -float(k)
        neurons[1, 5] = 2.0 if k == 2 else -float(k)
    out_dir = tmp_path / "out"
    result = mergekit_yaml(wp_recipe(fam, score_files(fam, scores, "s")), out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_output(out_dir)
    assert_matches_reference(out, fam, scores)
    if arch != "granite":
        assert "model.layers.0.self_attn.q_norm.weight" in out  # shared, averaged above

    e1, e2 = (load_file(fam.experts[k] / "model.safetensors") for k in (1, 2))
    shape, d = fam.shape, fam.shape.head_dim
    owned = [(e1, Component("head", 0, h)) for h in (0, 1)] + [(e2, Component("neuron", 1, 5))]
    for expert, component in owned:
        for name, index in shape.slices(component).items():
            if name in expert:
                assert torch.equal(out[name][index], expert[name][index]), name
    for name in ("k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{name}.weight"
        assert torch.equal(out[name][:d], e1[name][:d]), name
    if arch == "granite":
        assert torch.equal(
            out["model.layers.0.self_attn.q_proj.bias"][: 2 * d],
            e1["model.layers.0.self_attn.q_proj.bias"][: 2 * d],
        )

    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert type(model).__name__ == config.architectures[0]
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    state = model.state_dict()
    for name, tensor in out.items():
        assert torch.equal(state[name], tensor), name
