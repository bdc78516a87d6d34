"""Scoring speed, side by side in one run (figures for the README).

- WP-attr time / one plain forward+backward of the base (LM loss, all parameters) on the same
  examples (target <= 2), and WP-attr's peak memory in units of one model's weights (<= 3.5).
- Exact head-level WP, batched and prefix-shared, against naive per-component patching
  (in-place slice swap, forward to the anchor layer) on the same examples (target >= 4x on CPU);
  the projected time of exact WP over all neurons.
- With `--zoo` (models built by `mergekit-wp zoo build`): overlap of the top-20 heads and the
  top-10% neurons between exact WP and WP-attr on the instruct expert.

    python benchmarks/scoring_speed.py                      # small random Llama, CPU
    python benchmarks/scoring_speed.py --device cuda --shape llama-3.2-3b --examples 16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import time
from functools import partial

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mergekit_wp.components import Component, ModelShape
from mergekit_wp.scoring.attribution import gradient_pass
from mergekit_wp.scoring.exact import batch_scores, layer_sums
from mergekit_wp.scoring.forward import TokenBatch, trace, weight_bytes
from mergekit_wp.scoring.hooks import capture_residuals
from mergekit_wp.scoring.patching import restore
from mergekit_wp.scoring.utility import AnchorUtility, batch_context, gap_weights

SHAPES = {
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 2048,
    },
    "medium": {
        "hidden_size": 1024,
        "intermediate_size": 2752,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "vocab_size": 2048,
    },
    "llama-3.2-3b": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(device: str, fn):
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def random_pair(shape: str, device: str, dtype: torch.dtype, seed: int = 0):
    """A random Llama base and a specialized copy: base + small noise on every tensor."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
        sft = LlamaForCausalLM(config).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p, q in zip(base.parameters(), sft.parameters()):
            q.copy_(p + 0.02 * p.float().std() * torch.randn_like(p))
    return base, sft


def random_batches(
    vocab: int, examples: int, batch_size: int, length: int, device: str
) -> list[TokenBatch]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, examples, batch_size):
        size = min(batch_size, examples - start)
        ids = torch.randint(3, vocab, (size, length), generator=generator)
        mask = torch.ones_like(ids)
        for row in range(size):  # left padding of a few tokens, different per row
            mask[row, : row % 4] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batches.append(TokenBatch(ids.to(device), mask.to(device), pos.to(device)))
    return batches


def plain_step(model, batches: list[TokenBatch]) -> None:
    """One ordinary LM forward+backward over the batches (all parameters take gradients)."""
    model.requires_grad_(True)
    for batch in batches:
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            labels=batch.input_ids,
        )
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)


def wp_attr(base, sft, batches, utility, deltas: dict | None = None) -> torch.Tensor:
    """WP-attr as the pipeline runs it: the sft's forward, then the base's forward + backward.

    `deltas` is the run's Δθ cache (the pipeline computes Δθ once per run); a fresh one by default.
    """
    total = None
    deltas = {} if deltas is None else deltas
    for batch in batches:
        with torch.no_grad():
            f_sft = utility(sft, batch).double().cpu()
        weights = partial(gap_weights, f_sft=f_sft, gap_floor=1e-6)
        parts = gradient_pass(base, sft, batch, utility, weights, deltas=deltas)["wp_attr"]
        heads = parts["q"] + parts["o"]
        total = heads if total is None else total + heads
    return total


def exact_heads_batched(base, sft, batches, utility, shape, rows) -> torch.Tensor:
    plan = {l: range(shape.num_attention_heads) for l in range(utility.layer + 1)}
    total = 0
    for batch in batches:
        _, _, weights = batch_context(base, sft, batch, utility, 1e-6)
        total = total + batch_scores(base, sft, batch, utility, "wp", "head", plan, weights, rows)
    return total


@torch.no_grad()
def exact_heads_copy_full(base, sft, batches, utility, shape) -> float:
    """The textbook way, timed on the first 3 heads of layer 0 and scaled to all heads up to l_a:
    copy the base, replace the slice, run the whole model (logits included), read the anchor."""
    heads = list(range(min(3, shape.num_attention_heads)))
    start = time.perf_counter()
    for batch in batches:
        for head in heads:
            model = copy.deepcopy(base)
            with restore(model, sft, [Component("head", 0, head)]):
                captured = capture_residuals(
                    model,
                    shape,
                    batch.input_ids,
                    batch.attention_mask,
                    batch.position_ids,
                    [utility.layer, shape.num_hidden_layers - 1],
                    stop_early=False,
                )
                utility.readout(model, captured[utility.layer], batch)
            del model
    per_head = (time.perf_counter() - start) / len(heads)
    return per_head * shape.num_attention_heads * (utility.layer + 1)


@torch.no_grad()
def exact_heads_naive(base, sft, batches, utility, shape) -> torch.Tensor:
    out = torch.zeros(shape.num_hidden_layers, shape.num_attention_heads, dtype=torch.float64)
    for batch in batches:
        _, _, weights = batch_context(base, sft, batch, utility, 1e-6)
        f_base = utility(base, batch).double().cpu()
        for layer in range(utility.layer + 1):
            for head in range(shape.num_attention_heads):
                with restore(base, sft, [Component("head", layer, head)]):
                    out[layer, head] += (utility(base, batch).double().cpu() - f_base) @ weights
    return out


def projected_neuron_time(base, sft, batches, utility, shape, rows, sample: int) -> float:
    """Seconds for exact WP over every neuron, from `sample` neurons at the first and anchor layers.

    A neuron's cost is linear in the layers it must run through (l..l_a); fit and sum.
    """
    batch = batches[0]
    _, _, weights = batch_context(base, sft, batch, utility, 1e-6)
    base_trace = trace(base, batch, utility.layer)
    costs = {}
    device = str(batch.input_ids.device)
    for layer in (0, utility.layer):
        seconds, _ = _timed(
            device,
            partial(
                layer_sums,
                base,
                sft,
                batch,
                utility,
                "wp",
                "neuron",
                layer,
                list(range(sample)),
                weights,
                rows,
                base_trace,
            ),
        )
        costs[layer] = seconds / sample
    per_layer = [
        costs[utility.layer]
        + (costs[0] - costs[utility.layer]) * (utility.layer - l) / max(utility.layer, 1)
        for l in range(utility.layer + 1)
    ]
    return sum(per_layer) * shape.intermediate_size * len(batches)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    top_a = set(torch.topk(a.flatten(), k).indices.tolist())
    top_b = set(torch.topk(b.flatten(), k).indices.tolist())
    return len(top_a & top_b) / k


def zoo_overlap(
    device: str, examples: int, rows: int, root: str | None = None, anchor_file: str | None = None
) -> dict[str, float]:
    """Exact WP vs WP-attr on the zoo's instruct expert, on evaluation-half prompts.

    The anchor is `anchor_file` (e.g. the one `mergekit-wp score scoring/zoo-instruct.yml`
    fitted) or the task vector of the extraction half at 2/3 depth; `root` holds `models/` and
    `data/` of another zoo build."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_wp.generation import render_chat
    from mergekit_wp.scoring.anchor import task_vectors
    from mergekit_wp.scoring.data import load_paired, split_paired
    from mergekit_wp.scoring.inputs import Example, make_batches
    from mergekit_wp.zoo import data_path, model_path

    if root is not None:
        model_path = lambda name: os.path.join(root, "models", name)
        data_path = lambda name: os.path.join(root, "data", f"{name}.jsonl")
    load = lambda name: (
        AutoModelForCausalLM.from_pretrained(model_path(name), dtype=torch.float32)
        .to(device)
        .eval()
        .requires_grad_(False)
    )
    base, sft = load("base"), load("instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_path("instruct"))
    shape = ModelShape.from_config(sft.config)
    extraction, evaluation = split_paired(load_paired(data_path("ifeval_train")))
    if anchor_file:
        from mergekit_wp.scoring.anchor import load_anchor

        anchor = load_anchor(anchor_file)
        layer, vector = anchor.layer, anchor.vector
    else:
        layer = (2 * shape.num_hidden_layers) // 3
        vector = task_vectors(sft, tokenizer, extraction)[0][layer]
    utility = AnchorUtility(layer, vector)
    chosen = [Example(str(e.key), render_chat(tokenizer, e.prompt)) for e in evaluation[:examples]]
    batches = [b.to(device) for b in make_batches(tokenizer, chosen, 8)]
    attr_heads = attr_neurons = 0
    exact_heads = exact_neurons = 0
    count = 0
    for batch in batches:
        _, _, weights = batch_context(base, sft, batch, utility, 1e-4)
        count += int((weights != 0).sum())
        parts = gradient_pass(base, sft, batch, utility, weights)["wp_attr"]
        attr_heads = attr_heads + parts["q"] + parts["o"]
        attr_neurons = attr_neurons + parts["gate"] + parts["up"] + parts["down"]
        for unit in ("head", "neuron"):
            plan = {l: range(shape.unit_count(unit)) for l in range(layer + 1)}
            values = batch_scores(base, sft, batch, utility, "wp", unit, plan, weights, rows)
            if unit == "head":
                exact_heads = exact_heads + values
            else:
                exact_neurons = exact_neurons + values
    visible = slice(0, layer + 1)
    k_neurons = max(1, (layer + 1) * shape.intermediate_size // 10)
    return {
        "anchor_layer": layer,
        "examples": count,
        "top20_heads_overlap": overlap(exact_heads[visible], attr_heads[visible], 20),
        "top10pct_neurons_overlap": overlap(
            exact_neurons[visible], attr_neurons[visible], k_neurons
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rows", type=int, default=64, help="variant rows per batched run")
    parser.add_argument("--neuron-sample", type=int, default=64)
    parser.add_argument(
        "--skip-naive", action="store_true", help="skip the naive head sweep (large shapes)"
    )
    parser.add_argument("--skip-exact", action="store_true", help="WP-attr figures only")
    parser.add_argument(
        "--zoo", action="store_true", help="also measure exact WP vs WP-attr overlap on the zoo"
    )
    parser.add_argument("--zoo-dir", default=None, help="a zoo build elsewhere (models/, data/)")
    parser.add_argument("--zoo-anchor", default=None, help="anchor file for the zoo comparison")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    rss_before = _rss()
    base, sft = random_pair(args.shape, device, dtype)
    shape = ModelShape.from_config(base.config)
    batches = random_batches(shape.vocab_size, args.examples, args.batch_size, args.length, device)
    layer = (2 * shape.num_hidden_layers) // 3
    generator = torch.Generator().manual_seed(2)
    utility = AnchorUtility(layer, torch.randn(shape.hidden_size, generator=generator))
    weights_gb = weight_bytes(base)
    figures: dict[str, object] = {
        "device": device,
        "shape": args.shape,
        "dtype": str(dtype),
        "examples": args.examples,
        "length": args.length,
        "anchor_layer": layer,
    }

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    wp_attr(base, sft, batches[:1], utility)  # warm-up (allocator, kernels)
    # Peak before the plain step, which holds gradients of every parameter.
    attr, attr_heads = _timed(device, lambda: wp_attr(base, sft, batches, utility))
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:  # peak resident size above what the process held before the models existed
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    plain_step(base, batches[:1])  # warm-up
    plain, _ = _timed(device, lambda: plain_step(base, batches))
    attr, attr_heads = _timed(device, lambda: wp_attr(base, sft, batches, utility))  # side by side
    figures |= {
        "plain_fwd_bwd_s": plain,
        "wp_attr_s": attr,
        "wp_attr_over_plain": attr / plain,
        "wp_attr_peak_memory_model_weights": peak / weights_gb,
    }

    if args.skip_exact:
        _print(figures, args.json)
        return
    batched, batched_heads = _timed(
        device, lambda: exact_heads_batched(base, sft, batches, utility, shape, args.rows)
    )
    figures |= {"exact_heads_batched_s": batched}
    if not args.skip_naive:
        textbook = exact_heads_copy_full(base, sft, batches, utility, shape)
        figures |= {
            "exact_heads_copy_full_forward_projected_s": textbook,
            "exact_heads_speedup_vs_copy_full_forward": textbook / batched,
        }
        naive, naive_heads = _timed(
            device, lambda: exact_heads_naive(base, sft, batches, utility, shape)
        )
        figures |= {
            "exact_heads_inplace_to_anchor_s": naive,
            "exact_heads_speedup_vs_inplace_to_anchor": naive / batched,
            "exact_heads_max_abs_diff": float((batched_heads - naive_heads).abs().max()),
        }
    figures["exact_neurons_projected_s"] = projected_neuron_time(
        base, sft, batches, utility, shape, args.rows, args.neuron_sample
    )
    visible = slice(0, layer + 1)
    figures["random_pair_top20_heads_overlap_exact_vs_attr"] = overlap(
        batched_heads[visible], attr_heads[visible], 20
    )
    if args.zoo:
        del base, sft
        figures["zoo"] = zoo_overlap(
            device, args.examples, args.rows, args.zoo_dir, args.zoo_anchor
        )
    _print(figures, args.json)


def _print(figures: dict, path: str | None) -> None:
    for key, value in figures.items():
        print(f"{key:>48}: {value:.4g}" if isinstance(value, float) else f"{key:>48}: {value}")
    if path:
        with open(path, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
