"""Scoring and merging at the Llama-3.2-1B shape, side by side in one run (issue 17's figures).

Random weights built locally and cached under `out/bench-scale/<shape>/` (a base and two experts
= base + noise, bf16 checkpoints, with random score maps for the merge). KL utility throughout.

- WP-attr time / one plain forward+backward (fp32 and bf16), per batch of a run (Δθ already
  computed: it is computed once per run) and for a run's first batch (Δθ included), and
  WP-attr's peak memory in units of one model's weights in that dtype (targets: <= 1.5, <= 3);
  the overlap of the bf16 and fp32 maps' top-20 heads by |score| (what `dtype: auto` trades on a
  CPU with native bf16).
- Exact head-level WP (batched, prefix-shared) / naive copy-and-forward (copy the base, swap in
  one head's slices, run the whole model) per head, on a subset of heads (target >= 20x on GPU).
- Peak memory (models included) of exact WP under KL with 32 and 96 response tokens, bf16 (the
  chunked KL readout keeps the readout flat; target: 96 tokens within 12 GiB).
- `wp` / mergekit `linear` merge time and peak memory (benchmarks/merge_speed.py's children).

    python benchmarks/scale_1b.py                       # the 1B shape, CPU (tens of minutes)
    python benchmarks/scale_1b.py --shape tiny          # a seconds-long check of the script
    python benchmarks/scale_1b.py --shape small         # a minute: 32k vocabulary, 4 layers
    python benchmarks/scale_1b.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from mergekit_wp.components import Component, ModelShape
from mergekit_wp.scoring.exact import layer_sums
from mergekit_wp.scoring.forward import TokenBatch, trace, weight_bytes
from mergekit_wp.scoring.patching import restore
from mergekit_wp.scoring.utility import KLUtility, batch_context

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmarks, whose helpers are reused
from merge_speed import build_inputs, report, run_child
from scoring_speed import _print, _rss, _timed, overlap, plain_step, random_batches, wp_attr

SHAPES = {
    "llama-3.2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        "tie_word_embeddings": True,
    },
}


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or resident size sampled every 2 ms (CPU)."""

    def __init__(self, device: str) -> None:
        self.device, self.peak = device, 0

    @contextmanager
    def measure(self):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            yield
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            return
        self.peak, done = _rss(), threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                self.peak = max(self.peak, _rss())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            yield
        finally:
            done.set()
            sampler.join()
            self.peak = max(self.peak, _rss())


def cached_inputs(shape: str) -> Path:
    """The base, two experts, score maps and `wp` / `linear` recipes, built once per shape."""
    root = Path("out/bench-scale") / shape
    if not (root / "wp.yml").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for method, recipe in build_inputs(root, shape=SHAPES[shape]).items():
            (root / f"{method}.yml").write_text(yaml.safe_dump(recipe))
    return root


def with_responses(batches: list[TokenBatch], response_tokens: int) -> list[TokenBatch]:
    """The same rows with their last `response_tokens` tokens as the scored response."""
    out = []
    for batch in batches:
        mask = torch.zeros_like(batch.attention_mask, dtype=torch.bool)
        mask[:, -response_tokens - 1 : -1] = True
        out.append(TokenBatch(batch.input_ids, batch.attention_mask, batch.position_ids, mask))
    return out


def fresh(batches: list[TokenBatch]) -> list[TokenBatch]:
    """Batches without cached KL references, so a timed pass pays for its expert forward."""
    for batch in batches:
        batch.cache.clear()
    return batches


def load(root: Path, name: str, dtype: torch.dtype, device: str):
    model = AutoModelForCausalLM.from_pretrained(root / name, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def attribution_figures(
    root: Path, dtype: torch.dtype, device: str, args
) -> tuple[dict, torch.Tensor]:
    """WP-attr / plain fwd+bwd and WP-attr's peak / one model's weights, in `dtype`; the heads.

    Two WP-attr times: a run's first pass, which also computes Δθ (once per run), and a pass with
    Δθ already computed, which is what every further batch of a run costs.
    """
    rss_before = _rss()
    base, sft = load(root, "base", dtype, device), load(root, "expert-a", dtype, device)
    shape = ModelShape.from_config(base.config)
    batches = with_responses(
        random_batches(shape.vocab_size, args.examples, args.batch_size, args.length, device),
        args.response,
    )
    utility = KLUtility(sft)
    memory = PeakMemory(device)
    deltas: dict[str, torch.Tensor] = {}
    wp_attr(base, sft, fresh(batches[:1]), utility)  # warm-up (allocator, kernels)
    with memory.measure():
        first, heads = _timed(device, lambda: wp_attr(base, sft, fresh(batches), utility, deltas))
        attr, _ = _timed(device, lambda: wp_attr(base, sft, fresh(batches), utility, deltas))
    peak = memory.peak - (0 if device.startswith("cuda") else rss_before)
    plain_step(base, batches[:1])  # warm-up
    plain, _ = _timed(device, lambda: plain_step(base, batches))
    name = str(dtype).removeprefix("torch.")
    return {
        f"{name}_wp_attr_first_pass_s": first,
        f"{name}_wp_attr_s": attr,
        f"{name}_plain_fwd_bwd_s": plain,
        f"{name}_wp_attr_first_pass_over_plain": first / plain,
        f"{name}_wp_attr_over_plain": attr / plain,
        f"{name}_wp_attr_peak_over_weights": peak / weight_bytes(base),
    }, heads


def exact_figures(root: Path, dtype: torch.dtype, device: str, args) -> dict[str, float]:
    """Exact head WP vs naive copy-and-forward on a subset of heads; peaks at two lengths."""
    rss_before = _rss()
    base, sft = load(root, "base", dtype, device), load(root, "expert-a", dtype, device)
    shape = ModelShape.from_config(base.config)
    utility = KLUtility(sft)
    layers = sorted({0, shape.num_hidden_layers // 2})
    heads = list(range(min(args.heads, shape.num_attention_heads)))
    memory = PeakMemory(device)
    figures: dict[str, float] = {}
    for response in (32, 96):
        batch = with_responses(
            random_batches(
                shape.vocab_size, args.batch_size, args.batch_size, args.prompt + response, device
            ),
            response,
        )[0]
        with memory.measure():
            _, _, weights = batch_context(base, sft, batch, utility, 1e-6)
            seconds, batched = _timed(
                device,
                partial(
                    batched_heads, base, sft, batch, utility, layers, heads, weights, args.rows
                ),
            )
        peak = memory.peak - (0 if device.startswith("cuda") else rss_before)
        figures[f"exact_heads_{response}_tokens_peak_gib"] = peak / 2**30
        figures[f"exact_heads_{response}_tokens_peak_over_weights"] = peak / weight_bytes(base)
        if response == 32:
            figures["exact_head_batched_s_per_head"] = seconds / (len(layers) * len(heads))
            naive_seconds, naive = _timed(
                device, partial(naive_heads, base, sft, batch, utility, layers, heads, weights)
            )
            figures["exact_head_naive_copy_forward_s_per_head"] = naive_seconds / naive.numel()
            figures["exact_heads_speedup_vs_naive"] = naive_seconds / seconds
            figures["exact_heads_max_abs_diff_vs_naive"] = float((batched - naive).abs().max())
    return figures


def batched_heads(base, sft, batch, utility, layers, heads, weights, rows) -> torch.Tensor:
    """Exact WP as the pipeline runs it: one base trace, then each layer's heads batched."""
    base_trace = trace(base, batch, utility.layer)
    return torch.stack(
        [
            layer_sums(
                base, sft, batch, utility, "wp", "head", layer, heads, weights, rows, base_trace
            )
            for layer in layers
        ]
    )


@torch.no_grad()
def naive_heads(base, sft, batch, utility, layers, heads, weights) -> torch.Tensor:
    """The textbook way: copy the base, swap in one head's slices, run the whole model."""
    f_base = utility(base, batch).double().cpu()
    out = torch.zeros(len(layers), len(heads), dtype=torch.float64)
    for i, layer in enumerate(layers):
        for j, head in enumerate(heads):
            model = copy.deepcopy(base)
            with restore(model, sft, [Component("head", layer, head)]):
                out[i, j] = (utility(model, batch).double().cpu() - f_base) @ weights.double()
            del model
    return out


def merge_figures(root: Path, repeats: int) -> None:
    runs: dict[str, list[dict]] = {"wp": [], "linear": []}
    for i in range(repeats):
        for method in ("linear", "wp") if i % 2 else ("wp", "linear"):
            runs[method].append(run_child(root / f"{method}.yml", root / f"merged-{method}"))
    report(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="tokens per example (WP-attr)")
    parser.add_argument("--response", type=int, default=32, help="response tokens (WP-attr)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (exact WP)")
    parser.add_argument("--heads", type=int, default=4, help="heads per layer in the exact subset")
    parser.add_argument("--rows", type=int, default=64, help="variant rows per batched run")
    parser.add_argument("--merge-repeats", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=["attr", "exact", "merge"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = cached_inputs(args.shape)
    figures: dict[str, object] = {
        "shape": args.shape,
        "device": args.device,
        "examples": args.examples,
        "length": args.length,
    }
    if "attr" not in args.skip:
        heads = {}
        for dtype in (torch.float32, torch.bfloat16):
            found, heads[dtype] = attribution_figures(root, dtype, args.device, args)
            figures |= found
        # What `dtype: auto` trades on a bf16 CPU: the top-20 heads of the bf16 map vs fp32.
        top = min(20, heads[torch.float32].numel())
        figures["wp_attr_top20_heads_overlap_bf16_vs_fp32"] = overlap(
            heads[torch.bfloat16].abs(), heads[torch.float32].abs(), top
        )
    if "exact" not in args.skip:
        figures |= exact_figures(root, torch.bfloat16, args.device, args)
    figures["scoring_wall_s"] = time.perf_counter() - started
    _print(figures, args.json)
    if "merge" not in args.skip:
        merge_figures(root, args.merge_repeats)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
