"""Field checks shared by the contract's records: one `SpecError` naming field and value.

Every check takes the value and the field's dotted name (`method.lr`, `step.loss`) and
returns the value in its canonical type, or raises `SpecError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import fields
from typing import Any

# Integers travel into SQLite, whose integers are 64-bit: anything beyond is refused here.
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


class SpecError(ValueError):
    """A job spec or event field is invalid; the message names the field and the value."""

    def __init__(self, field_name: str, value: object, expected: str) -> None:
        self.field = field_name
        self.value = value
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"field {field_name!r}: expected {expected}, got {shown}")


def require_mapping(value: object, name: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(name, value, "an object")
    return value


def reject_unknown(data: dict, cls: type, prefix: str) -> None:
    """Refuse keys that are not fields of the dataclass `cls`."""
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise SpecError(f"{prefix}{key}", data[key], f"one of the fields {sorted(known)}")


def int_field(
    value: object,
    name: str,
    minimum: int | None = None,
    optional: bool = False,
    maximum: int = INT64_MAX,
):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(name, value, "an integer" + (" or null" if optional else ""))
    if value < (INT64_MIN if minimum is None else minimum):
        raise SpecError(name, value, f"an integer >= {INT64_MIN if minimum is None else minimum}")
    if value > maximum:
        raise SpecError(name, value, f"an integer <= {maximum}")
    return value


def fits_int64(value: object) -> bool:
    """True for an int (not bool) SQLite can store: -2**63 .. 2**63 - 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return INT64_MIN <= value <= INT64_MAX


def refuse_constant(name: str) -> float:
    """`json.loads(parse_constant=...)`: JSON has no NaN or Infinity; Python's decoder
    accepts them unless told not to."""
    raise ValueError(f"{name} is not a JSON number")


def float_field(value: object, name: str, positive: bool = False, optional: bool = False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(name, value, "a finite number" + (" or null" if optional else ""))
    if positive and value <= 0:
        raise SpecError(name, value, "a positive number")
    return float(value)


def str_field(
    value: object, name: str, optional: bool = False, choices: Iterable[str] | None = None
):
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise SpecError(name, value, "a non-empty string" + (" or null" if optional else ""))
    if choices is not None and value not in choices:
        raise SpecError(name, value, f"one of {', '.join(choices)}")
    return value


def bool_field(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(name, value, "true or false")
    return value


def name_list_field(
    value: object, name: str, choices: Iterable[str] | None = None
) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise SpecError(name, value, "a list of names")
    if choices is not None:
        for item in value:
            if item not in choices:
                raise SpecError(name, item, f"one of {', '.join(choices)}")
    return tuple(value)


def any_field(value: Any, _name: str) -> Any:
    return value
