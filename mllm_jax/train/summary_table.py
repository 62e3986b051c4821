"""Plain-text tables for run summaries and experiment results, rendered by ``rich`` for logs.

    name      step    loss  accuracy
    --------------------------------
    baseline  1000  2.3457
    lora       200  1.5000    0.2500

Numeric columns are right-aligned, others left-aligned; ints print as ints, floats with
``float_format``, missing cells and ``None`` as blanks. The text has no colour or markup, and its
lines carry no trailing spaces.
"""

from __future__ import annotations

import io
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from rich.box import Box
from rich.console import Console
from rich.table import Table

# No edges and no lines but a rule under the header; columns two spaces apart (see _table).
_RULE_UNDER_HEADER = Box("    \n    \n----\n    \n    \n    \n    \n    \n", ascii=True)
# Tables are never wrapped: rich would otherwise fit them into 80 columns.
_UNLIMITED_WIDTH = 10_000


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


def _table(header: Sequence[str], right_aligned: Sequence[bool]) -> Table:
    # A one-space column divider plus one space of left padding (none on the first column).
    table = Table(box=_RULE_UNDER_HEADER, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    for name, right in zip(header, right_aligned, strict=True):
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    return table


def _render(table: Table) -> str:
    console = Console(
        file=io.StringIO(),
        width=_UNLIMITED_WIDTH,
        color_system=None,
        markup=False,
        emoji=False,
        highlight=False,
    )
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


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
    right_aligned = []
    for column in columns:
        present = [row[column] for row in rows if row.get(column) is not None]
        right_aligned.append(bool(present) and all(_is_number(value) for value in present))
    table = _table(columns, right_aligned)
    for row in rows:
        table.add_row(*(format_cell(row.get(column), float_format) for column in columns))
    return _render(table)


def format_key_values(mapping: Mapping[str, Any], title: str, *, float_format: str = ".4f") -> str:
    """``title``, a rule, then one ``key  value`` line per item with the values in one column."""
    table = _table([title, ""], [False, False])
    for key, value in mapping.items():
        table.add_row(key, format_cell(value, float_format))
    return _render(table)
