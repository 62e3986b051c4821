r"""Runs a training command as several jax.distributed processes on this machine (CPU).

  python tools/launch_local.py --num_processes 2 --devices_per_process 4 -- \
      --config configs/base.py:size=test --workdir runs/two_processes

Everything after ``--`` goes to ``python -m mllm_jax.train``; each process gets
``--coordinator_address/--num_processes/--process_id`` (and ``--config.mesh.num_cpu_devices``
with --devices_per_process). Output lines carry a ``[p<i>]`` prefix; SIGTERM / Ctrl-C reach every
process (they save at one agreed step and exit). Exit status: the first failing process's.
See docs/tpu.md ("Several processes on one machine").
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the library from a checkout without installing it

from mllm_jax.launch.local_processes import run_local  # noqa: E402


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: launch_local.py [options] -- <mllm_jax.train arguments>", file=sys.stderr)
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument(
        "--devices_per_process", type=int, default=None, help="CPU devices each process has"
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    args = parser.parse_args(argv[:split])
    try:
        return run_local(
            argv[split + 1 :],
            args.num_processes,
            devices_per_process=args.devices_per_process,
            port=args.port,
        )
    except ValueError as err:
        print(f"launch_local.py: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
