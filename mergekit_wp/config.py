"""One configuration style: strict pydantic models read from YAML, errors naming file and key."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class StrictModel(BaseModel):
    """A configuration section: unknown keys are errors, values are immutable once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def replace(model: Model, **changes: Any) -> Model:
    """A copy of `model` with `changes`, validated again (`model_copy` would skip validation)."""
    return type(model).model_validate(dict(model) | changes)


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys the model allows at `loc` (a nested model's), for an unknown-key message."""
    current: Any = model
    for part in loc:
        if (
            isinstance(current, type)
            and issubclass(current, BaseModel)
            and part in current.model_fields
        ):
            current = current.model_fields[part].annotation
        # Lists, mappings and optionals: the first model among the type's arguments.
        while not (isinstance(current, type) and issubclass(current, BaseModel)):
            args = [a for a in typing.get_args(current) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if models:
                current = models[0]
            elif args:
                current = args[-1]
            else:
                return []
    return sorted(current.model_fields)


def _message(model: type[BaseModel], error: dict) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        kind = "key" if len(loc) > 1 else "top-level key"
        return f"unknown {kind} {where!r}; known: {', '.join(known)}"
    if error["type"] == "value_error":  # our validators' own sentences
        text = str(error["ctx"]["error"])
        return text if text.startswith(where) else f"{where}: {text}"  # named once
    got = "" if error["type"] == "missing" else f" (got {error['input']!r})"
    return f"key {where!r}: {error['msg']}{got}"


def validate(model: type[Model], data: object, source: str) -> Model:
    """`data` (a parsed YAML mapping) as `model`; ValueError naming `source`, each key and what was
    expected."""
    if not isinstance(data, dict):
        keys = ", ".join(list(model.model_fields)[:3])
        raise ValueError(  # noqa: TRY004 - bad user input, reported like every other config error
            f"{source}: expected a mapping of keys ({keys}, ...), got {type(data).__name__}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ValueError(
            "\n".join(f"{source}: {_message(model, e)}" for e in err.errors())
        ) from None


def read_yaml(path: str | Path, what: str) -> object:
    """The parsed YAML of `path`; ValueError naming the file if it is missing or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path}: file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None


def load_yaml(path: str | Path, model: type[Model], what: str) -> Model:
    """Read and validate a YAML file as `model`; `what` names the file's kind in errors."""
    return validate(model, read_yaml(path, what), str(path))
