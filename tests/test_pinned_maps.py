"""The zoo's score maps, pinned: restructuring the scoring code must leave them byte-identical.

Small versions of `scoring/zoo-instruct.yml` (anchor utility stitched with a KL downstream,
every method, exact neurons chosen by WP-attr) and `scoring/zoo-math.yml` (KL on generated
responses), in float64 so that the pins do not depend on the CPU's float32 kernels. The hashes
were first taken with the code as it stood before the one-engine restructuring (issue #13),
re-taken with that same code (commit df6446b) on the zoo v3, and re-taken on the zoo v4 with the
code of commit 608b38b, which had reproduced the v3 pins byte for byte; a change that moves them
changes what users' maps hold and must say so.
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
    "instruct/ap.safetensors": "c17beb9fd478f27ba4daf76e310e42920a534c24e091e0f2e70838d2fa7a6d45",
    "instruct/ap_attr.safetensors": (
        "9ca637887c645807b02fbc4f7278738bba42f88226c4a744f6828bb93b204a4d"
    ),
    "instruct/downstream/ap.safetensors": (
        "8385f260d3b924355a9a2aa1ee311964226c755a94ab7f5481ac02e49caaed0e"
    ),
    "instruct/downstream/ap_attr.safetensors": (
        "7c0e18201269f128b23957b32bcc35977ad70bad4ff710c1f4e70fb1228afc15"
    ),
    "instruct/downstream/wp.safetensors": (
        "2eccecb9b56a9f95d7605c415116e79fc72d626c6759d76c0fa5b7c7254dd124"
    ),
    "instruct/downstream/wp_attr.safetensors": (
        "947f4a62f81948df636f30f7474d88c3d1fcc95b5b788cbec4c35e91d68562ad"
    ),
    "instruct/upstream/ap.safetensors": (
        "365cb97d48f5fa31c0160fc8df6446a5a70d66a8a18e473afc3c51b5e6a53ae1"
    ),
    "instruct/upstream/ap_attr.safetensors": (
        "bff659276c6643c5a087663d70fd93d656f98e22dc4adc2feb470fcedecbcef1"
    ),
    "instruct/upstream/wp.safetensors": (
        "9314604cb65e2d2bed8db5b26d9635acc6a1576a6f6419c2134fa9ac67a78706"
    ),
    "instruct/upstream/wp_attr.safetensors": (
        "8a5d681d3e8e40edec8fa9103f0bfbd7087f85958ba451126713e587e120afc0"
    ),
    "instruct/wp.safetensors": "48ecf6d1e52118ab8716682beb414bd2af56949e432c3646108e3d5399379590",
    "instruct/wp_attr.safetensors": (
        "f8deae8b510c64ea1334b1e93859f00e1cc9e74cfa7e984b174d08a18b924abc"
    ),
    "math/ap_attr.safetensors": "e25a9b25afbc1a4214152d7dc9279451c38deb0e9cfd070388e894e7a8dda25e",
    "math/wp_attr.safetensors": "64846bff517edb72c9b339eb7f87b835997839897a2a4bb2d018b9e63bcf2439",
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
