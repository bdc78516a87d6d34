"""Families added as tables (#14): scoring against references, `wp` through plain mergekit.

Each family runs the same checks on tiny random models: WP-attr against central differences,
batched exact WP against naive patching, a `wp` merge by plain mergekit against the dense
reference of tests/test_merge_method.py (q_norm / k_norm are averaged like every norm: Qwen3's
and Gemma 3's `[head_dim]` are shared by all heads; Cohere's `[H, head_dim]` rows are per head
but no unit owns them yet), an expert owning a unit exactly, and the merged folder loading in
transformers key for key. Fused tensors (Phi-3's qkv_proj, gate_up_proj) are cut into the
projections they stack for the reference, by the config's sizes; OLMo 2's q_norm `[H*hd]` and
k_norm `[KV*hd]` are weighed row by row like q / k biases.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from mergekit_wp.components import Component, ModelShape, load_shape
from mergekit_wp.scoring.exact import batch_scores
from mergekit_wp.scoring.forward import logits_from_hidden
from mergekit_wp.scoring.patching import restore
from mergekit_wp.scoring.utility import KLUtility, batch_context
from tests.conftest import central_differences, wp_attr_units
from tests.test_merge_method import (
    VENV_BIN,
    Family,
    dense_reference,
    load_inputs,
    load_output,
    random_scores,
    save_model,
    score_files,
    wp_recipe,
)
from tests.test_scoring_helpers import arch_config, model_pair
from tests.test_scoring_numerics import _all, _anchor, _batch, _naive_ap, _naive_wp

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Table entry -> the logit transform its tiny config sets (tests/test_scoring_helpers.ARCHS).
FAMILIES = {
    "qwen3": (),
    "gemma3": (("softcap", 0.5),),
    "granite": (("divide", 4.0),),
    "cohere": (("multiply", 0.5),),
    "phi3": (),
    "glm4": (),
    "glm": (),
    "olmo2": (),
    "olmo3": (),
    "cohere2": (("multiply", 0.5),),
    "smollm3": (),
    "llama3": (),
}
# Families whose q_norm / k_norm span every head / KV head: per-row weights of the units.
ROW_NORMS = {"olmo2", "olmo3"}


def _kl_context(arch: str):
    """A pair, a batch with responses and F = -KL(p_sft || p_M): every layer and the logits."""
    base, sft = model_pair(arch)
    batch, utility = _batch(with_response=True), KLUtility(sft)
    _, _, weights = batch_context(base, sft, batch, utility, 1e-9)
    return base, sft, batch, utility, weights


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
    weights, attr = wp_attr_units(base, sft, batch, utility)
    for unit in ("head", "neuron"):
        fd = central_differences(base, sft, batch, utility, weights, unit, eps=3e-3)
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
def test_exact_ap_equals_hooked_activation_patching(arch):
    # The writers (o_proj, down_proj) are never fused: AP reads their inputs in every family.
    # The anchor utility: the naive AP hooks a forward of the sft, which the KL utility skips
    # (it answers for the sft from its cache).
    base, sft = model_pair(arch)
    batch, utility = _batch(), _anchor(layer=2)
    _, _, weights = batch_context(base, sft, batch, utility, 1e-6)
    shape = ModelShape.from_config(base.config)
    for unit in ("head", "neuron"):
        exact = batch_scores(base, sft, batch, utility, "ap", unit, _all(shape, unit, 2), weights)
        for layer, index in ((0, 1), (2, 3)):
            naive = _naive_ap(base, sft, batch, utility, unit, layer, index, weights)
            assert naive != 0 and abs(exact[layer, index] - naive) <= 1e-10, (unit, layer)


@pytest.mark.parametrize("arch", ["olmo2", "olmo3", "qwen3", "phi3"])
def test_a_norm_over_all_heads_couples_them_as_the_table_says(arch):
    # Why exact WP patches OLMo's heads one run at a time: through q_norm [H*hd], head 0's
    # slices move head 1's output too. Qwen3's [head_dim] q_norm and Phi-3's fused rows do not.
    base, sft = model_pair(arch)
    shape = ModelShape.from_config(base.config)
    seen = []
    o_proj = base.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        base(input_ids=_batch().input_ids)
        with restore(base, sft, [Component("head", 0, 0)]):
            base(input_ids=_batch().input_ids)
    handle.remove()
    d = shape.head_dim
    moved = (seen[1] - seen[0])[..., d:].abs().max()
    coupled = arch in ROW_NORMS
    assert any(role.spans_units for role in shape.roles("head")) == coupled
    assert (moved > 1e-6) == coupled and (coupled or moved == 0), float(moved)


# Fused tensors and the projections they stack, in row order (Phi-3, GLM).
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _reference(name: str, fam: Family, experts: list[dict], scores) -> torch.Tensor:
    """dense_reference of tests/test_merge_method.py, through fused tensors and OLMo's norms."""
    *path, module, param = name.split(".")
    stem = ".".join(path)
    config = fam.config
    if module in FUSED:
        d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads, groups = config.num_attention_heads, config.num_key_value_heads
        rows = {"q_proj": heads * d, "k_proj": groups * d, "v_proj": groups * d}
        rows |= {"gate_proj": config.intermediate_size, "up_proj": config.intermediate_size}
        stacked = FUSED[module]
        cut = [e[name].split([rows[p] for p in stacked]) for e in experts]
        return torch.cat(
            [
                dense_reference(
                    f"{stem}.{p}.{param}",
                    config,
                    [{f"{stem}.{p}.{param}": pieces[i]} for pieces in cut],
                    scores,
                )
                for i, p in enumerate(stacked)
            ]
        )
    if fam.arch in ROW_NORMS and module in ("q_norm", "k_norm"):
        twin = f"{stem}.{module[0]}_proj.bias"  # rows like q_proj's / k_proj's bias
        return dense_reference(twin, config, [{twin: e[name]} for e in experts], scores)
    return dense_reference(name, config, experts, scores)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """Every family's `wp` merge, all run by one plain `mergekit-multi` (mergekit's CLI for
    several recipes; each runs as under mergekit-yaml) in a fresh interpreter that only the
    start-up hook gives `wp`: one mergekit-yaml per family would spend ~4.5 s of CPU each on
    importing torch and mergekit. Returns ({arch: (Family, scores, output folder)}, the run)."""
    root = tmp_path_factory.mktemp("families")
    runs, recipes = {}, []
    for arch in FAMILIES:
        config = arch_config(arch)
        folder = root / arch
        paths = [save_model(folder / name, config, seed) for seed, name in enumerate("bxyz")]
        fam = Family(arch, folder, paths[0], paths[1:], config, load_shape(paths[0]))
        scores = random_scores(fam, seed=1)
        for k, (heads, neurons) in enumerate(scores):
            # Expert 1 alone is positive on KV group 0 of layer 0 (heads 0, 1), expert 2 alone
            # on neuron 5 of layer 1: each must come out as that expert's slice, bit for bit.
            heads[0, :2] = 3.0 if k == 1 else -float(k)
            neurons[1, 5] = 2.0 if k == 2 else -float(k)
        recipes.append({"name": arch, **wp_recipe(fam, score_files(fam, scores, "s"))})
        runs[arch] = (fam, scores, root / "out" / arch)
    recipe = root / "families.yml"
    recipe.write_text(yaml.safe_dump_all(recipes))
    environ = {k: v for k, v in os.environ.items() if k != "MERGEKIT_WP_NO_HOOK"}
    args = [VENV_BIN / "mergekit-multi", recipe, "-I", root / "out", "--no-copy-tokenizer"]
    result = subprocess.run(
        [str(a) for a in args],
        check=False,
        capture_output=True,
        text=True,
        env={**environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    return runs, result


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_wp_through_plain_mergekit_matches_reference_and_loads(arch, merged):
    runs, result = merged
    assert result.returncode == 0, result.stderr[-3000:]
    fam, scores, out_dir = runs[arch]
    config = fam.config
    out = load_output(out_dir)
    inputs = [load_inputs(e) for e in fam.experts]
    assert set(out) >= set(inputs[0])
    for name, tensor in out.items():
        want = _reference(name, fam, inputs, scores)
        torch.testing.assert_close(tensor.double(), want, rtol=1e-6, atol=1e-6, msg=name)
    if arch in ("qwen3", "gemma3", "cohere", *ROW_NORMS):
        assert "model.layers.0.self_attn.q_norm.weight" in out  # merged as checked above

    e1, e2 = (load_file(fam.experts[k] / "model.safetensors") for k in (1, 2))
    shape, d = fam.shape, fam.shape.head_dim
    owned = [(e1, Component("head", 0, h)) for h in (0, 1)] + [(e2, Component("neuron", 1, 5))]
    for expert, component in owned:
        for name, index in shape.slices(component).items():
            if name in expert:
                assert torch.equal(out[name][index], expert[name][index]), name
    for name, role in shape.unit_tensors(0, "kv_group"):  # KV group 0 of heads 0, 1
        if name in e1:
            index = shape.unit_slice(role, 0, e1[name].ndim)
            assert torch.equal(out[name][index], e1[name][index]), name
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
