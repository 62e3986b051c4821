"""Sweep points (a config file with its ``:arg`` plus dotted overrides) and grid/product helpers.

    grid(seed=[0, 1], **{"model.projector": ["vce", "mlp"]})
    -> [{"seed": 0, "model.projector": "vce"}, {"seed": 0, "model.projector": "mlp"},
        {"seed": 1, "model.projector": "vce"}, {"seed": 1, "model.projector": "mlp"}]

A point's name is its overrides as ``key=value`` joined by commas, keys sorted
(``model.projector=mlp,seed=1``), made filesystem-safe; it names the point's workdir.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
# Directory names stay well under the usual 255-byte limit; longer names end in a hash.
_MAX_NAME = 120


@dataclasses.dataclass(frozen=True)
class Point:
    """One training run: ``config`` as given to ``--config`` (``FILE[:ARG]``) and overrides.

    ``overrides`` maps dotted config fields to values (``{"stage2.num_steps": 200}``);
    ``name`` replaces the name derived from them.
    """

    config: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None


def grid(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    """Every combination of the values of ``axes``; the first axis varies slowest.

    Dotted keys go through ``**{"model.projector": [...]}``.
    """
    for key, values in axes.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise TypeError(f"grid axis {key!r} needs a list of values, got {values!r}")
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


def product(*override_lists: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of one dict from each list, merged; the first list varies slowest.

    Raises ValueError when two merged dicts set the same key.
    """
    merged = []
    for combo in itertools.product(*(list(dicts) for dicts in override_lists)):
        point: dict[str, Any] = {}
        for overrides in combo:
            clash = sorted(set(point) & set(overrides))
            if clash:
                raise ValueError(f"product: {clash} set by more than one list in {list(combo)}")
            point.update(overrides)
        merged.append(point)
    return merged


def seeds(n: int, key: str = "seed") -> list[dict[str, int]]:
    """``[{key: 0}, ..., {key: n - 1}]``."""
    return [{key: seed} for seed in range(n)]


def format_value(value: Any) -> str:
    """``value`` as written after ``--config.key=`` (and in point names)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return repr(tuple(value))
    return str(value)


def config_label(config: str) -> str:
    """``configs/moe_lm.py:experts=8,top_k=2`` -> ``moe_lm+experts=8+top_k=2``."""
    file, _, arg = config.partition(":")
    stem = pathlib.Path(file).stem
    return f"{stem}+{arg.replace(',', '+')}" if arg else stem


def describe(overrides: Mapping[str, Any], config: str | None = None) -> str:
    """``key=value`` pairs with sorted keys, after ``config_label(config)`` when given."""
    parts = [config_label(config)] if config is not None else []
    parts += [f"{key}={format_value(overrides[key])}" for key in sorted(overrides)]
    return ",".join(parts) or "default"


def safe_name(text: str) -> str:
    """``text`` with characters other than ``A-Za-z0-9._,=+-`` replaced by ``_``; a long text is
    cut and ends in a hash of the whole, so distinct texts keep distinct names."""
    name = _UNSAFE.sub("_", text)
    if name in (".", ".."):
        name = name.replace(".", "_")
    if len(name) > _MAX_NAME:
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}-{digest}"
    return name


def point_names(points: Sequence[Point]) -> list[str]:
    """The workdir name of every point: its ``name`` or ``describe`` of its overrides, prefixed
    with its config label when the points do not all share one config.

    Raises ValueError naming the points when two get the same name.
    """
    with_config = len({point.config for point in points}) > 1
    names = [
        safe_name(point.name or describe(point.overrides, point.config if with_config else None))
        for point in points
    ]
    first_index: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in first_index:
            other = points[first_index[name]]
            raise ValueError(
                f"sweep points {first_index[name]} ({other}) and {index} ({points[index]}) are "
                f"both named {name!r}; give them different overrides or a name="
            )
        first_index[name] = index
    return names
