"""Analyses: each number against an independent small computation on tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

from mergekit_wp.analyses import scoring_api as api
from mergekit_wp.analyses.attention import attention_mass, instruction_token_mask
from mergekit_wp.analyses.cross_task import _diagonal_means, intersection_counts
from mergekit_wp.analyses.drift import ATTENTION, MLP, parameter_drift
from mergekit_wp.analyses.fidelity import measure
from mergekit_wp.analyses.fine_grained import part_scores
from mergekit_wp.analyses.hierarchy import recover_circuit
from mergekit_wp.analyses.knockout import ladder, top_fraction_sets
from mergekit_wp.analyses.links import NeedUtility, link_strengths, need_directions
from mergekit_wp.analyses.overlap import traced_overlaps
from mergekit_wp.analyses.ranking import layer_mask, overlap, random_k, top_k
from mergekit_wp.analyses.study import null_instruct
from mergekit_wp.analyses.vocab import project_to_vocab, top_tokens, write_back_directions
from mergekit_wp.components import Component, ModelShape
from mergekit_wp.scoring.utility import batch_context
from tests.analyses_fixtures import make_study, model_pair, tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: more threads than cores makes small models ~100x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("study"))


# --- rankings -----------------------------------------------------------------------------
def test_top_k_matches_a_sort_and_overlaps_itself():
    scores = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    for absolute in (False, True):
        picked = top_k(scores, 5, "neuron", absolute=absolute)
        key = scores.abs() if absolute else scores
        manual = sorted(
            ((float(key[l, u]), l, u) for l in range(3) for u in range(7)), reverse=True
        )[:5]
        assert [(c.layer, c.index) for c in picked] == [(l, u) for _, l, u in manual]
        assert overlap(picked, picked) == 1.0
    mask = layer_mask(3, 7, 1, "downstream")
    assert all(c.layer == 2 for c in top_k(scores, 20, "neuron", mask))
    assert len(top_k(scores, 20, "neuron", mask)) == 7


def test_random_k_is_reproducible_and_inside_the_mask():
    mask = layer_mask(4, 5, 1, "upstream")
    a, b = random_k(4, 5, 6, "head", 3, mask), random_k(4, 5, 6, "head", 3, mask)
    assert a == b and len(set(a)) == 6 and all(c.layer <= 1 for c in a)


def test_overlap_and_intersection_counts_against_sets():
    a = [Component("neuron", 0, i) for i in range(4)]
    b = [Component("neuron", 0, i) for i in range(2, 8)]
    assert overlap(a, b) == 0.5
    counts = intersection_counts({"x": a, "y": b, "z": a[:1]})
    assert counts == [[4, 2, 1], [2, 6, 0], [1, 0, 1]]


# --- weights-only analyses --------------------------------------------------------------------
def test_drift_against_a_naive_loop():
    tok = tokenizer()
    base, sft = model_pair(len(tok), only_components=False)
    shape = ModelShape.from_config(sft.config)
    drift = parameter_drift(base.state_dict(), sft.state_dict(), shape)
    b, s = base.state_dict(), sft.state_dict()
    modules = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    for part in ATTENTION + MLP:
        for layer in range(shape.num_hidden_layers):
            name = f"model.layers.{layer}.{modules[part]}.weight"
            rows = [
                abs(x - y)
                for rb, rs in zip(b[name].tolist(), s[name].tolist())
                for x, y in zip(rb, rs)
            ]
            assert drift[part][layer] == pytest.approx(sum(rows) / len(rows), rel=1e-12)


def test_vocab_projection_is_final_norm_then_unembedding(study):
    model = study.instruct
    vectors = torch.randn(3, study.shape.hidden_size, dtype=torch.float64)
    norm = model.model.norm
    manual = []
    for v in vectors:
        rms = math.sqrt(sum(x * x for x in v.tolist()) / len(v) + norm.variance_epsilon)
        normed = v / rms * norm.weight
        manual.append(model.lm_head.weight @ normed)
    torch.testing.assert_close(
        project_to_vocab(model, vectors).double(), torch.stack(manual), rtol=1e-5, atol=1e-5
    )
    top = top_tokens(study.tokenizer, torch.stack(manual), 3)
    assert top[0][0] == study.tokenizer.decode([int(torch.stack(manual)[0].argmax())])
    n = Component("neuron", 2, 5)
    wb = write_back_directions(model, study.shape, [n])
    assert torch.equal(wb[0], model.model.layers[2].mlp.down_proj.weight[:, 5].float())


# --- patching and behaviour ---------------------------------------------------------------------
def _responses(study, model, task):
    from mergekit_wp.generation import generate, render_chat

    prompts = [render_chat(study.tokenizer, e.prompt) for e in study.eval_examples(task)]
    return generate(model, study.tokenizer, prompts, study.config.max_new_tokens)


def test_restore_empty_is_base_and_restore_all_is_instruct(study):
    task = "no_comma"
    every = list(study.shape.components())
    base_out, inst_out = (
        _responses(study, study.base, task),
        _responses(study, study.instruct, task),
    )
    assert base_out != inst_out  # the pair must differ for the check to mean anything
    with study.restored([]):
        assert _responses(study, study.base, task) == base_out
    with study.restored(every):
        assert _responses(study, study.base, task) == inst_out
    with study.ablated(every):
        assert _responses(study, study.instruct, task) == base_out
    assert _responses(study, study.base, task) == base_out  # undone on exit
    assert study.restore_accuracy(task, []) == study.base_accuracy(task)
    assert study.restore_accuracy(task, every) == study.instruct_accuracy(task)
    assert study.knockout_accuracy(task, every) == study.base_accuracy(task)


def _logit_behaviour(study):
    """Swap a study's behaviour for a fingerprint of the logits, one value per distinct model."""
    ids = study.tokenizer("the red fox ran, and the dog sat.", return_tensors="pt")["input_ids"]
    vocab = len(study.tokenizer)

    def fingerprint(model, task, label=None):
        with torch.no_grad():
            return float(model(input_ids=ids).logits[..., :vocab].double().sum())

    study.accuracy = fingerprint
    return fingerprint(study.base, ""), fingerprint(study.instruct, "")


def test_whole_model_swap_is_the_other_model_with_an_added_vocabulary_row(tmp_path):
    # Δθ everywhere (norms, embeddings, lm_head too) and one extra vocabulary row,
    # like the zoo's pad.
    study = make_study(tmp_path, only_components=False)
    study.instruct.resize_token_embeddings(len(study.tokenizer) + 1)
    task = "no_comma"
    base_out, inst_out = (
        _responses(study, study.base, task),
        _responses(study, study.instruct, task),
    )
    assert base_out != inst_out
    groups = ("component", "kv", "other", "embedding", "unembedding")
    with api.patched_tensors(study.base, study.instruct, groups):
        assert _responses(study, study.base, task) == inst_out
    with api.patched_tensors(study.instruct, study.base, groups):
        assert _responses(study, study.instruct, task) == base_out
    assert _responses(study, study.base, task) == base_out  # undone on exit
    # Whole component tensors and every component's slices are the same thing.
    with api.patched_tensors(study.base, study.instruct, ("component",)):
        whole_tensors = _responses(study, study.base, task)
    with study.restored(list(study.shape.components())):
        assert _responses(study, study.base, task) == whole_tensors
    base, inst = _logit_behaviour(study)
    rows = ladder(study, task)
    assert rows["whole model"] == {
        "restore": pytest.approx(inst, rel=1e-12),
        "knockout": pytest.approx(base, rel=1e-12),
    }
    # Here the non-component tensors changed too, so components alone are not the whole change.
    assert rows["all heads + neurons"]["restore"] != pytest.approx(inst, rel=1e-6)


def test_ladder_on_a_component_only_change(tmp_path):
    # Δθ only in component tensors: all heads + neurons already are the whole change.
    study = make_study(tmp_path)
    base, inst = _logit_behaviour(study)
    assert base != pytest.approx(inst, rel=1e-6)
    rows = ladder(study, "no_comma")
    for label in (
        "all heads + neurons",
        "+ K/V",
        "+ K/V + norms",
        "+ K/V + norms + embeddings",
        "whole model",
    ):
        assert rows[label] == {
            "restore": pytest.approx(inst, rel=1e-12),
            "knockout": pytest.approx(base, rel=1e-12),
        }, label
    assert rows["all but heads + neurons"] == {"restore": base, "knockout": inst}
    for label in ("all heads", "all neurons"):
        assert base != pytest.approx(rows[label]["restore"], rel=1e-6) != inst, label


# --- link strength ----------------------------------------------------------------------------
def _anchor_inputs(study, task="english_capital"):
    return study.utility(task, "anchor"), study.batches(task, "anchor")


def test_need_directions_of_all_heads_sum_to_the_attention_input_gradient(tmp_path):
    study = make_study(tmp_path, num_key_value_heads=4)  # no GQA: each head owns its k/v rows
    utility, batches = _anchor_inputs(study)
    layer = 1
    heads = [Component("head", layer, h) for h in range(study.shape.num_attention_heads)]
    needs = need_directions(study.base, batches[0], utility, heads)
    captured = {}

    def grab(module, args, output):
        output.retain_grad()
        captured["x"] = output

    handle = study.base.model.layers[layer].input_layernorm.register_forward_hook(grab)
    try:
        with torch.enable_grad():
            utility(study.base, batches[0]).sum().backward()
    finally:
        handle.remove()
        study.base.zero_grad(set_to_none=True)
    torch.testing.assert_close(sum(needs.values()), captured["x"].grad, rtol=1e-9, atol=1e-12)


def test_a_layer_0_head_target_has_no_suppliers(study):
    # It reads the embeddings alone, which no component writes: every link is zero (its need
    # utility has no gradient at all, which once stopped the overlap analysis).
    utility, batches = _anchor_inputs(study)
    target, other = Component("head", 0, 1), Component("head", 1, 2)
    links = link_strengths(study.base, study.instruct, batches, utility, [target, other])
    assert links[target]["heads"].abs().sum() == 0 and links[target]["neurons"].abs().sum() == 0
    assert links[other]["heads"][0].abs().sum() > 0


def test_link_strength_matches_finite_differences_and_is_zero_without_delta(study):
    utility, batches = _anchor_inputs(study)
    target = Component("head", 1, 2)
    links = link_strengths(study.base, study.instruct, batches, utility, [target])[target]
    assert (
        links["neurons"][1:].abs().sum() == 0 and links["heads"][1:].abs().sum() == 0
    )  # not earlier
    supplier = Component("neuron", 0, 7)
    need = NeedUtility(target, utility, study.base)
    eps = 1e-2  # LlamaRMSNorm computes in fp32 even in fp64 models: a small eps is all noise
    total, count = 0.0, 0
    for batch in batches:
        _, _, weights = batch_context(study.base, study.instruct, batch, utility, 1e-6)
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                saved = {}
                params = dict(study.base.named_parameters())
                sft = dict(study.instruct.named_parameters())
                for name, index in study.shape.slices(supplier).items():
                    if name in params:
                        saved[name] = params[name][index].clone()
                        params[name][index] += sign * eps * (sft[name][index] - params[name][index])
                values.append(need(study.base, batch).double())
                for name, index in study.shape.slices(supplier).items():
                    if name in saved:
                        params[name][index] = saved[name]
        derivative = (values[0] - values[1]) / (2 * eps)
        total += float(derivative @ weights)
        count += int((weights != 0).sum())
    assert links["neurons"][0, 7].item() == pytest.approx(total / count, rel=2e-3)
    # A supplier whose slices did not change has no link at all.
    with torch.no_grad():
        params, sft = dict(study.base.named_parameters()), dict(study.instruct.named_parameters())
        saved = {n: sft[n][i].clone() for n, i in study.shape.slices(supplier).items() if n in sft}
        for n, i in study.shape.slices(supplier).items():
            if n in sft:
                sft[n][i] = params[n][i]
    try:
        again = link_strengths(study.base, study.instruct, batches, utility, [target])[target]
    finally:
        with torch.no_grad():
            for n, i in study.shape.slices(supplier).items():
                if n in saved:
                    sft[n][i] = saved[n]
    assert again["neurons"][0, 7].item() == 0.0


def test_traced_overlap_against_manual_sets():
    gen = torch.Generator().manual_seed(0)
    wp = torch.randn(3, 10, generator=gen)
    mask = layer_mask(3, 10, 2, "upstream")
    target_a, target_b = Component("head", 2, 0), Component("head", 1, 1)
    links = {target_a: wp.clone(), target_b: torch.randn(3, 10, generator=gen)}
    out = traced_overlaps(links, wp, mask, suppliers=4, k=6, absolute=False)
    wp_top = set(top_k(wp, 6, "neuron", mask))
    expected = []
    for target, link in links.items():
        pool = [(float(link[l, u]), l, u) for l in range(target.layer) for u in range(10)]
        traced = {Component("neuron", l, u) for _, l, u in sorted(pool, reverse=True)[:4]}
        expected.append(len(traced & wp_top) / 4)
    assert sorted(out["per_target"]) == sorted(expected)
    assert out["max"] == max(expected) and out["top20_avg"] == pytest.approx(sum(expected) / 2)


def test_null_instruct_matches_the_change_norm_per_tensor():
    base, instruct = model_pair(64, only_components=False)
    before = {n: p.clone() for n, p in base.named_parameters()}
    null = null_instruct(base, instruct, seed=0)
    tuned = dict(instruct.named_parameters())
    for name, weight in null.named_parameters():
        change, real = weight - before[name], tuned[name] - before[name]
        assert torch.equal(dict(base.named_parameters())[name], before[name])  # base untouched
        assert float(change.norm()) == pytest.approx(float(real.norm()), rel=1e-9), name
        if real.norm() > 0:  # noise, not the instruct model's change
            assert (
                abs(
                    float(
                        torch.nn.functional.cosine_similarity(change.flatten(), real.flatten(), 0)
                    )
                )
                < 0.5
            )
    again = null_instruct(base, instruct, seed=0)
    other = null_instruct(base, instruct, seed=1)
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(dict(again.named_parameters())[name], dict(null.named_parameters())[name])
    assert not torch.equal(
        dict(other.named_parameters())[name], dict(null.named_parameters())[name]
    )


def test_circuit_validation_follows_the_thresholds():
    t = Component("head", 2, 0)
    links = {
        t: {
            "neurons": torch.tensor([[0.5, -1.0, 0.2], [0.0, 0.3, 0.0], [9.0, 9.0, 9.0]]),
            "heads": torch.zeros(3, 2),
        }
    }
    e_w = {
        Component("neuron", 0, 0): 0.4,
        Component("neuron", 1, 1): -0.1,
        Component("neuron", 0, 2): 0.9,
    }
    common = {
        "execution": [],
        "suppliers": 3,
        "supplier_kinds": ("neuron",),
        "aggregation_scores": {t: 1.0},
        "execution_scores": {},
    }
    circuit = recover_circuit(
        [t], links, lambda cs: {c: e_w[c] for c in cs}, tau_w=0.0, tau_link=0.1, **common
    )
    assert [e["source"] for e in circuit["edges"]] == ["N(0,0)", "N(0,2)"]  # N(1,1) fails tau_w
    assert circuit["candidates"] == 3 and circuit["validated_sources"] == 2
    strict = recover_circuit(
        [t], links, lambda cs: {c: e_w[c] for c in cs}, tau_w=0.0, tau_link=0.4, **common
    )
    assert [e["source"] for e in strict["edges"]] == ["N(0,0)"]


# --- attention and parts ------------------------------------------------------------------------
def test_instruction_span_and_attention_mass_against_a_manual_pass(study):
    example = study.eval_examples("no_comma")[0]
    ids, mask = instruction_token_mask(study.tokenizer, example)
    text = study.tokenizer.decode(ids[mask])
    assert "refrain from the use of any commas" in text
    assert example.prompt_without_instruction not in text
    heads = [Component("head", 0, 1), Component("head", 2, 3)]
    mass = attention_mass(study.instruct, study.tokenizer, [example], heads)
    with torch.no_grad():
        study.instruct.set_attn_implementation("eager")
        att = study.instruct(input_ids=ids[None], output_attentions=True).attentions
        study.instruct.set_attn_implementation("sdpa")
    for i, h in enumerate(heads):
        row = att[h.layer][0, h.index, -1].tolist()
        inst = [w for w, m in zip(row, mask.tolist()) if m]
        other = [w for w, m in zip(row, mask.tolist()) if not m]
        assert mass["instruction"][i] == pytest.approx(sum(inst) / len(inst))
        assert mass["other"][i] == pytest.approx(sum(other) / len(other))


def test_part_scores_sum_to_the_full_unit(study):
    parts = study.scores("english_capital", "wp_attr").parts
    full = study.scores("english_capital", "wp_attr").neurons.double()
    torch.testing.assert_close(
        part_scores(parts, ("gate", "up", "down")), full, rtol=1e-5, atol=1e-7
    )
    with pytest.raises(ValueError, match="parts"):
        part_scores({"gate": full}, ("gate", "up"))


def test_measure_reports_time_and_memory():
    result, seconds, peak = measure(lambda: torch.ones(4_000_000).sum())
    assert float(result) == 4_000_000 and seconds > 0 and peak >= 0


def test_top_fraction_takes_that_share_of_each_region_under_its_utility(study):
    task = "no_comma"
    chosen = top_fraction_sets(study, task, "wp", 0.25)
    for kind in ("head", "neuron"):
        for region in ("upstream", "downstream"):
            mask = study.region_mask(kind, region, task)
            picked = [c for c in chosen if c.kind == kind and mask[c.layer, c.index]]
            assert len(picked) == max(1, round(0.25 * int(mask.sum())))
            scores = study.region_scores(task, "wp", kind, region)
            assert picked == top_k(scores, len(picked), kind, mask)
    assert (
        study.region_scores(task, "wp", "neuron", "downstream")
        is study.scores(task, "wp", "kl").neurons
    )


def test_cross_task_diagonal_means_skip_undefined_cells():
    nan = float("nan")
    assert _diagonal_means([[1.0, 0.0, nan], [0.5, 0.5, nan], [0.0, 0.0, nan]]) == (0.75, 0.125)
