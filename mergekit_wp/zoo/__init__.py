"""The micro zoo: a base Llama and instruction, math and code experts, trained offline from
seeds.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent
MODELS_DIR = ROOT / "models"
DATA_DIR = ROOT / "data"
MODEL_NAMES = ("base", "instruct", "math", "code")
DATA_FILES = (
    "ifeval_train",
    "ifeval_test",
    "ifeval_val",
    "math_train",
    "math_test",
    "math_val",
    "code_train",
    "code_test",
    "code_val",
    "knowledge_test",
    "corpus_heldout",
)


def model_path(name: str) -> Path:
    """The HF folder of zoo model `name` (base, instruct, math or code)."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown zoo model {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    path = MODELS_DIR / name
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"zoo model {name!r} is not built at {path}; run `mergekit-wp zoo build`"
        )
    return path


def data_path(name: str) -> Path:
    """A zoo data file, by stem (`ifeval_test`) or file name (`ifeval_test.jsonl`)."""
    stem = name.split(".")[0]
    if stem not in DATA_FILES:
        raise ValueError(f"unknown zoo data file {name!r}; expected one of {', '.join(DATA_FILES)}")
    suffix = ".txt" if stem == "corpus_heldout" else ".jsonl"
    path = DATA_DIR / f"{stem}{suffix}"
    if not path.exists():
        raise FileNotFoundError(f"zoo data file {path} is missing; run `mergekit-wp zoo build`")
    return path
