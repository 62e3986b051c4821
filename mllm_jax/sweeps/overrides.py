"""Dotted overrides applied to a config file's ConfigDict, and the same on a command line.

``apply_overrides`` checks every key exists and every value fits the field's type, with errors
that name the sweep point and the key. ``check_command_line`` then parses the point's
``--config FILE:ARG --config.key=value`` arguments exactly as ``python -m mllm_jax.train`` will
(absl + ml_collections.config_flags) and requires the same config, so no training job starts
with a config other than the one checked.
"""

from __future__ import annotations

import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from mllm_jax.sweeps.points import format_value


class OverrideError(ValueError):
    """An override that the config does not accept (unknown key, wrong type)."""


def load_config(config: str) -> ml_collections.ConfigDict:
    """``get_config(ARG)`` of ``FILE`` for ``config = "FILE[:ARG]"``, locked, as ``--config``
    loads it."""
    file = config.split(":", 1)[0]
    if not pathlib.Path(file).is_file():
        raise FileNotFoundError(f"config file {file!r} (from {config!r}) does not exist")
    return parse_command_line(config, [])


def _describe_field(path: str, value: Any) -> str:
    return f"{path}={value!r} ({type(value).__name__})"


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], *, where: str
) -> ml_collections.ConfigDict:
    """Sets every dotted ``overrides`` key in ``config`` (in place, keys sorted) and returns it.

    Raises OverrideError naming ``where`` (the sweep point) and the key when a field does not
    exist or the value does not fit its type. Beyond ml_collections' own type check, a bool is
    refused for a number field (``--config.seed=true`` would not parse).
    """
    for key in sorted(overrides):
        value = overrides[key]
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(parts[:depth]) or "the config"
                known = f" (fields: {sorted(node)})" if hasattr(node, "keys") else ""
                raise OverrideError(
                    f"{where}: override {key!r}: {parent} has no field {part!r}{known}"
                )
            if depth < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        current = node[leaf]
        if isinstance(value, bool) and not isinstance(current, bool) and current is not None:
            raise OverrideError(
                f"{where}: override {_describe_field(key, value)} does not match the field's "
                f"type {type(current).__name__} (current value {current!r})"
            )
        try:
            node[leaf] = value
        except TypeError as err:
            raise OverrideError(
                f"{where}: override {_describe_field(key, value)} does not match the field's "
                f"type {type(current).__name__} (current value {current!r}): {err}"
            ) from err
    return config


def flag_arguments(overrides: Mapping[str, Any]) -> list[str]:
    """``["--config.key=value", ...]`` for ``overrides``, keys sorted (a parent before its
    children, as config_flags requires)."""
    return [f"--config.{key}={format_value(overrides[key])}" for key in sorted(overrides)]


def parse_command_line(config: str, arguments: list[str]) -> ml_collections.ConfigDict:
    """The config that ``--config CONFIG *arguments`` gives a program using config_flags."""
    flag_values = flags.FlagValues()
    argv = ["sweep", "--config", config, *arguments]
    config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    with warnings.catch_warnings():
        # config_flags loads the file with the deprecated load_module(); nothing to act on here.
        warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
        flag_values(argv)
    return flag_values.config


def check_command_line(
    config: str, overrides: Mapping[str, Any], expected: ml_collections.ConfigDict, *, where: str
) -> None:
    """Raises OverrideError naming ``where`` unless the command-line form of ``overrides``
    parses to ``expected``."""
    try:
        parsed = parse_command_line(config, flag_arguments(overrides))
    except (flags.Error, TypeError, ValueError, KeyError, AttributeError) as err:
        raise OverrideError(
            f"{where}: the train command line cannot apply {flag_arguments(overrides)}: "
            f"{type(err).__name__}: {err}"
        ) from err
    if parsed.to_dict() != expected.to_dict():
        differing = [
            key
            for key in sorted(overrides)
            if _get(parsed, key) != _get(expected, key)
            or type(_get(parsed, key)) is not type(_get(expected, key))
        ]
        raise OverrideError(
            f"{where}: on the command line, overrides {differing or sorted(overrides)} give "
            f"{[_get(parsed, key) for key in differing]}, not "
            f"{[_get(expected, key) for key in differing]}"
        )


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part]
    return node
