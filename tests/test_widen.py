"""The `widen` merge method end to end: tiny random Llama (GQA) and Qwen2 models, real mergekit
merges, and a dense WIDEN reference written here from the paper and the authors' code."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from mergekit_wp.widen import widen
from tests.conftest import TINY_SHAPE
from tests.test_merge_method import OPTIONS, load_output, merge, mergekit_yaml, save_tokenizer

VOCAB = 33  # odd: the middle-ranked token row sits exactly at the mean rank
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{"vocab_size": VOCAB, **TINY_SHAPE, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{"vocab_size": VOCAB, **TINY_SHAPE, **kw}),  # q/k/v bias
}
EMBEDDING = "model.embed_tokens.weight"


# --- tiny models: a random base and experts that move each column by its own amount ----------
def perturbed(tensor: torch.Tensor, scale: float, gen: torch.Generator) -> torch.Tensor:
    """`tensor` plus noise whose size varies by column (by element for 1-D), like a fine-tune."""
    spread = torch.rand(tensor.shape[-1], generator=gen) * 2
    noise = torch.randn(tensor.shape, generator=gen) * spread
    return tensor + scale * tensor.abs().mean() * noise


def save_model(path: Path, config: PretrainedConfig, state: dict[str, torch.Tensor]) -> Path:
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state)
    model.save_pretrained(path)
    save_tokenizer(path, config.vocab_size)
    return path


@dataclass
class Family:
    """A base and three experts of one architecture, saved in fp32."""

    base: Path
    experts: list[Path]
    config: PretrainedConfig


def make_family(root: Path, arch: str, extra_row: bool = False) -> Family:
    """Base plus experts at three delta sizes; with `extra_row`, expert 0 has one added token."""
    config = CONFIGS[arch]()
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).state_dict()
    gen = torch.Generator().manual_seed(1)
    experts = []
    for k, scale in enumerate((0.3, 0.6, 0.15)):
        state = {name: perturbed(t, scale, gen) for name, t in base.items()}
        expert_config = config
        if extra_row and k == 0:  # like WizardLM's pad token: one row after the base's vocab
            expert_config = CONFIGS[arch](vocab_size=VOCAB + 1)
            for name in (EMBEDDING, "lm_head.weight"):
                state[name] = torch.cat([state[name], torch.randn(1, state[name].shape[1])])
        experts.append(save_model(root / f"expert{k}", expert_config, state))
    return Family(save_model(root / "base", config, base), experts, config)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    built: dict[tuple[str, bool], Family] = {}

    def get(arch: str, extra_row: bool = False) -> Family:
        if (arch, extra_row) not in built:
            root = tmp_path_factory.mktemp(f"widen-{arch}")
            built[arch, extra_row] = make_family(root, arch, extra_row)
        return built[arch, extra_row]

    return get


def widen_recipe(fam: Family, **extra) -> dict:
    return {
        "merge_method": "widen",
        "base_model": str(fam.base),
        "models": [{"model": str(e)} for e in fam.experts],
        "dtype": "float32",
        **extra,
    }


# --- the dense reference: plain loops over columns and experts, in float64 ------------------
def ranks(values: list[float]) -> list[int]:
    """Rank of each value among `values` (0 for the smallest); ties go by position."""
    return [
        sum(1 for j, w in enumerate(values) if w < v or (w == v and j < i))
        for i, v in enumerate(values)
    ]


def scores(significance: list[list[float]], logits: list[list[float]], ratio, value):
    """Per expert k and entry i: softmax over experts of logits[k][i], or `value` where
    significance[k][i] exceeds `ratio` times expert k's mean significance."""
    n = len(significance[0])
    out = [[0.0] * n for _ in significance]
    for i in range(n):
        total = sum(math.exp(row[i]) for row in logits)
        for k, row in enumerate(significance):
            above = row[i] > ratio * (sum(row) / n)
            out[k][i] = value if above else math.exp(logits[k][i]) / total
    return out


def rank_scores_reference(changes: list[list[float]], ratio, value):
    ranked = [ranks(row) for row in changes]
    n = len(changes[0])
    return scores(ranked, [[r / n for r in row] for row in ranked], ratio, value)


def widen_reference(name, base, experts, ratio=1.0, value=1.0) -> torch.Tensor:
    """WIDEN (Yu et al. 2024) of one tensor as the authors' `widen_merging` computes it."""
    base = base.double()
    experts = [e.double() for e in experts]
    if base.ndim == 1:
        changes = [[abs(float(e[i] - base[i])) for i in range(len(base))] for e in experts]
        weights = scores(changes, changes, ratio, value)
        out = base.clone()
        for i in range(len(base)):
            out[i] += sum(w[i] * (e[i] - base[i]) for w, e in zip(weights, experts))
        return out
    if name == EMBEDDING:  # nn.Embedding is [vocab, hidden]: its columns are the token rows
        return widen_reference("", base.T, [e.T for e in experts], ratio, value).T
    columns = range(base.shape[1])
    magnitude, direction = [], []
    for e in experts:
        magnitude.append([abs(float(e[:, j].norm() - base[:, j].norm())) for j in columns])
        direction.append(
            [
                1 - float(e[:, j] @ base[:, j] / (e[:, j].norm() * base[:, j].norm()))
                for j in columns
            ]
        )
    magnitude_scores = rank_scores_reference(magnitude, ratio, value)
    direction_scores = rank_scores_reference(direction, ratio, value)
    out = base.clone()
    for j in columns:
        for k, e in enumerate(experts):
            weight = (magnitude_scores[k][j] + direction_scores[k][j]) / 2
            out[:, j] += weight * (e[:, j] - base[:, j])
    return out


def load_inputs(fam: Family, rows: int = VOCAB) -> list[dict[str, torch.Tensor]]:
    """Base and expert tensors; token tables cut to the base's rows (tokenizer: source base)."""
    states = [load_file(p / "model.safetensors") for p in [fam.base, *fam.experts]]
    return [
        {k: v[:rows] if k in (EMBEDDING, "lm_head.weight") else v for k, v in s.items()}
        for s in states
    ]


def assert_matches_reference(out: dict, fam: Family, ratio=1.0, value=1.0) -> None:
    base, *experts = load_inputs(fam)
    assert sorted(out) == sorted(base)
    for name, merged in out.items():
        want = widen_reference(name, base[name], [e[name] for e in experts], ratio, value)
        assert merged.dtype == torch.float32
        torch.testing.assert_close(merged.double(), want, rtol=0, atol=1e-6, msg=name)


# --- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_merge_matches_dense_reference(family, tmp_path, arch):
    fam = family(arch)
    assert_matches_reference(merge(widen_recipe(fam), tmp_path / "out"), fam)


def test_parameters_reach_the_kernel(family, tmp_path):
    fam = family("llama")
    params = {"above_average_value_ratio": 1.4, "score_calibration_value": 0.5}
    out = merge(widen_recipe(fam, parameters=params), tmp_path / "out")
    assert_matches_reference(out, fam, ratio=1.4, value=0.5)
    default = merge(widen_recipe(fam), tmp_path / "default")
    assert (
        out["model.layers.0.mlp.down_proj.weight"] - default["model.layers.0.mlp.down_proj.weight"]
    ).abs().max() > 1e-4


def test_expert_with_an_extra_vocabulary_row(family, tmp_path):
    fam = family("llama", extra_row=True)
    recipe = widen_recipe(fam, tokenizer={"source": "base"})
    out = merge(recipe, tmp_path / "out", OPTIONS.model_copy(update={"copy_tokenizer": True}))
    for name in (EMBEDDING, "lm_head.weight"):
        assert out[name].shape == (VOCAB, TINY_SHAPE["hidden_size"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == VOCAB
    assert_matches_reference(out, fam)


def test_plain_mergekit_yaml_finds_widen(family, tmp_path):
    fam = family("qwen2")
    result = mergekit_yaml(widen_recipe(fam), tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_matches_reference(load_output(tmp_path / "out"), fam)
    # That only the start-up hook makes mergekit find our methods is test_merge_method's check.


def test_three_dimensional_tensor_is_refused_by_name():
    base = torch.zeros(2, 2, 2)
    with pytest.raises(ValueError, match=r"widen: experts\.w has shape \(2, 2, 2\)"):
        widen(base, [base + 1], name="experts.w")
