"""Stand-in for ``python -m mllm_jax.train`` in the runner tests: no JAX, instant.

Writes ``results.json`` (``loss`` = 1 + seed, a nested metric, the SWEEP_TEST_MARKER variable of
its environment) to ``--workdir`` and appends the workdir's name to ``../launches.txt``; with
``--config.seed=13`` it prints a message and exits with status 3 instead.
"""

import json
import os
import pathlib
import sys


def main(argv: list[str]) -> int:
    values = dict(
        arg[2:].split("=", 1) for arg in argv if arg.startswith("--config.") and "=" in arg
    )
    workdir = pathlib.Path(argv[argv.index("--workdir") + 1])
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir.parent / "launches.txt").open("a") as launches:
        launches.write(workdir.name + "\n")
    seed = int(values.get("config.seed", 0))
    if seed == 13:
        print("fake failure: unlucky seed", flush=True)
        return 3
    results = {
        "loss": 1.0 + seed,
        "eval": {"accuracy": 0.5},
        "marker": os.environ.get("SWEEP_TEST_MARKER", ""),
    }
    (workdir / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
