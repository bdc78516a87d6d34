"""Fair settings: each baseline's knobs chosen per combination on a validation split.

The bench YAML's `validation:` names a suite over data disjoint from the test split, its
example limit, and per method a small grid of knob values (`ties: {density: [0.3, 0.5, 0.7]}`).
A knob is set where the recipe already sets it: in its `parameters:` (lambda, select_topk) or in
every expert's parameters (density, epsilon, ...). Methods without a grid run as their recipe says.
"""

from __future__ import annotations

import copy
import itertools
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator

from mergekit_wp.config import StrictModel


def check_limit(value: Any, what: str | None = None) -> int | float | None:
    """lm-eval's --limit: a whole number of examples >= 1 or a fraction in (0, 1); None = all."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not (0 < number < 1 or (number >= 1 and number.is_integer())):
        raise ValueError(
            f"{what + ': ' if what else ''}{value!r} is neither a count of examples per task "
            f"(a whole number >= 1) nor a fraction of each task (between 0 and 1)"
        )
    return int(number) if number >= 1 else number


# A limit in a bench YAML; errors name the key (mergekit_wp.config.validate).
Limit = Annotated[int | float | None, BeforeValidator(lambda value: check_limit(value))]


class Validation(StrictModel):
    """The bench's `validation:`: where and on what the bench chooses each method's setting."""

    suite: str
    limit: Limit = None
    # Method -> knob -> values, in order.
    grid: dict[str, dict[str, tuple[Any, ...]]] = Field(default_factory=dict)

    @field_validator("grid", mode="before")
    @classmethod
    def _grid(cls, grid: Any) -> Any:
        for method, knobs in (grid or {}).items():
            if not isinstance(knobs, dict) or not knobs:
                raise ValueError(f"{method} must map knobs to lists of values")
            for knob, values in knobs.items():
                if not isinstance(values, list) or not values or len(set(values)) != len(values):
                    raise ValueError(
                        f"{method}.{knob} must be a list of distinct values, got {values!r}"
                    )
        return grid or {}

    def settings(self, method: str) -> list[dict[str, Any]]:
        """Every combination of the method's knob values, in declared order; [{}]: no grid."""
        knobs = self.grid.get(method, {})
        return [dict(zip(knobs, values)) for values in itertools.product(*knobs.values())]


def setting_label(setting: dict[str, Any]) -> str:
    """`lambda=0.5, density=0.3`; empty for the recipe's own setting."""
    return ", ".join(f"{knob}={value}" for knob, value in setting.items())


def setting_slug(setting: dict[str, Any]) -> str:
    """A folder name for a setting: `lambda-0.5_density-0.3`, `recipe` for the recipe's own."""
    return "_".join(f"{knob}-{value}" for knob, value in setting.items()) or "recipe"


def apply_setting(config: dict[str, Any], setting: dict[str, Any], source: str) -> dict[str, Any]:
    """The recipe with each knob replaced where the recipe sets it (shared or per expert)."""
    out = copy.deepcopy(config)
    for knob, value in setting.items():
        if knob in (out.get("parameters") or {}):
            out["parameters"][knob] = value
            continue
        entries = [m for m in out.get("models") or [] if knob in (m.get("parameters") or {})]
        if not entries:
            raise ValueError(
                f"{source}: the validation grid varies {knob!r}, which the recipe does not set "
                f"(in parameters: or in its experts' parameters); give it a default there"
            )
        for entry in entries:
            entry["parameters"][knob] = value
    return out


def average(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)
