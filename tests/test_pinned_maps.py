"""The zoo's score maps, pinned: restructuring the scoring code must leave them byte-identical.

Small versions of `scoring/zoo-instruct.yml` (anchor utility stitched with a KL downstream,
every method, exact neurons chosen by WP-attr) and `scoring/zoo-math.yml` (KL on generated
responses), in float64 so that the pins do not depend on the CPU's float32 kernels. The hashes
were first taken with the code as it stood before the one-engine restructuring (issue #13), and
re-taken with that same code (commit df6446b) when the zoo was rebuilt (issue #11); a change
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
    "instruct/ap.safetensors": "fc0e6d72869d197414bf4469db65e122a998f31107d5c8e30029552f67a90318",
    "instruct/ap_attr.safetensors": (
        "578aabbff3cf65ca79698f54c20338b4d867da0412a26ac7d7ba167549dfd57d"
    ),
    "instruct/downstream/ap.safetensors": (
        "976dd23e50610d2be7106789daa7a5b628ffd106e0c893e0e22db0afff2a99d6"
    ),
    "instruct/downstream/ap_attr.safetensors": (
        "08bf0cee81f1bbe2bc5830da727633c2becfacd05dee91a8566c89dea700ce46"
    ),
    "instruct/downstream/wp.safetensors": (
        "b046ded793006850115c8b323e272d0ebcd0cefa69760f2f1f36afdf8e185c74"
    ),
    "instruct/downstream/wp_attr.safetensors": (
        "36ed210700f028a6dddeff86045a6c5901a19a5ecd91eb78b2272fcc0c33bbf9"
    ),
    "instruct/upstream/ap.safetensors": (
        "104f3568dfcf6f8f4214e96560c362c782b9907da95fc06b61efa8aea4420f55"
    ),
    "instruct/upstream/ap_attr.safetensors": (
        "c71d259465b6a1c63058e46c1fd70caa7777c1327fdc77f93a32b7826ecb183c"
    ),
    "instruct/upstream/wp.safetensors": (
        "aa25eacde3b081411a7eea84837a9a2f6877aacd38dc27e66681af4691fa7087"
    ),
    "instruct/upstream/wp_attr.safetensors": (
        "733be7f10c37d6642095dee84509e8acb048a4930b553f7ac2bb2521e1868389"
    ),
    "instruct/wp.safetensors": "c89b370f1eb5c0a3e2a6de7586aee569bc79bd01d88026fef0711343bd48b297",
    "instruct/wp_attr.safetensors": (
        "6cd1a5bfca7c399d1259028e3ec99fc8fecfb379cccae9481ad458c780717576"
    ),
    "math/ap_attr.safetensors": "70f9d467af40a372755cef89a85bc1fde8bc837c3eea761c262d4ab4aee1e79e",
    "math/wp_attr.safetensors": "655bf17c624b53b270154894e5606ca6c582e04b172dbaf02903e998f9211bcc",
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
