"""Plain-text tables for run summaries and experiment results, aligned for logs and terminals.

    name      step    loss  accuracy
    --------  ----  ------  --------
    baseline  1000  2.3457
    lora       200  1.5000    0.2500

Numeric columns are right-aligned, others left-aligned; ints print as ints, floats with
``float_format``, missing cells and ``None`` as blanks. Lines carry no trailing spaces.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

_GAP = "  "


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def format_cell(value: Any, float_format: str = ".4f") -> str:
    """One cell's text: blank for None, ints as ints, other reals with ``float_format``."""
    if value is None:
        return ""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return format(float(value), float_format)
    return str(value)


def format_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
    *,
    float_format: str = ".4f",
) -> str:
    """``rows`` as a table with a header and a rule; ``columns`` default to all keys, first seen
    first. Returns the lines joined by newlines, without a trailing newline."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""
    cells = [[format_cell(row.get(column), float_format) for column in columns] for row in rows]
    widths = [
        max([len(column)] + [len(row[index]) for row in cells])
        for index, column in enumerate(columns)
    ]
    right_aligned = []
    for column in columns:
        present = [row[column] for row in rows if row.get(column) is not None]
        right_aligned.append(bool(present) and all(_is_number(value) for value in present))

    def line(texts: Sequence[str]) -> str:
        padded = (
            text.rjust(width) if right else text.ljust(width)
            for text, width, right in zip(texts, widths, right_aligned, strict=True)
        )
        return _GAP.join(padded).rstrip()

    lines = [line(columns), line(["-" * width for width in widths])]
    lines.extend(line(row) for row in cells)
    return "\n".join(lines)


def format_key_values(mapping: Mapping[str, Any], title: str, *, float_format: str = ".4f") -> str:
    """``title``, a rule, then one ``key  value`` line per item with the values in one column."""
    key_width = max((len(key) for key in mapping), default=0)
    body = [
        f"{key.ljust(key_width)}{_GAP}{format_cell(value, float_format)}".rstrip()
        for key, value in mapping.items()
    ]
    rule = "-" * max([len(title)] + [len(text) for text in body])
    return "\n".join([title, rule, *body])
