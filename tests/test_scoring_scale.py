"""Scoring at scale: Δθ computed once per run, one expert forward per batch under KL, the KL
readout in chunks, `dtype: auto`, progress and the missing-chat-template error."""

from __future__ import annotations

import logging

import pytest
import torch

from mergekit_wp import io as model_io
from mergekit_wp.scoring import attribution, utility
from mergekit_wp.scoring.attribution import gradient_pass
from mergekit_wp.scoring.config import DataConfig
from mergekit_wp.scoring.exact import batch_scores, layer_sums
from mergekit_wp.scoring.forward import TokenBatch, forward_to, model_shape
from mergekit_wp.scoring.inputs import load_examples
from mergekit_wp.scoring.utility import KLUtility, batch_context, gap_weights
from tests.test_scoring_helpers import model_pair, write_domain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(
    seed: int, vocab: int = 300, rows: int = 3, width: int = 10, response: int = 4
) -> TokenBatch:
    """Left-padded random tokens; the last `response` logits but one predict the response."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    for row in range(rows):
        mask[row, : row % 3] = 0
    responses = torch.zeros(rows, width, dtype=torch.bool)
    responses[:, width - response - 1 : width - 1] = True
    return TokenBatch(
        ids.masked_fill(mask == 0, 1),
        mask,
        (mask.cumsum(-1) - 1).clamp(min=0),
        responses,
        tuple(range(rows)),
    )


def _naive_wp_attr(base, sft, batch, kl, weights) -> dict[str, torch.Tensor]:
    """Per-batch WP-attr written out: Δθ, gradient and the per-unit sums of every tensor."""
    shape = model_shape(base)
    heads, width = shape.num_attention_heads, shape.head_dim
    out = {p: torch.zeros(shape.num_hidden_layers, heads, dtype=torch.float64) for p in ("q", "o")}
    out |= {
        p: torch.zeros(shape.num_hidden_layers, shape.intermediate_size, dtype=torch.float64)
        for p in ("gate", "up", "down")
    }
    names = {
        "q": "self_attn.q_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    }
    params = {}
    for layer in range(shape.num_hidden_layers):
        for part, path in names.items():
            params[(layer, part)] = base.get_parameter(f"model.layers.{layer}.{path}.weight")
    for p in params.values():
        p.requires_grad_(True)
    with torch.enable_grad():
        loss = (kl(base, batch).double() * weights).sum()
        grads = torch.autograd.grad(loss, list(params.values()))
    for p in params.values():
        p.requires_grad_(False)
    for ((layer, part), p), grad in zip(params.items(), grads):
        sft_p = sft.get_parameter(f"model.layers.{layer}.{names[part]}.weight")
        product = (sft_p - p) * grad
        if part == "q":
            values = product.sum(1).view(heads, width).sum(1)
        elif part == "o":
            values = product.sum(0).view(heads, width).sum(1)
        else:
            values = product.sum(1 if part in ("gate", "up") else 0)
        out[part][layer] = values.double()
    return out


def _plain_delta(base_param: torch.Tensor, sft_param: torch.Tensor) -> torch.Tensor:
    return (sft_param - base_param).detach()


def test_delta_reuse_gives_the_per_batch_scores_and_is_computed_once(monkeypatch):
    base, sft = model_pair("llama", dtype=torch.float32)
    kl = KLUtility(sft, chunk_positions=5)
    calls = []
    monkeypatch.setattr(
        attribution, "task_delta", lambda b, s: calls.append(1) or _plain_delta(b, s)
    )
    deltas: dict[str, torch.Tensor] = {}
    for seed in (0, 1, 2):
        batch = _batch(seed)
        _, _, weights = batch_context(base, sft, batch, kl, 1e-6)
        parts = gradient_pass(base, sft, batch, kl, weights, deltas=deltas)["wp_attr"]
        naive = _naive_wp_attr(base, sft, batch, kl, weights)
        for part, values in naive.items():
            torch.testing.assert_close(parts[part], values, atol=1e-6, rtol=1e-5)
    slots = model_shape(base).num_hidden_layers * 5  # q, o, gate, up, down weights (no biases)
    assert len(deltas) == slots and len(calls) == slots  # three batches, Δθ once


def test_bf16_keeps_delta_in_bf16_and_follows_the_fp64_scores():
    import copy

    base, sft = (m.to(torch.bfloat16) for m in model_pair("llama", dtype=torch.float32))
    base64, sft64 = (copy.deepcopy(m).to(torch.float64) for m in (base, sft))  # the same weights
    kl, kl64 = KLUtility(sft), KLUtility(sft64)
    batch = _batch(0)
    weights = batch_context(base64, sft64, batch, kl64, 1e-6)[2]
    deltas: dict[str, torch.Tensor] = {}
    low = gradient_pass(base, sft, batch, kl, weights, deltas=deltas)["wp_attr"]
    exact = gradient_pass(base64, sft64, _batch(0), kl64, weights)["wp_attr"]
    assert {d.dtype for d in deltas.values()} == {torch.bfloat16}  # half an fp32 copy's memory
    for part, values in exact.items():
        assert float((low[part] - values).norm() / values.norm()) < 0.05, part


def _count_forwards(model) -> list[int]:
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(1), with_kwargs=True)
    return seen


def test_the_expert_runs_once_per_batch_under_kl():
    base, sft = model_pair("llama", dtype=torch.float32)
    kl = KLUtility(sft)
    expert = _count_forwards(sft)
    # The pipeline's gradient step: F(M_sft) for the gap, then the base's forward + backward.
    batch = _batch(0)
    f_sft = kl(sft, batch).double()
    assert torch.equal(f_sft, torch.zeros(3, dtype=torch.float64))
    gradient_pass(base, sft, batch, kl, lambda f_base: gap_weights(f_base, f_sft, 1e-6))
    assert len(expert) == 1
    # Gaps, then every exact head of every layer on the same batch: still one.
    batch = _batch(1)
    _, _, weights = batch_context(base, sft, batch, kl, 1e-6)
    shape = model_shape(base)
    plan = {layer: range(shape.num_attention_heads) for layer in range(shape.num_hidden_layers)}
    batch_scores(base, sft, batch, kl, "wp", "head", plan, weights)
    assert len(expert) == 2


def test_chunked_kl_readout_equals_the_unchunked_formula(monkeypatch):
    base, sft = model_pair(
        "llama",
        dtype=torch.float32,
        vocab_size=50_000,
        hidden_size=16,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    batch = _batch(3, vocab=50_000, rows=3, width=16, response=9)
    variants = 3
    layer = model_shape(base).num_hidden_layers - 1
    with torch.no_grad():
        hidden = forward_to(base, batch, layer)
        noise = 0.1 * torch.randn(
            variants, *hidden.shape, generator=torch.Generator().manual_seed(4)
        )
        stacked = (hidden.unsqueeze(0) + noise).flatten(0, 1)  # V variants, variant-major
        # The unchunked formula: log-softmax of every response position at once.
        mask = batch.response_mask
        log_ref = torch.log_softmax(
            sft(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).logits[mask],
            -1,
        )
        logits = base.lm_head(base.model.norm(stacked))
        log_p = torch.log_softmax(logits[mask.repeat(variants, 1)], -1)
        ref = log_ref.repeat(variants, 1)
        kl_rows = (ref.exp() * (ref - log_p)).sum(-1)
        per_row = mask.repeat(variants, 1).sum(-1)
        expected = -torch.stack([part.sum() for part in kl_rows.split(per_row.tolist())]) / per_row
    widest = []
    original = utility.logits_from_hidden
    monkeypatch.setattr(
        utility,
        "logits_from_hidden",
        lambda model, h: widest.append(h.shape[0]) or original(model, h),
    )
    for chunk in (4, 7, 1000):
        with torch.no_grad():
            values = KLUtility(sft, chunk_positions=chunk).readout(base, stacked, batch)
        torch.testing.assert_close(values, expected, atol=1e-6, rtol=1e-5)
        assert max(widest) == min(chunk, variants * int(mask.sum()))  # never more than one chunk
        widest.clear()


def _cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(
        f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\n"
        f"processor\t: 1\nflags\t\t: fpu sse2 avx2 {flags}\n"
    )
    return path


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("avx512f avx512_bf16", "bfloat16"),
        ("amx_tile amx_bf16", "bfloat16"),
        ("avx512f", "float32"),
    ],
)
def test_auto_dtype_follows_native_bf16_and_says_why(
    tmp_path, monkeypatch, caplog, flags, expected
):
    monkeypatch.setattr(model_io, "_CPUINFO", _cpuinfo(tmp_path, flags))
    with caplog.at_level(logging.INFO, logger=model_io.__name__):
        assert model_io.resolve_dtype("auto", "cpu") == expected
    assert f"dtype: auto -> {expected}" in caplog.text
    assert ("has native bf16 (" in caplog.text) == (expected == "bfloat16")
    assert model_io.resolve_dtype("float32", "cpu") == "float32"  # an explicit dtype is kept
    assert model_io.auto_dtype("cuda:0")[0] == "bfloat16"


def test_auto_dtype_without_cpuinfo_is_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(model_io, "_CPUINFO", tmp_path / "missing")
    assert model_io.auto_dtype("cpu")[0] == "float32"


def test_exact_layers_report_progress_per_chunk_of_units():
    base, sft = model_pair("llama", dtype=torch.float32)
    kl = KLUtility(sft)
    batch = _batch(0)
    _, _, weights = batch_context(base, sft, batch, kl, 1e-6)
    steps: list[int] = []
    units = list(range(model_shape(base).intermediate_size))
    with_progress = layer_sums(
        base,
        sft,
        batch,
        kl,
        "wp",
        "neuron",
        1,
        units,
        weights,
        max_variant_rows=2 * len(batch),
        on_units=steps.append,
    )
    assert steps == [2] * (len(units) // 2)
    torch.testing.assert_close(
        with_progress, layer_sums(base, sft, batch, kl, "wp", "neuron", 1, units, weights)
    )


def test_missing_chat_template_names_the_data_chat_key(tmp_path, tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__.from_pretrained(_saved(tiny_tokenizer, tmp_path))
    tokenizer.chat_template = None
    source = str(write_domain(tmp_path / "math.jsonl"))
    with pytest.raises(
        ValueError, match=r"math\.jsonl: .*no chat template; set `data\.chat: false`"
    ):
        load_examples(DataConfig(source=source, kind="domain", responses="reference"), tokenizer)
    raw = load_examples(
        DataConfig(source=source, kind="domain", responses="reference", chat=False),
        tokenizer,
        need_responses=True,
    )
    assert raw[0].prompt == "What is 2 plus 3?"


def _saved(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def test_response_generation_shows_progress(tmp_path, tiny_tokenizer, capsys):
    from tests.conftest import tiny_llama

    model = tiny_llama(len(tiny_tokenizer))
    source = str(write_domain(tmp_path / "math.jsonl"))
    examples = load_examples(
        DataConfig(source=source, kind="domain", max_new_tokens=3),
        tiny_tokenizer,
        model,
        need_responses=True,
    )
    assert len(examples) == 5 and all(e.response is not None for e in examples)
    assert "generate 5 responses x 3 tokens" in capsys.readouterr().err


def test_gradients_are_consumed_as_backward_produces_them(monkeypatch):
    base, sft = model_pair("llama", dtype=torch.float32)
    kl = KLUtility(sft)
    batch = _batch(0)
    _, _, weights = batch_context(base, sft, batch, kl, 1e-6)
    names = {id(p): name for name, p in base.named_parameters()}
    order = []
    original = attribution.task_delta
    monkeypatch.setattr(
        attribution, "task_delta", lambda b, s: order.append(names[id(b)]) or original(b, s)
    )
    gradient_pass(base, sft, batch, kl, weights)
    # Backward reaches the last layer first: its tensors are scored (and their gradients
    # dropped) before the first layer's gradients exist.
    last = model_shape(base).num_hidden_layers - 1
    assert order[0].startswith(f"model.layers.{last}.") and order[-1].startswith("model.layers.0.")
    assert all(p.grad is None and not p.requires_grad for p in base.parameters())


def test_ap_attr_under_kl_reads_the_experts_activations_when_its_reference_is_cached():
    # The pipeline's gap step fills the batch's KL reference first; AP-attr still needs the
    # expert's activations, so it must run the expert itself (it crashed with a KeyError).
    base, sft = model_pair("llama", dtype=torch.float64)
    kl = KLUtility(sft)
    fresh = gradient_pass(base, sft, _batch(2), kl, torch.ones(3), ap_attr=True)
    cached = _batch(2)
    kl(sft, cached)
    assert "kl_reference" in cached.cache
    again = gradient_pass(base, sft, cached, kl, torch.ones(3), ap_attr=True)
    for key in ("heads", "neurons"):
        assert torch.allclose(again["ap_attr"][key], fresh["ap_attr"][key], rtol=1e-9, atol=1e-12)
        assert fresh["ap_attr"][key].abs().sum() > 0
