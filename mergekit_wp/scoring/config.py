"""Scoring configuration (YAML, pydantic-validated): models, data, utility, methods, output."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from mergekit_wp.config import StrictModel, load_yaml, validate

MethodName = Literal["wp_attr", "wp", "ap", "ap_attr"]


class DataConfig(StrictModel):
    """Which examples: paired IFEval prompts (anchor / projection) or a domain's prompts (KL)."""

    source: str  # JSONL path, zoo:FILE, or a hub dataset id
    kind: Literal["paired", "domain"] = "paired"
    tasks: list[str] | None = None  # paired: short names or instruction ids
    split: Literal["evaluation", "extraction", "all"] = "evaluation"  # paired: half of split_paired
    seed: int = 0
    extraction_fraction: float = 0.5
    max_examples: int | None = Field(default=None, gt=0)
    responses: Literal["generate", "reference"] = (
        "generate"  # KL: sft's greedy responses or the file's
    )
    max_new_tokens: int = Field(default=128, gt=0)
    chat: bool = (
        True  # render prompts with the chat template (False: raw prompt, e.g. code completion)
    )


class UtilityConfig(StrictModel):
    """F(M, x): anchor cosine at l_a, final-layer projection, or downstream KL (docs/method.md §2,
    §6)."""

    kind: Literal["anchor", "projection", "kl"] = "anchor"
    anchor: str | None = None  # anchor file (mergekit_wp.scoring.anchor.save_anchor)
    layer: int | None = None  # anchor: override the file's l_a
    # Fit the anchor when the file does not exist yet: task vectors on the extraction half of
    # the paired data, l_a by the correction-rate sweep on the evaluation half (or fixed_layer).
    fit: bool = False
    fixed_layer: int | None = None
    sweep_examples: int | None = Field(default=None, gt=0)
    sweep_max_new_tokens: int = Field(default=64, gt=0)
    sweep_mode: Literal["anchor", "all"] = "anchor"  # steer the anchor position, or every position
    # Components after l_a cannot move F_a and score 0 under it (docs/method.md §3); `kl` scores
    # them with the downstream KL utility on the same prompts (§6) and writes one map for every
    # layer, which is what a `wp` merge needs: else peers take every layer after the anchor.
    downstream: Literal["kl"] | None = None

    @model_validator(mode="after")
    def _needs_anchor(self) -> UtilityConfig:
        if self.kind in ("anchor", "projection") and not self.anchor:
            raise ValueError(f"utility kind {self.kind!r} needs `anchor: PATH` (an anchor file)")
        if self.downstream and self.kind != "anchor":
            raise ValueError(
                f"utility.downstream completes an anchor utility's map; kind {self.kind!r} "
                "already scores every layer"
            )
        return self


class GranularityConfig(StrictModel):
    """Which components: heads, neurons; how many neurons exact sweeps (WP, AP) visit."""

    heads: bool = True
    neurons: bool = True
    # "all", "none", or an integer K: the top-K neurons by |WP-attr| of this run.
    exact_neurons: Literal["all", "none"] | int = "none"


class ScoringConfig(StrictModel):
    """One expert scored against one base."""

    base: str  # HF folder, hub id, or zoo:NAME
    model: str  # the specialized model
    data: DataConfig
    utility: UtilityConfig = UtilityConfig(kind="kl")
    methods: list[MethodName] = Field(default_factory=lambda: ["wp_attr"])
    granularity: GranularityConfig = GranularityConfig()
    output: str
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    # auto: bf16 on CUDA and on CPUs with native bf16 (amx_bf16 / avx512_bf16), else fp32; the
    # run logs which and why. fp32 gives exact scores; bf16 halves memory and (natively) time.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "float64"] = "auto"
    device_map: str | None = None  # e.g. "auto": spread a model over several GPUs (accelerate)
    # None: the family's default from its architecture table (sdpa; eager for Gemma 2).
    attn_implementation: Literal["sdpa", "eager"] | None = None
    batch_size: int = Field(default=8, gt=0)
    # Exact WP / AP run patched variants of a layer stacked along the batch: at most this many
    # rows (variants x examples of a batch) per run. Memory grows with it (activations of every
    # row, and under KL their logits, see kl_chunk_positions); lower it if exact sweeps run out.
    max_variant_rows: int = Field(default=64, gt=0)
    # KL utility: response positions whose log-probabilities over the vocabulary are computed at
    # once (each position costs ~5 fp32 vectors of the vocabulary: 2.6 MB at 128k tokens). Peak
    # memory of the readout stays at one chunk whatever the response length and max_variant_rows.
    kl_chunk_positions: int = Field(default=256, gt=0)
    gap_floor: float = Field(default=1e-4, ge=0)
    top_k: int = Field(default=20, gt=0)
    seed: int = 0
    threads: int | None = Field(default=None, gt=0)  # CPU threads for torch (shared cores: 1)

    @model_validator(mode="after")
    def _consistent(self) -> ScoringConfig:
        if not self.methods:
            raise ValueError("methods must name at least one of wp_attr, wp, ap, ap_attr")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        if self.utility.fit and self.data.kind != "paired":
            raise ValueError(
                "utility.fit needs paired data (data.kind: paired) to extract task vectors"
            )
        if (
            self.utility.kind == "kl"
            and self.data.kind == "paired"
            and self.data.responses == "reference"
        ):
            raise ValueError("paired data has no reference responses; use data.responses: generate")
        if not (self.granularity.heads or self.granularity.neurons):
            raise ValueError("granularity: score heads, neurons, or both")
        if isinstance(self.granularity.exact_neurons, int) and "wp_attr" not in self.methods:
            raise ValueError(
                "granularity.exact_neurons: K picks the top-K by WP-attr; add wp_attr to methods"
            )
        return self

    def output_dir(self) -> Path:
        return Path(self.output)


def parse_config(data: object, source: str = "scoring config") -> ScoringConfig:
    """Validate a mapping; ValueError naming the source, the key and what was expected."""
    return validate(ScoringConfig, data, source)


def load_config(path: str | Path) -> ScoringConfig:
    """Read and validate a scoring YAML file."""
    return load_yaml(path, ScoringConfig, "scoring config")


def with_output(data: dict, output: str) -> dict:
    """A config mapping written to `output` instead; an anchor file kept under the old output
    folder moves with it, so a run elsewhere neither reads nor overwrites the old anchor."""
    utility = data.get("utility")
    anchor = utility.get("anchor") if isinstance(utility, dict) else None
    if anchor and data.get("output"):
        old = Path(str(data["output"])).absolute()
        if Path(anchor).absolute().is_relative_to(old):
            moved = Path(output) / Path(anchor).absolute().relative_to(old)
            data = data | {"utility": utility | {"anchor": str(moved)}}
    return data | {"output": output}
