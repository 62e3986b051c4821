"""Reading a JSON file so that a malformed one is named, with the line and column to fix."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``.

    Raises:
      FileNotFoundError: ``path`` does not exist (the OS error names it).
      ValueError: ``"<path>:<line>:<column>: not valid JSON (<problem>)"``, or the file is not
        UTF-8 text.
    """
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
