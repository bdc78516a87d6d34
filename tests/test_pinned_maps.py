"""The zoo's score maps, pinned: restructuring the scoring code must leave them byte-identical.

Small versions of `scoring/zoo-instruct.yml` (anchor utility stitched with a KL downstream,
every method, exact neurons chosen by WP-attr) and `scoring/zoo-math.yml` (KL on generated
responses), in float64 so that the pins do not depend on the CPU's float32 kernels. The hashes
were taken with the code as it stood before the one-engine restructuring (issue #13); a change
that moves them changes what users' maps hold and must say so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mergekit_wp.scoring.config import parse_config
from mergekit_wp.scoring.pipeline import score

_COMMON = {"base": "zoo:base", "device": "cpu", "dtype": "float64", "batch_size": 4, "threads": 1}
CONFIGS = {
    "instruct": _COMMON
    | {
        "model": "zoo:instruct",
        "data": {
            "source": "zoo:ifeval_train.jsonl",
            "kind": "paired",
            "split": "evaluation",
            "max_examples": 6,
        },
        "utility": {
            "kind": "anchor",
            "anchor": "out/instruct/anchor.safetensors",
            "fit": True,
            "fixed_layer": 3,
            "downstream": "kl",
        },
        "methods": ["wp_attr", "wp", "ap_attr", "ap"],
        "granularity": {"heads": True, "neurons": True, "exact_neurons": 12},
        "output": "out/instruct",
        "gap_floor": 1.0e-4,
    },
    "math": _COMMON
    | {
        "model": "zoo:math",
        "data": {
            "source": "zoo:math_train.jsonl",
            "kind": "domain",
            "max_examples": 6,
            "responses": "generate",
            "max_new_tokens": 12,
        },
        "utility": {"kind": "kl"},
        "methods": ["wp_attr", "ap_attr"],
        "output": "out/math",
        "gap_floor": 1.0e-6,
    },
}

PINNED = {
    "instruct/ap.safetensors": "b70c4478f9231028cecfa589744d4a349adcc6d120960410cc3b7334897a3fd9",
    "instruct/ap_attr.safetensors": (
        "d1648c9e0915e52ef57d36910db3a0d94802f9f78849e419aad5b8c6ace07123"
    ),
    "instruct/downstream/ap.safetensors": (
        "d96edac7036166b47c62fc370bd791dd3f75b711da216b347ee477bfef3c9619"
    ),
    "instruct/downstream/ap_attr.safetensors": (
        "b640c5e8a14b3df4baaee07e4e3dcf38f6b8ad047f52796c0b4ef539181eec85"
    ),
    "instruct/downstream/wp.safetensors": (
        "448fb47ab00a511d82fc5fa28ed4dd813fd4930f082add8294424e1db855bcac"
    ),
    "instruct/downstream/wp_attr.safetensors": (
        "1e0a22c5d7fa712d729b8096511be8ce47690540fa0e4d1666d4f48f69cc505f"
    ),
    "instruct/upstream/ap.safetensors": (
        "e11630ba0939b464588606ebbdea4f6229f924e4d081b9e85f9dd27c8e9ded95"
    ),
    "instruct/upstream/ap_attr.safetensors": (
        "3018240bdc0673362641693f2e7a781ba9065cabf0518a81b28eeba57a9b7a8c"
    ),
    "instruct/upstream/wp.safetensors": (
        "d9e0b21c08c570f29d48be93d29c2d06f9671a63a405f55a45c35b3ffaec89c1"
    ),
    "instruct/upstream/wp_attr.safetensors": (
        "32f81f8b30f609209fc24a579e7608780bced224da9d3ca2db3a3e8253d16521"
    ),
    "instruct/wp.safetensors": "d5354a54a3970f71bfe1c7638b7803a566cd553b460afe3b5fd199b3c641511f",
    "instruct/wp_attr.safetensors": (
        "65ab13f766c8c068b0ab4f2d1de1a461cd9b0f4dd98e76797d98492028f2f6e7"
    ),
    "math/ap_attr.safetensors": "39522ba5626c1aec37edc1375e0e075305a53e9e9a200a70ab6304042f40a6b7",
    "math/wp_attr.safetensors": "cab573f57507937e413dc8e1dfde7cd6475ecd3a7bfd730169ce69b8f42e34fb",
}


@pytest.mark.usefixtures("one_torch_thread")
def test_zoo_maps_match_their_pins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative output and anchor paths, as in the shipped configs
    for config in CONFIGS.values():
        score(parse_config(config))
    out = Path("out")
    hashes = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*.safetensors"))
        if p.name != "anchor.safetensors"
    }
    assert hashes == PINNED
