"""Base classes of the builders: a config named by its options, a builder that downloads nothing.

TFDS writes a build to ``<data_dir>/<dataset>/<config name>/<version>`` and reuses that directory
if it exists. A config named after every option that changes the records (``"default"``,
``"max_examples=100"``, ``"num_shots=5-seed=1"``, ``"my_data-max_examples=10"``) keeps a small
test build from being read back as the full dataset. Options that do not change the records (a
source path, an error policy) are declared with ``unnamed(default)`` and left out of the name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, TypeVar

import tensorflow_datasets as tfds

_BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(tfds.core.BuilderConfig))
ConfigT = TypeVar("ConfigT", bound="OptionsConfig")


def unnamed(default: Any) -> Any:
    """A config field whose value is left out of the config name."""
    return dataclasses.field(default=default, metadata={"in_name": False})


@dataclasses.dataclass(eq=False)
class OptionsConfig(tfds.core.BuilderConfig):
    """Base of the builders' configs: ``max_examples`` caps every split (None: everything)."""

    max_examples: int | None = None

    def __post_init__(self):
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(f"max_examples must be >= 1 or None, got {self.max_examples}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keyword options this config accepts."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _BASE_FIELDS)

    @classmethod
    def from_options(cls: type[ConfigT], base_name: str, **options: Any) -> ConfigT:
        """``cls(**options)`` named by the options that differ from their defaults.

        The name is ``base_name`` followed by ``option=value`` for each of them, joined by "-";
        the base name "default" is dropped when options follow it.
        """
        unknown = sorted(set(options) - set(cls.option_names()))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for {cls.__name__}; "
                f"accepted: {list(cls.option_names())}"
            )
        defaults = cls(name=base_name)
        parts = [base_name]
        for field in dataclasses.fields(cls):
            if field.name not in options or not field.metadata.get("in_name", True):
                continue
            if options[field.name] != getattr(defaults, field.name):
                parts.append(f"{field.name}={options[field.name]}")
        if base_name == "default" and len(parts) > 1:
            parts = parts[1:]
        return cls(name="-".join(parts), **options)

    def cap(self, count: int) -> int:
        """``count`` limited to ``max_examples``."""
        return count if self.max_examples is None else min(count, self.max_examples)


class OfflineBuilder(tfds.core.GeneratorBasedBuilder):
    """A generator-based builder whose data comes from local files or installed packages.

    Without a ``config`` it takes ``CONFIG_CLASS``'s defaults (config name "default"), so
    ``tfds.builder(name, data_dir=...)`` and ``tfds.data_source`` find a default build.
    """

    CONFIG_CLASS: ClassVar[type[OptionsConfig]] = OptionsConfig

    # TFDS looks for a download-checksums file next to the builder's code; resolving that path for
    # a class inside an installed package needs the `importlib_resources` backport, which tfds
    # 4.9.10 does not declare. These builders download nothing, so there is no such file.
    code_path = None

    def __init__(self, *, config: OptionsConfig | None = None, **kwargs: Any):
        if config is None:
            config = self.CONFIG_CLASS.from_options("default")
        super().__init__(config=config, **kwargs)
