"""``--set section.field=value``: any config field changed from the command line (as
MMDetection's ``--cfg-options`` and detectron2's trailing ``opts``), each value parsed by
the field's annotated type, so a wrong one is a one-line error naming the field."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Sequence
from typing import Literal

from softteacher.config import SECTION_TYPES, ExperimentConfig


def apply_overrides(cfg: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """``cfg`` with each ``section.field=value`` set (``--set``, like MMDetection's
    ``--cfg-options``): any field can be tried without a new preset or flag. Values are
    parsed by the field's annotated type; a later override of a field wins."""
    changes: dict[str, dict[str, object]] = {}
    for override in overrides:
        key, equals, text = override.partition("=")
        section, dot, name = key.strip().partition(".")
        if not equals or not dot:
            raise ValueError(
                f"--set {override!r}: expected section.field=value, e.g. method.cls_thr=0.8"
            )
        if section not in SECTION_TYPES:
            raise ValueError(
                f"--set {override}: unknown section {section!r}; known: {', '.join(SECTION_TYPES)}"
            )
        hints = typing.get_type_hints(SECTION_TYPES[section])
        if name not in hints:
            raise ValueError(
                f"--set {override}: {section} has no field {name!r}; its fields: "
                f"{', '.join(hints)}"
            )
        try:
            changes.setdefault(section, {})[name] = _parse_value(text.strip(), hints[name])
        except ValueError as expected:
            raise ValueError(
                f"--set {override}: {key.strip()} takes {expected}, got {text.strip()!r}"
            ) from None
    return cfg.replace(**changes)


def _parse_value(text: str, hint: object) -> object:
    """``text`` as a value of type ``hint``; a ValueError says what the type takes."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and text.lower() in ("none", "null"):
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _parse_value(text, inner)
    if origin is Literal:
        if text not in args:
            raise ValueError("one of " + ", ".join(map(repr, args)))
        return text
    if origin is tuple:
        items = [item.strip() for item in text.split(",")] if text else []
        item_types = [args[0]] * len(items) if args[-1] is Ellipsis else list(args)
        if len(items) != len(item_types):
            raise ValueError(f"{len(item_types)} comma-separated values")
        try:
            return tuple(_parse_value(item, t) for item, t in zip(items, item_types))
        except ValueError as item:
            raise ValueError(f"comma-separated values, each {item}") from None
    if hint is bool:
        words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        if text.lower() not in words:
            raise ValueError("true or false")
        return words[text.lower()]
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("a whole number") from None
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("a number") from None
        if not math.isfinite(value):
            raise ValueError("a finite number")
        return value
    if hint is str:
        return text
    raise TypeError(f"apply_overrides cannot parse a {hint!r} field; teach _parse_value it")


