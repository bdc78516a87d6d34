"""Merge recipes in `recipes/`: mergekit YAML plus two conveniences the bench renders away.

- `zoo:NAME` model references become the micro zoo's folders (`mergekit_wp.zoo.model_path`).
- Relative paths (local models, `scores:` maps of the `wp` method) resolve against a project
  root (the folder holding `recipes/`, `scoring/`, `out/`), not the working directory.

`python -m mergekit_wp.evaluation.recipes RECIPE.yml` prints the plain recipe `mergekit-yaml`
takes.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from mergekit_wp.evaluation.runner import check_model

ZOO_PREFIX = "zoo:"
_MODEL_KEYS = ("model", "base_model")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """The recipe's YAML mapping, checked against mergekit's MergeConfiguration."""
    from mergekit.config import MergeConfiguration
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe {path} not found")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"recipe {path}: expected a mergekit config mapping")  # noqa: TRY004
    try:
        MergeConfiguration.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"recipe {path}: {where}: {first['msg']}") from None
    return raw


def resolve_model_ref(reference: str, root: Path, source: str) -> str:
    """A folder for `zoo:NAME` or a relative path; hub ids pass through unchanged."""
    if reference.startswith(ZOO_PREFIX):
        from mergekit_wp.zoo import model_path

        name = reference[len(ZOO_PREFIX) :]
        try:
            return str(model_path(name))
        except (ValueError, FileNotFoundError) as err:  # unknown name / not built yet
            raise ValueError(f"{source}: {reference}: {err}") from None
    local = root / reference
    if reference.startswith((".", "/", "~")) or local.exists():
        try:
            return check_model(local if not Path(reference).is_absolute() else reference)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    return reference


def _models(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Every `{model: ..., parameters: ...}` entry, in models:, slices: and modules:."""
    entries = list(raw.get("models") or [])
    for item in raw.get("slices") or []:
        entries += item.get("sources") or []
    for module in (raw.get("modules") or {}).values():
        entries += module.get("models") or []
        for item in module.get("slices") or []:
            entries += item.get("sources") or []
    return entries


def render_recipe(raw: dict[str, Any], root: str | Path, source: str = "recipe") -> dict[str, Any]:
    """A plain mergekit recipe: zoo names and relative paths made absolute; models checked."""
    root = Path(root).resolve()
    out = copy.deepcopy(raw)
    if isinstance(out.get("base_model"), str):
        out["base_model"] = resolve_model_ref(out["base_model"], root, source)
    tokenizer_source = out.get("tokenizer_source")
    if isinstance(tokenizer_source, str) and tokenizer_source not in ("base", "union"):
        out["tokenizer_source"] = resolve_model_ref(tokenizer_source, root, source)
    for entry in _models(out):
        entry["model"] = resolve_model_ref(str(entry["model"]), root, source)
        scores = (entry.get("parameters") or {}).get("scores")
        if isinstance(scores, str):
            entry["parameters"]["scores"] = str((root / scores).resolve())
    return out


def score_paths(raw: dict[str, Any], root: str | Path) -> list[Path]:
    """The score maps a `wp` recipe reads, as absolute paths."""
    root = Path(root).resolve()
    paths = []
    for entry in _models(raw):
        scores = (entry.get("parameters") or {}).get("scores")
        if isinstance(scores, str):
            paths.append((root / scores).resolve())
    return paths


def main(argv: list[str]) -> int:
    """Print the plain mergekit recipe for `argv[0]` (root: `argv[1]`, default the CWD)."""
    if not argv:
        print("usage: python -m mergekit_wp.evaluation.recipes RECIPE.yml [ROOT]", file=sys.stderr)
        return 2
    root = Path(argv[1]) if len(argv) > 1 else Path.cwd()
    try:
        rendered = render_recipe(read_recipe(argv[0]), root, argv[0])
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(rendered, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
