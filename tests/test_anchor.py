"""Vector anchor: residual capture, steering hooks, paired data, task vectors, the layer sweep."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from mergekit_wp.components import ModelShape
from mergekit_wp.generation import encode_left_padded, generate, render_chat
from mergekit_wp.scoring.anchor import (
    Anchor,
    CorrectionRow,
    CorrectionTable,
    correction_rate,
    fit_anchor,
    load_anchor,
    plot_correction_rates,
    save_anchor,
    task_vectors,
)
from mergekit_wp.scoring.data import PairedExample, load_domain, load_paired, split_paired
from mergekit_wp.scoring.hooks import capture_residuals, steering
from tests.conftest import TINY_SHAPE, tiny_llama

PROMPTS = ["the dog", "the quick brown fox jumps over", "a, b"]


def _shaped(model):
    model.config.architectures = [type(model).__name__]
    return model, ModelShape.from_config(model.config)


def _llama(tokenizer, seed=0, dtype=torch.float64):
    return _shaped(tiny_llama(len(tokenizer), seed=seed).to(dtype))


def _other_arch(name: str, vocab: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = {"vocab_size": vocab, **TINY_SHAPE}
    torch.manual_seed(0)
    if name == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        # fp32: HF's eager Gemma2 turns left-padded fp64 batches into NaN (its mask), fp32 is fine.
        return _shaped(Gemma2ForCausalLM(Gemma2Config(head_dim=8, **common)).eval())
    return _shaped(model.double().eval())


# --- capture ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_capture_equals_hf_hidden_states(tiny_tokenizer, arch):
    if arch == "llama":
        model, shape = _llama(tiny_tokenizer)
    else:
        model, shape = _other_arch(arch, len(tiny_tokenizer))
    batch = encode_left_padded(tiny_tokenizer, PROMPTS)
    with torch.no_grad():
        hf = model(
            input_ids=batch[0],
            attention_mask=batch[1],
            position_ids=batch[2],
            output_hidden_states=True,
        ).hidden_states
        z = capture_residuals(model, shape, *batch)
    L, real = shape.num_hidden_layers, batch[1].bool()
    assert sorted(z) == list(range(L)) and len(hf) == L + 1
    for layer in range(L - 1):
        torch.testing.assert_close(z[layer][real], hf[layer + 1][real], rtol=0, atol=1e-12)
    # HF's last hidden state is the final norm of the last layer's output, not z_{L-1} itself.
    assert not torch.allclose(z[L - 1][real], hf[L][real])
    torch.testing.assert_close(model.model.norm(z[L - 1])[real], hf[L][real], rtol=0, atol=1e-6)


def test_capture_stops_early_and_selects_layers(tiny_tokenizer):
    model, shape = _llama(tiny_tokenizer)
    calls = []
    for module, name in ((model.lm_head, "lm_head"), (model.model.layers[2], "layer2")):
        module.register_forward_hook(lambda *a, name=name: calls.append(name))
    batch = encode_left_padded(tiny_tokenizer, PROMPTS)
    with torch.no_grad():
        early = capture_residuals(model, shape, *batch, layers=[1, 0])
        assert calls == [] and sorted(early) == [0, 1]
        full = capture_residuals(model, shape, *batch, stop_early=False)
    assert calls == ["layer2", "lm_head"]
    torch.testing.assert_close(early[1], full[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="out of range"):
        capture_residuals(model, shape, *batch, layers=[3])


def test_capture_left_padded_equals_unpadded(tiny_tokenizer):
    model, shape = _llama(tiny_tokenizer)
    batch = encode_left_padded(tiny_tokenizer, PROMPTS)
    with torch.no_grad():
        padded = capture_residuals(model, shape, *batch)
        for i, text in enumerate(PROMPTS):
            single = encode_left_padded(tiny_tokenizer, [text])
            alone = capture_residuals(model, shape, *single)
            n = single[0].shape[1]
            for layer in range(shape.num_hidden_layers):
                torch.testing.assert_close(
                    padded[layer][i, -n:], alone[layer][0], rtol=0, atol=1e-10
                )


def test_capture_keeps_autograd_graph(tiny_tokenizer):
    model, shape = _llama(tiny_tokenizer)
    z = capture_residuals(model, shape, *encode_left_padded(tiny_tokenizer, PROMPTS), layers=[1])
    z[1][:, -1].sum().backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


# --- steering ---------------------------------------------------------------------------------
def _direction(d: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("mode", ["anchor", "all"])
def test_steering_sets_projection(tiny_tokenizer, mode):
    model, shape = _llama(tiny_tokenizer)
    batch = encode_left_padded(tiny_tokenizer, PROMPTS)
    v = _direction(shape.hidden_size)
    unit, target, layer = v / v.norm(), 2.5, 1
    with torch.no_grad():
        plain = capture_residuals(model, shape, *batch, stop_early=False)
        with steering(model, shape, layer, 3.0 * v, target, mode=mode):
            steered = capture_residuals(model, shape, *batch, stop_early=False)
    real = batch[1].bool()
    if mode == "anchor":
        projection = steered[layer][:, -1] @ unit
        torch.testing.assert_close(projection, torch.full_like(projection, target))
        torch.testing.assert_close(steered[layer][:, :-1], plain[layer][:, :-1], rtol=0, atol=0)
        # a(x) v̂ is the only change: the orthogonal part is kept.
        delta = steered[layer][:, -1] - plain[layer][:, -1]
        torch.testing.assert_close(delta, (target - plain[layer][:, -1] @ unit)[:, None] * unit)
        # Causal attention: positions before the anchor are untouched in later layers too.
        torch.testing.assert_close(steered[2][:, :-1], plain[2][:, :-1], rtol=0, atol=0)
        assert not torch.allclose(steered[2][:, -1], plain[2][:, -1])
    else:
        projection = steered[layer][real] @ unit
        torch.testing.assert_close(projection, torch.full_like(projection, target))
    torch.testing.assert_close(steered[0], plain[0], rtol=0, atol=0)
    # The hooks are gone after the context.
    with torch.no_grad():
        again = capture_residuals(model, shape, *batch)
    torch.testing.assert_close(again[layer], plain[layer], rtol=0, atol=0)


def _manual_greedy(model, shape, tokenizer, text, steps, layer, unit, target, mode):
    """Reference: no KV cache, full recompute each step; steer the prompt's last token (anchor)
    or every position (all) with an explicit hook written independently of hooks.py."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    prompt_len = ids.shape[1]

    def hook(module, args, output):
        out = output.clone()
        rows = slice(prompt_len - 1, prompt_len) if mode == "anchor" else slice(None)
        z, u = out[:, rows], unit.to(out.dtype)
        out[:, rows] = z + (target - z @ u)[..., None] * u
        return out

    handle = model.get_submodule(shape.layer_prefix(layer)).register_forward_hook(hook)
    try:
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=ids, use_cache=False).logits
                nxt = logits[0, -1].argmax()
                if nxt.item() == tokenizer.eos_token_id:
                    break
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    finally:
        handle.remove()
    return tokenizer.decode(ids[0, prompt_len:], skip_special_tokens=True)


@pytest.mark.parametrize(
    "arch, mode", [("llama", "anchor"), ("llama", "all"), ("gemma2", "anchor")]
)
def test_steering_under_generate_with_cache(tiny_tokenizer, arch, mode):
    if arch == "llama":
        model, shape = _llama(tiny_tokenizer, seed=1)
    else:  # hybrid sliding-window cache
        model, shape = _other_arch(arch, len(tiny_tokenizer))
    prompts = [render_chat(tiny_tokenizer, t) for t in PROMPTS]
    v = _direction(shape.hidden_size, seed=5)
    unit, target, layer = v / v.norm(), 4.0, 1
    with steering(model, shape, layer, v, target, mode=mode):  # two batches: two prefills
        got = generate(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=2)
    want = [
        _manual_greedy(model, shape, tiny_tokenizer, p, 6, layer, unit, target, mode)
        for p in prompts
    ]
    assert got == want
    assert got != generate(model, tiny_tokenizer, prompts, max_new_tokens=6, batch_size=3)


def test_steering_rejects_bad_arguments(tiny_tokenizer):
    model, shape = _llama(tiny_tokenizer)
    zero, ones = torch.zeros(shape.hidden_size), torch.ones(shape.hidden_size)
    with pytest.raises(ValueError, match="non-zero"), steering(model, shape, 0, zero, 1.0):
        pass
    with pytest.raises(ValueError, match="mode"), steering(model, shape, 0, ones, 1.0, "every"):
        pass


# --- data -------------------------------------------------------------------------------------
def _rows(n_per_task: int = 6) -> list[dict]:
    rows = []
    specs = [
        ("english_capital", "change_case:english_capital", "Answer in capitals only."),
        ("no_comma", "punctuation:no_comma", "Do not use any commas."),
    ]
    for task, instruction_id, instruction in specs:
        for i in range(n_per_task):
            base = f"Write about the dog number {i} and the fox"
            rows.append(
                {
                    "key": len(rows),
                    "prompt": f"{base}. {instruction}",
                    "prompt_without_instruction": f"{base}.",
                    "instruction_id_list": [instruction_id],
                    "kwargs": [{}],
                    "task": task,
                }
            )
    return rows


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_paired_and_task_filter(tmp_path):
    path = _write_jsonl(tmp_path / "paired.jsonl", _rows())
    examples = load_paired(path)
    assert len(examples) == 12 and isinstance(examples[0], PairedExample)
    only = load_paired(path, tasks=["punctuation:no_comma"])
    assert {e.task for e in only} == {"no_comma"} and len(only) == 6
    with pytest.raises(ValueError, match="title"):
        load_paired(path, tasks=["title"])


def test_load_paired_task_from_instruction_id_and_null_kwargs(tmp_path):
    row = dict(_rows(1)[0], kwargs=[{"num_sections": None}])
    del row["task"]
    (example,) = load_paired(_write_jsonl(tmp_path / "p.jsonl", [row]))
    assert example.task == "english_capital" and example.kwargs == [{}]


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"p\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"p\.jsonl:2: expected a JSON object"),
        (json.dumps({"prompt": "x"}), r"p\.jsonl:2: missing field\(s\) prompt_without_instruction"),
        (json.dumps(dict(_rows(1)[0], kwargs=[])), r"p\.jsonl:2: kwargs must be a list"),
    ],
)
def test_load_paired_errors_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(_rows(1)[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_paired(path)


def test_load_paired_resolves_zoo_references(tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "ifeval_train.jsonl", _rows(2))
    fake = types.ModuleType("mergekit_wp.zoo")
    fake.data_path = lambda name: tmp_path / name
    monkeypatch.setitem(sys.modules, "mergekit_wp.zoo", fake)
    assert len(load_paired("zoo:ifeval_train.jsonl")) == 4
    with pytest.raises(ValueError, match="does not exist"):
        load_paired("zoo:missing.jsonl")


def test_split_is_disjoint_deterministic_and_stratified(tmp_path):
    examples = load_paired(_write_jsonl(tmp_path / "p.jsonl", _rows(7)))
    extraction, evaluation = split_paired(examples, seed=1)
    keys_a, keys_b = {e.key for e in extraction}, {e.key for e in evaluation}
    assert not keys_a & keys_b and len(keys_a | keys_b) == 14
    assert split_paired(examples, seed=1) == (extraction, evaluation)
    assert split_paired(examples, seed=2) != (extraction, evaluation)
    for task in ("english_capital", "no_comma"):
        assert sum(e.task == task for e in extraction) in (3, 4)
        assert sum(e.task == task for e in evaluation) in (3, 4)
    # Any prefix (max_examples, sweep_examples) covers the tasks in turn, not the first alone.
    for half in (extraction, evaluation):
        assert {e.task for e in half[:2]} == {"english_capital", "no_comma"}


def test_load_domain_gsm8k_and_humaneval(tmp_path):
    math_path = _write_jsonl(tmp_path / "m.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}])
    code_path = _write_jsonl(
        tmp_path / "c.jsonl",
        [
            {
                "task_id": "T/0",
                "prompt": "def f():\n",
                "canonical_solution": "    return 1\n",
                "test": "assert f() == 1",
                "entry_point": "f",
            }
        ],
    )
    (m,) = load_domain(math_path)
    (c,) = load_domain(code_path)
    assert (m.prompt, m.reference) == ("1+1?", "2\n#### 2")
    assert (c.key, c.reference, c.record["entry_point"]) == ("T/0", "    return 1\n", "f")
    with pytest.raises(ValueError, match=r"x\.jsonl:1: expected a `question`"):
        load_domain(_write_jsonl(tmp_path / "x.jsonl", [{"text": "hi"}]))


# --- task vectors and anchor ------------------------------------------------------------------
def test_task_vectors_equal_naive_loop(tiny_tokenizer, tmp_path):
    model, shape = _llama(tiny_tokenizer, seed=2)
    examples = load_paired(_write_jsonl(tmp_path / "p.jsonl", _rows(3)))
    vectors, lambda_bar = task_vectors(model, tiny_tokenizer, examples, batch_size=4)

    # Independent reference: one unpadded example at a time, HF hidden states without the
    # final-norm tie, per-example projections averaged.
    model.config.tie_last_hidden_states = False

    def states(text):
        ids = tiny_tokenizer(
            render_chat(tiny_tokenizer, text), add_special_tokens=False, return_tensors="pt"
        )["input_ids"]
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        return torch.stack([h[0, -1] for h in hs[1:]])  # [L, d]

    inst = torch.stack([states(e.prompt) for e in examples])
    rm = torch.stack([states(e.prompt_without_instruction) for e in examples])
    want_v = (inst - rm).mean(0)
    unit = want_v / want_v.norm(dim=-1, keepdim=True)
    want_lambda = torch.stack([(inst[i] * unit).sum(-1) for i in range(len(examples))]).mean(0)
    assert vectors.shape == (shape.num_hidden_layers, shape.hidden_size)
    torch.testing.assert_close(vectors.double(), want_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lambda_bar.double(), want_lambda, rtol=1e-5, atol=1e-6)


def test_correction_rate_and_best_layer():
    assert correction_rate(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert correction_rate(0.8, 0.2, 0.8) == pytest.approx(1.0)
    assert correction_rate(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)
    assert math.isnan(correction_rate(0.3, 0.4, 0.4))
    rows = tuple(
        CorrectionRow(layer, acc, correction_rate(acc, 0.2, 0.8))
        for layer, acc in enumerate([0.2, 0.5, 0.7, 0.7, 0.3])
    )
    table = CorrectionTable(0.2, 0.8, 10, rows)
    assert table.best_layer() == 2  # the earlier of the tied best layers
    assert CorrectionTable.from_json(table.to_json()) == table


def _anchor(L=4, d=8) -> Anchor:
    rows = tuple(CorrectionRow(i, 0.1 * i, 0.2 * i) for i in range(L))
    return Anchor(
        2,
        torch.randn(L, d),
        torch.randn(L),
        "no_comma",
        CorrectionTable(0.0, 0.5, 10, rows, max_new_tokens=8),
        12,
    )


def test_anchor_save_load_round_trip(tmp_path):
    anchor = _anchor()
    path = tmp_path / "sub" / "anchor.safetensors"
    save_anchor(path, anchor)
    loaded = load_anchor(path)
    assert (loaded.layer, loaded.task, loaded.table, loaded.num_extraction) == (
        2,
        "no_comma",
        anchor.table,
        12,
    )
    torch.testing.assert_close(loaded.vectors, anchor.vectors, rtol=0, atol=0)
    torch.testing.assert_close(loaded.vector, anchor.vectors[2], rtol=0, atol=0)
    torch.testing.assert_close(loaded.unit.norm(), torch.tensor(1.0))
    assert loaded.target == pytest.approx(float(anchor.lambda_bar[2]))
    assert [p.name for p in path.parent.iterdir()] == ["anchor.safetensors"]  # no temp left


def test_load_anchor_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="does not exist"):
        load_anchor(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors: not a readable"):
        load_anchor(junk)
    other = tmp_path / "other.safetensors"
    save_file({"vectors": torch.zeros(2, 3)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="expected 'mergekit-wp-anchor'"):
        load_anchor(other)
    short = tmp_path / "short.safetensors"
    save_file(
        {"vectors": torch.zeros(2, 3)},
        str(short),
        metadata={"format": "mergekit-wp-anchor", "version": "1", "layer": "0"},
    )
    with pytest.raises(ValueError, match=r"missing tensor\(s\) lambda_bar"):
        load_anchor(short)
    bad_layer = tmp_path / "bad.safetensors"
    save_file(
        {"vectors": torch.zeros(2, 3), "lambda_bar": torch.zeros(2)},
        str(bad_layer),
        metadata={"format": "mergekit-wp-anchor", "version": "1", "layer": "5"},
    )
    with pytest.raises(ValueError, match="bad.safetensors: anchor layer 5 is outside 0..1"):
        load_anchor(bad_layer)


def test_fit_anchor_sweep_end_to_end(tiny_tokenizer, tmp_path):
    base, shape = _llama(tiny_tokenizer, seed=0, dtype=torch.float32)
    sft, _ = _llama(tiny_tokenizer, seed=1, dtype=torch.float32)
    examples = load_paired(_write_jsonl(tmp_path / "p.jsonl", _rows(4)), tasks=["no_comma"])
    extraction, evaluation = split_paired(examples, seed=0)
    anchor = fit_anchor(
        base, sft, tiny_tokenizer, extraction, evaluation, max_new_tokens=3, batch_size=4
    )
    table = anchor.table
    assert [row.layer for row in table.rows] == list(range(shape.num_hidden_layers))
    assert anchor.layer == table.best_layer() and anchor.task == "no_comma"
    assert table.num_examples == 2 and 0 <= table.acc_base <= 1 and 0 <= table.acc_inst <= 1
    for row in table.rows:
        want = correction_rate(row.acc_steer, table.acc_base, table.acc_inst)
        assert row.correction_rate == pytest.approx(want, nan_ok=True)
    png = tmp_path / "rates.png"
    plot_correction_rates({anchor.task: table}, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    save_anchor(tmp_path / "a.safetensors", anchor)
    assert load_anchor(tmp_path / "a.safetensors").table.to_json() == table.to_json()  # NaN-safe

    fixed = fit_anchor(base, sft, tiny_tokenizer, extraction, fixed_layer=1)
    assert fixed.layer == 1 and fixed.table is None
    torch.testing.assert_close(fixed.vectors, anchor.vectors)
    with pytest.raises(ValueError, match="share"):
        fit_anchor(base, sft, tiny_tokenizer, extraction, extraction, max_new_tokens=1)


def test_sweep_routes_prompts_and_picks_best_layer(tiny_tokenizer, tmp_path, monkeypatch):
    """Scripted generation: the base breaks `no_comma` unless steered at layer 1, the specialized
    model follows it; checks which model sees which prompts and the resulting table."""
    from mergekit_wp import generation

    base, shape = _llama(tiny_tokenizer, seed=0, dtype=torch.float32)
    sft, _ = _llama(tiny_tokenizer, seed=1, dtype=torch.float32)
    examples = load_paired(_write_jsonl(tmp_path / "p.jsonl", _rows(4)), tasks=["no_comma"])
    extraction, evaluation = split_paired(examples, seed=0)
    seen = []

    def scripted(model, tokenizer, prompts, max_new_tokens=128, batch_size=16, progress=False):
        steered = [l for l in range(shape.num_hidden_layers) if base.model.layers[l]._forward_hooks]
        seen.append((model is sft, steered, list(prompts)))
        follows = model is sft or steered == [1]
        return ["plain words" if follows else "a, b"] * len(prompts)

    monkeypatch.setattr(generation, "generate", scripted)
    anchor = fit_anchor(base, sft, tiny_tokenizer, extraction, evaluation, steer_on="rm")
    table = anchor.table
    assert (table.acc_base, table.acc_inst) == (0.0, 1.0)
    assert [r.correction_rate for r in table.rows] == [0.0, 1.0, 0.0]
    assert anchor.layer == 1
    inst = [render_chat(tiny_tokenizer, e.prompt) for e in evaluation]
    removed = [render_chat(tiny_tokenizer, e.prompt_without_instruction) for e in evaluation]
    assert seen[:2] == [(False, [], inst), (True, [], inst)]
    assert seen[2:] == [(False, [layer], removed) for layer in range(shape.num_hidden_layers)]


def test_fit_task_anchors_writes_one_anchor_per_task(tiny_tokenizer, tmp_path, monkeypatch):
    from mergekit_wp import generation
    from mergekit_wp.scoring.anchor import fit_task_anchors

    base, _ = _llama(tiny_tokenizer, seed=0, dtype=torch.float32)
    sft, _ = _llama(tiny_tokenizer, seed=1, dtype=torch.float32)
    monkeypatch.setattr(
        generation,
        "generate",
        lambda model, tokenizer, prompts, *a, **k: (
            ["ok" if model is sft else "a, b"] * len(prompts)
        ),
    )
    examples = load_paired(_write_jsonl(tmp_path / "p.jsonl", _rows(4)))
    anchors = fit_task_anchors(base, sft, tiny_tokenizer, examples, tmp_path / "out")
    assert sorted(anchors) == ["english_capital", "no_comma"]
    for task, anchor in anchors.items():
        assert anchor.num_extraction == 2 and anchor.task == task
        assert load_anchor(tmp_path / "out" / f"anchor-{task}.safetensors").layer == anchor.layer
    assert (tmp_path / "out" / "correction_rates.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "out" / "correction_rates.md").read_text().splitlines()
    assert table[0].startswith("| task | n | Acc_base | Acc_inst | l_a | R(l_a) | R0 | R1 | R2 |")
    assert table[3].startswith("| no_comma | 2 | 0.000 | 1.000 | 0 | 0.00 |")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "anchor-english_capital.safetensors",
        "anchor-no_comma.safetensors",
        "correction_rates.md",
        "correction_rates.png",
    ]


def test_sweep_with_added_pad_token_needs_base_tokenizer(tiny_tokenizer, tmp_path):
    """The specialized model added a pad token (larger vocabulary): the base pads with its own."""
    import copy

    sft_tokenizer = copy.deepcopy(tiny_tokenizer)
    sft_tokenizer.add_special_tokens({"pad_token": "<sft_pad>"})
    base, _ = _shaped(tiny_llama(len(tiny_tokenizer), seed=0))
    sft, _ = _shaped(tiny_llama(len(sft_tokenizer), seed=1))
    examples = load_paired(_write_jsonl(tmp_path / "p.jsonl", _rows(2)), tasks=["no_comma"])
    extraction, evaluation = split_paired(examples)
    with pytest.raises(ValueError, match="outside the base model's vocabulary.*base_tokenizer"):
        fit_anchor(base, sft, sft_tokenizer, extraction, evaluation, max_new_tokens=1)
    anchor = fit_anchor(
        base,
        sft,
        sft_tokenizer,
        extraction,
        evaluation,
        max_new_tokens=1,
        base_tokenizer=tiny_tokenizer,
    )
    assert len(anchor.table.rows) == 3
