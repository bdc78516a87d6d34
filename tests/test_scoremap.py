"""Score map format v1: round trip, atomic writes, and errors that name file, key and shape."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_wp import scoremap
from mergekit_wp.components import ModelShape
from mergekit_wp.scoremap import ScoreMap, ScoreMapError, read_score_map, write_score_map

SHAPE = ModelShape.from_config(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 40,
        "hidden_size": 32,
        "intermediate_size": 20,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
    }
)


def a_map(shape: ModelShape = SHAPE, seed: int = 0) -> ScoreMap:
    gen = torch.Generator().manual_seed(seed)
    layers, heads, neurons = (
        shape.num_hidden_layers,
        shape.num_attention_heads,
        shape.intermediate_size,
    )
    scores = ScoreMap.zeros(shape, method="wp_attr", utility="anchor", base_model="b", model="m")
    scores.heads = torch.randn(layers, heads, generator=gen)
    scores.neurons = torch.randn(layers, neurons, generator=gen)
    scores.parts = {
        "q": torch.randn(layers, heads, generator=gen),
        "down": torch.randn(layers, neurons, generator=gen),
    }
    scores.details = {"examples": 12, "anchor_layer": 2}
    return scores


def rewrite(path: Path, edit) -> None:
    """Change the stored tensors behind the writer's back (it refuses to write bad maps)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    edit(tensors, metadata)
    save_file(tensors, str(path), metadata=metadata)


def test_round_trip_keeps_scores_parts_and_metadata(tmp_path):
    original = a_map()
    path = write_score_map(tmp_path / "deep" / "m.safetensors", original)
    back = read_score_map(path, SHAPE)
    assert torch.equal(back.heads, original.heads) and torch.equal(back.neurons, original.neurons)
    assert back.parts.keys() == {"q", "down"}
    assert torch.equal(back.parts["down"], original.parts["down"])
    assert (back.method, back.utility, back.base_model, back.model) == (
        "wp_attr",
        "anchor",
        "b",
        "m",
    )
    assert back.details == {"examples": 12, "anchor_layer": 2}
    assert back.num_key_value_heads == 2
    assert "model.layers.2.self_attn.heads.q" in load_file(path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "mergekit-wp/score-map"


def test_equal_maps_give_equal_bytes(tmp_path):
    first = write_score_map(tmp_path / "a.safetensors", a_map(seed=3))
    second = write_score_map(tmp_path / "b.safetensors", a_map(seed=3))
    assert first.read_bytes() == second.read_bytes()


def test_write_is_atomic(tmp_path, monkeypatch):
    path = write_score_map(tmp_path / "m.safetensors", a_map(seed=1))
    before = path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(scoremap, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_score_map(path, a_map(seed=2))
    assert path.read_bytes() == before  # the old map is intact
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_writer_refuses_non_finite_and_inconsistent_maps(tmp_path):
    bad = a_map()
    bad.neurons[1, 4] = float("inf")
    with pytest.raises(
        ScoreMapError, match=r"non-finite value \(inf\) at model\.layers\.1\.mlp\.neurons\[4\]"
    ):
        write_score_map(tmp_path / "m.safetensors", bad)
    bad = a_map()
    bad.parts["q"] = torch.zeros(3, 7)
    with pytest.raises(ScoreMapError, match=r"part 'q' has shape \[3, 7\], expected \[3, 8\]"):
        write_score_map(tmp_path / "m.safetensors", bad)
    bad = a_map()
    bad.heads = torch.zeros(8)
    with pytest.raises(ScoreMapError, match=r"\[layers, units\]"):
        write_score_map(tmp_path / "m.safetensors", bad)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda t, m: t.pop("model.layers.2.mlp.neurons"),
            r"missing tensor 'model\.layers\.2\.mlp\.neurons' \(expected \[20\]\)",
        ),
        (
            lambda t, m: t.update({"model.layers.0.self_attn.heads": torch.zeros(7)}),
            r"'model\.layers\.0\.self_attn\.heads' has shape \[7\], expected \[8\]",
        ),
        (
            lambda t, m: t["model.layers.1.self_attn.heads"].__setitem__(3, float("nan")),
            r"non-finite value \(nan\) at model\.layers\.1\.self_attn\.heads\[3\]",
        ),
        (
            lambda t, m: t["model.layers.0.mlp.neurons.down"].__setitem__(0, float("-inf")),
            (
                r"part down has a non-finite value \(-inf\) at "
                r"model\.layers\.0\.mlp\.neurons\.down\[0\]"
            ),
        ),
        (
            lambda t, m: t.update({"model.layers.3.mlp.neurons": torch.zeros(20)}),
            r"unexpected tensor 'model\.layers\.3\.mlp\.neurons' for a map with 3 layers",
        ),
        (lambda t, m: m.update(format="other"), r"metadata format is 'other'"),
        (lambda t, m: m.update(version="3"), r"version '3' is not supported"),
        (lambda t, m: m.update(version="2"), r"metadata 'num_experts' missing"),
        (lambda t, m: m.pop("intermediate_size"), r"metadata 'intermediate_size' missing"),
        (lambda t, m: m.update(num_hidden_layers="0"), r"num_hidden_layers must be at least 1"),
    ],
)
def test_reader_names_file_and_key(tmp_path, edit, message):
    path = write_score_map(tmp_path / "m.safetensors", a_map())
    rewrite(path, edit)
    with pytest.raises(ScoreMapError, match=f"score map {path}: .*" + message):
        read_score_map(path)


def test_reader_checks_the_model_shape(tmp_path):
    path = write_score_map(tmp_path / "m.safetensors", a_map())
    other = ModelShape.from_config(
        {
            **{k: getattr(SHAPE, k) for k in ("hidden_size", "vocab_size")},
            "architectures": ["LlamaForCausalLM"],
            "num_hidden_layers": 3,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "intermediate_size": 20,
        }
    )
    with pytest.raises(
        ScoreMapError,
        match=(
            f"score map {path}: made for a model with num_key_value_heads=2, "
            "but the model has num_key_value_heads=4"
        ),
    ):
        read_score_map(path, other)


def test_reader_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(ScoreMapError, match="nope.safetensors: file not found"):
        read_score_map(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ScoreMapError, match="junk.safetensors: not a safetensors file"):
        read_score_map(junk)
