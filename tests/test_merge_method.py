"""The `wp` merge method end to end: tiny random HF models, real mergekit merges, dense
references.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.merge_methods import merge_tensors
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

import mergekit_wp.merge_method as wp
from mergekit_wp.cli import main as cli_main
from mergekit_wp.components import ModelShape, load_shape
from mergekit_wp.scoremap import ScoreMap, write_score_map

VENV_BIN = Path(sys.executable).parent
TINY = {
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 12,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**{**TINY, "tie_word_embeddings": False, **kw}),
    "mistral": lambda **kw: MistralConfig(**{**TINY, **kw}),
    "qwen2": lambda **kw: Qwen2Config(**{**TINY, **kw}),  # q/k/v biases
    "gemma2": lambda **kw: Gemma2Config(**{**TINY, "head_dim": 8, **kw}),  # head_dim != 16/4
}
OPTIONS = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)


# --- tiny models and score maps ------------------------------------------------------------
def save_tokenizer(path: Path, size: int) -> None:
    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(path)


def save_model(path: Path, config: PretrainedConfig, seed: int) -> Path:
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    save_tokenizer(path, config.vocab_size)
    return path


@dataclass
class Family:
    """A base and three experts of one architecture, saved in fp32."""

    arch: str
    root: Path
    base: Path
    experts: list[Path]
    config: PretrainedConfig
    shape: ModelShape


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    built: dict[str, Family] = {}

    def get(arch: str) -> Family:
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            config = CONFIGS[arch]()
            paths = [save_model(root / name, config, seed) for seed, name in enumerate("bxyz")]
            built[arch] = Family(arch, root, paths[0], paths[1:], config, load_shape(paths[0]))
        return built[arch]

    return get


def write_scores(path: Path, shape: ModelShape, heads: torch.Tensor, neurons: torch.Tensor) -> Path:
    scores = ScoreMap.zeros(shape, method="wp_attr", utility="anchor", base_model="b", model="e")
    scores.heads, scores.neurons = heads.float(), neurons.float()
    return write_score_map(path, scores)


def random_scores(fam: Family, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert (heads, neurons) with negatives, and components where no expert is positive."""
    gen = torch.Generator().manual_seed(seed)
    shape = fam.shape
    out = []
    for k in range(len(fam.experts)):
        heads = torch.randn(shape.num_hidden_layers, shape.num_attention_heads, generator=gen)
        neurons = torch.randn(shape.num_hidden_layers, shape.intermediate_size, generator=gen)
        heads[0, 1] = -1.0 - k  # every expert negative: uniform fallback
        neurons[1, 2] = 0.0  # every expert zero: uniform fallback
        out.append((heads, neurons))
    return out


def score_files(fam: Family, scores, tag: str) -> list[Path]:
    return [
        write_scores(fam.root / f"{tag}-{k}.safetensors", fam.shape, heads, neurons)
        for k, (heads, neurons) in enumerate(scores)
    ]


def wp_recipe(fam: Family, files: list[Path], dtype: str = "float32", **extra) -> dict:
    return {
        "merge_method": "wp",
        "base_model": str(fam.base),
        "models": [
            {"model": str(e), "parameters": {"scores": str(f)}} for e, f in zip(fam.experts, files)
        ],
        "dtype": dtype,
        **extra,
    }


def merge(recipe: dict, out: Path, options: MergeOptions = OPTIONS) -> dict[str, torch.Tensor]:
    run_merge(MergeConfiguration.model_validate(recipe), str(out), options=options)
    return load_output(out)


def load_output(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def load_inputs(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(path / "model.safetensors").items()}


# --- an independent dense reference: plain loops over heads, KV groups and neurons -----------
def alpha(values: list[float]) -> list[float]:
    positive = [max(v, 0.0) for v in values]
    total = sum(positive)
    return [p / total for p in positive] if total > 0 else [1.0 / len(values)] * len(values)


def dense_reference(name, config, experts, scores) -> torch.Tensor:
    """θ_fuse for one output tensor, from the rules of docs/method.md §8
    written out loop by loop.
    """
    k_count = len(experts)
    source = name if name in experts[0] else "model.embed_tokens.weight"  # tied lm_head
    tensors = [e[source] for e in experts]
    match = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.(weight|bias)", name)
    kind, param = (match[2], match[3]) if match else (None, None)
    split = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    if kind not in split or (param == "bias" and kind in {"o_proj", "down_proj"}):
        return sum(tensors) / k_count
    layer = int(match[1])
    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    out = torch.zeros_like(tensors[0])

    def put(index, coefficients):
        for k in range(k_count):
            out[index] += coefficients[k] * tensors[k][index]

    def head_alpha(h):
        return alpha([float(s[0][layer, h]) for s in scores])

    if kind in ("q_proj", "o_proj"):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            put((slice(None), cols) if kind == "o_proj" else cols, head_alpha(h))
    elif kind in ("k_proj", "v_proj"):
        per_group = heads // groups
        for g in range(groups):
            members = [head_alpha(h) for h in range(g * per_group, (g + 1) * per_group)]
            mean = [sum(a[k] for a in members) / per_group for k in range(k_count)]
            put(slice(g * d, (g + 1) * d), mean)
    else:
        for j in range(config.intermediate_size):
            a = alpha([float(s[1][layer, j]) for s in scores])
            put((slice(None), j) if kind == "down_proj" else j, a)
    return out


def assert_matches_reference(out: dict, fam: Family, scores) -> None:
    experts = [load_inputs(e) for e in fam.experts]
    assert set(out) >= set(experts[0])
    for name, merged in out.items():
        want = dense_reference(name, fam.config, experts, scores)
        torch.testing.assert_close(merged.double(), want, rtol=1e-6, atol=1e-6, msg=name)


# --- numerics -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "gemma2"])
def test_random_scores_match_dense_reference(family, tmp_path, arch):
    fam = family(arch)
    scores = random_scores(fam, seed=1)
    out = merge(wp_recipe(fam, score_files(fam, scores, "random")), tmp_path / "out")
    if arch == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in out
    assert_matches_reference(out, fam, scores)


def test_positive_expert_owns_its_components_exactly(family, tmp_path):
    fam = family("llama")
    scores = random_scores(fam, seed=2)
    for k, (heads, neurons) in enumerate(scores):
        # Expert 1 alone is positive on both heads of KV group 0 in layer 0 (so on that group's
        # K/V rows too) and expert 2 alone on neuron 5 of layer 1; the others are <= 0 there.
        heads[0, :2] = 3.0 if k == 1 else -float(k)
        neurons[1, 5] = 2.0 if k == 2 else -1.0 * k
    out = merge(wp_recipe(fam, score_files(fam, scores, "owned")), tmp_path / "out")
    e1, e2 = (load_file(fam.experts[k] / "model.safetensors") for k in (1, 2))
    d = fam.shape.head_dim
    attn, mlp = "model.layers.0.self_attn", "model.layers.1.mlp"
    for name, index in [
        (f"{attn}.q_proj.weight", slice(0, 2 * d)),
        (f"{attn}.o_proj.weight", (slice(None), slice(0, 2 * d))),
        (f"{attn}.k_proj.weight", slice(0, d)),
        (f"{attn}.v_proj.weight", slice(0, d)),
    ]:
        assert torch.equal(out[name][index], e1[name][index]), name
    for name, index in [
        (f"{mlp}.gate_proj.weight", 5),
        (f"{mlp}.up_proj.weight", 5),
        (f"{mlp}.down_proj.weight", (slice(None), 5)),
    ]:
        assert torch.equal(out[name][index], e2[name][index]), name
    assert not torch.equal(out[f"{attn}.q_proj.weight"], e1[f"{attn}.q_proj.weight"])


def test_equal_scores_equal_mergekit_linear(family, tmp_path):
    fam = family("llama")
    experts = fam.experts[:2]
    gen = torch.Generator().manual_seed(3)
    heads = torch.rand(2, 4, generator=gen)
    neurons = torch.rand(2, 12, generator=gen)
    neurons[0] = 0.0  # all zero: the uniform fallback must agree with linear too
    files = [
        write_scores(fam.root / f"equal-{k}.safetensors", fam.shape, heads, neurons) for k in (0, 1)
    ]
    recipe = wp_recipe(fam, files, dtype="bfloat16")
    recipe["models"] = recipe["models"][:2]
    got = merge(recipe, tmp_path / "wp")
    linear = merge(
        {
            "merge_method": "linear",
            "models": [{"model": str(e), "parameters": {"weight": 1.0}} for e in experts],
            "dtype": "bfloat16",
        },
        tmp_path / "linear",
    )
    assert set(got) == set(linear)
    for name in linear:
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name], linear[name]), name


def test_expert_with_added_token_is_aligned_to_base_vocab(family, tmp_path):
    fam = family("llama")
    bigger = save_model(tmp_path / "bigger", CONFIGS["llama"](vocab_size=33), seed=7)
    save_tokenizer(bigger, 33)  # one added token after the base's 32
    scores = random_scores(fam, seed=4)[:2]
    files = score_files(fam, scores, "vocab")
    recipe = wp_recipe(fam, files)
    recipe["models"][1]["model"] = str(bigger)
    with pytest.raises(
        ValueError, match=r"vocab_size=33, .* 32; add `tokenizer: \{source: base\}`"
    ):
        wp.check_wp_recipe(MergeConfiguration.model_validate(recipe))
    recipe["tokenizer"] = {"source": "base"}
    wp.check_wp_recipe(MergeConfiguration.model_validate(recipe))
    out = merge(recipe, tmp_path / "out", MergeOptions(write_model_card=False, quiet=True))
    a, b = load_file(fam.experts[0] / "model.safetensors"), load_file(bigger / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert out[name].shape == (32, 16)
        torch.testing.assert_close(out[name], (a[name] + b[name][:32]) / 2, rtol=0, atol=1e-7)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 32


def test_score_maps_are_read_once_per_process(family, tmp_path, monkeypatch):
    fam = family("mistral")
    files = score_files(fam, random_scores(fam, seed=5), "once")
    reads = []
    monkeypatch.setattr(wp, "read_score_map", lambda path: reads.append(path) or READ(path))
    wp._read_cached.cache_clear()
    merge(wp_recipe(fam, files), tmp_path / "out")
    assert sorted(reads) == sorted(str(f) for f in files)


READ = wp.read_score_map


def test_registration_is_idempotent():
    from mergekit.merge_methods import get, registered_methods

    wp.register_wp()
    wp.register_wp()
    assert get("wp") is wp.wp_merge
    assert sum(m.spec.name == "wp" for m in registered_methods()) == 1


def test_python_api_merge_tensors_with_folder_ids(family):
    fam = family("qwen2")
    scores = random_scores(fam, seed=6)
    files = score_files(fam, scores, "api")
    name = "model.layers.1.self_attn.k_proj.bias"
    models = [fam.base, *fam.experts]
    tensors = [load_file(m / "model.safetensors")[name] for m in models]
    got = merge_tensors(
        tensors,
        "wp",
        ids=[str(m) for m in models],
        base_index=0,
        name=name,
        parameters={"scores": [str(f) for f in files]},
    )
    experts = [load_inputs(e) for e in fam.experts]
    torch.testing.assert_close(got.double(), dense_reference(name, fam.config, experts, scores))


def test_check_names_expert_of_another_architecture(family, tmp_path):
    fam = family("llama")
    other = save_model(tmp_path / "mistral", CONFIGS["mistral"](), seed=8)
    files = score_files(fam, random_scores(fam, seed=9), "arch")
    config = MergeConfiguration.model_validate(
        {
            **wp_recipe(fam, files),
            "models": [{"model": str(other), "parameters": {"scores": str(files[0])}}],
        }
    )
    with pytest.raises(ValueError, match="architecture='?MistralForCausalLM.*LlamaForCausalLM"):
        wp.check_wp_recipe(config)


# --- command lines ----------------------------------------------------------------------------
def test_mergekit_wp_merge_with_mergekit_options(family, tmp_path):
    fam = family("llama")
    scores = random_scores(fam, seed=10)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(wp_recipe(fam, score_files(fam, scores, "cli"))))
    out = tmp_path / "out"
    args = ["merge", str(recipe), str(out), "--out-shard-size", "2K", "--lazy-unpickle"]
    result = CliRunner().invoke(cli_main, [*args, "--no-copy-tokenizer", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").is_file()  # sharded as asked
    assert_matches_reference(load_output(out), fam, scores)


def test_mergekit_wp_merge_rejects_bad_map_before_writing(family, tmp_path):
    fam = family("llama")
    scores = random_scores(fam, seed=11)
    files = score_files(fam, scores, "cli-bad")
    other = ModelShape.from_config({**fam.config.to_dict(), "num_hidden_layers": 3})
    write_scores(files[1], other, torch.ones(3, 4), torch.ones(3, 12))
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(wp_recipe(fam, files)))
    result = CliRunner().invoke(cli_main, ["merge", str(recipe), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert f"score map {files[1]}" in result.output
    assert "num_hidden_layers=3" in result.output
    assert not (tmp_path / "out").exists()


def mergekit_yaml(recipe: dict, out: Path, **env: str) -> subprocess.CompletedProcess:
    """Plain `mergekit-yaml` in a fresh interpreter: no mergekit_wp import but the start-up hook."""
    path = out.parent / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(recipe))
    environ = {k: v for k, v in os.environ.items() if k != "MERGEKIT_WP_NO_HOOK"}
    environ.update(HF_HUB_OFFLINE="1", **env)
    args = [str(VENV_BIN / "mergekit-yaml"), str(path), str(out), "--no-copy-tokenizer"]
    return subprocess.run(
        args, check=False, capture_output=True, text=True, env=environ, timeout=600
    )


def test_startup_hook_is_installed_and_current():
    installed = importlib.util.find_spec("_mergekit_wp_hook")
    assert installed is not None, "mergekit_wp_hook.pth missing: pip install -e . again"
    source = Path(wp.__file__).with_name("_hook.py")
    if source.is_file():  # editable installs copy the hook: a stale copy needs a reinstall
        assert Path(installed.origin).read_text() == source.read_text()
    assert (Path(installed.origin).parent / "mergekit_wp_hook.pth").is_file()


def test_startup_hook_imports_neither_torch_nor_mergekit():
    code = (
        "import json, sys; print(json.dumps([sorted(m for m in sys.modules if m.split('.')[0] "
        "in ('torch', 'mergekit', 'mergekit_wp', 'transformers')), "
        "[type(f).__name__ for f in sys.meta_path]]))"
    )
    environ = {k: v for k, v in os.environ.items() if k != "MERGEKIT_WP_NO_HOOK"}
    for env, hooked in (({}, True), ({"MERGEKIT_WP_NO_HOOK": "1"}, False)):
        result = subprocess.run(
            [sys.executable, "-c", code],
            check=False,
            capture_output=True,
            text=True,
            env={**environ, **env},
        )
        heavy, finders = json.loads(result.stdout)
        assert heavy == []
        assert ("RegisterWpFinder" in finders) is hooked


def test_plain_mergekit_yaml_finds_wp_through_the_startup_hook(family, tmp_path):
    fam = family("gemma2")
    scores = random_scores(fam, seed=12)
    recipe = wp_recipe(fam, score_files(fam, scores, "hook"))
    result = mergekit_yaml(recipe, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_matches_reference(load_output(tmp_path / "out"), fam, scores)
    off = mergekit_yaml(recipe, tmp_path / "off", MERGEKIT_WP_NO_HOOK="1")
    assert off.returncode != 0
    assert "Unimplemented merge method wp" in off.stderr


def write_nan_map(path: Path, shape: ModelShape) -> Path:
    write_scores(path, shape, torch.ones(2, 4), torch.ones(2, 12))
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.heads"][2] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    return path


def _missing_file(fam, recipe, tmp_path):
    recipe["models"][1]["parameters"]["scores"] = str(tmp_path / "nope.safetensors")
    return [f"{tmp_path / 'nope.safetensors'}: file not found"]


def _other_shape(fam, recipe, tmp_path):
    other = ModelShape.from_config({**fam.config.to_dict(), "intermediate_size": 10})
    path = write_scores(tmp_path / "other.safetensors", other, torch.ones(2, 4), torch.ones(2, 10))
    recipe["models"][0]["parameters"]["scores"] = str(path)
    return [str(path), "intermediate_size=10", "intermediate_size=12"]


def _nan_score(fam, recipe, tmp_path):
    path = write_nan_map(tmp_path / "nan.safetensors", fam.shape)
    recipe["models"][1]["parameters"]["scores"] = str(path)
    return [str(path), "non-finite", "model.layers.1.self_attn.heads[2]"]


def _missing_parameter(fam, recipe, tmp_path):
    del recipe["models"][1]["parameters"]
    return ["Missing required parameter scores", str(fam.experts[1])]


def _other_architecture(fam, recipe, tmp_path):
    other = save_model(tmp_path / "mistral", CONFIGS["mistral"](), seed=13)
    recipe["models"][1]["model"] = str(other)
    return ["architectures"]


@pytest.mark.parametrize(
    "breaks", [_missing_file, _other_shape, _nan_score, _missing_parameter, _other_architecture]
)
def test_bad_inputs_fail_through_mergekit_yaml_leaving_nothing_finished(family, tmp_path, breaks):
    fam = family("llama")
    recipe = wp_recipe(fam, score_files(fam, random_scores(fam, seed=14), "bad")[:2])
    recipe["models"] = recipe["models"][:2]
    expected = breaks(fam, recipe, tmp_path)
    out = tmp_path / "out"
    result = mergekit_yaml(recipe, out)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    assert not (out / "config.json").exists()
    assert not list(out.glob("*.safetensors"))
