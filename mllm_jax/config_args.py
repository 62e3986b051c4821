"""Parsing of the string argument of ``get_config(arg)`` (``--config configs/x.py:size=tiny``)."""

from __future__ import annotations

from typing import Any

import ml_collections


def parse_config_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"key=value,key=value"`` into a ConfigDict typed like ``defaults``.

    Every key must appear in ``defaults``; values are converted to the default's type
    (bools accept true/false/1/0). An empty or None ``arg`` returns the defaults.
    """
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    for item in arg.split(","):
        if "=" not in item:
            raise ValueError(f"config argument {item!r} in {arg!r} is not of the form key=value")
        key, value = (part.strip() for part in item.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
        result[key] = _convert(value, defaults[key], key)
    return result


def _convert(value: str, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        lowered = value.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"config argument {key}={value!r} is not a bool")
        return lowered in ("true", "1")
    try:
        return type(default)(value)
    except ValueError as err:
        raise ValueError(
            f"config argument {key}={value!r} is not a {type(default).__name__}"
        ) from err
