"""Running an absl ``main`` as an installed command (``[project.scripts]`` in pyproject.toml)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app, flags


def run_command(main: Callable[[Sequence[str]], None]) -> None:
    """``app.run(main)``, with ``--help`` showing ``main``'s module docstring and flags.

    absl's ``--help`` prints the running script's docstring and the flags defined in it. A
    console-script wrapper (``mllm-train``) or ``tools/`` wrapper only imports the module that
    defines them, so that module's flags are listed under the script too, and its docstring
    stands in for a wrapper that has none. (absl exits with status 1 after ``--help``.)
    """
    module = sys.modules[main.__module__]
    if module.__name__ != "__main__":
        for flag in flags.FLAGS.get_flags_for_module(module.__name__):
            flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
        script = sys.modules["__main__"]
        if not script.__doc__:
            script.__doc__ = module.__doc__
    app.run(main)
