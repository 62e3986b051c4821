r"""Cloud TPU VMs through gcloud: queue a slice (or several), copy the code, install, train.

  python tools/tpu.py up --name my-run --accelerator_type v5litepod-256 --num_slices 2 \
      --zone us-west4-a --spot --config configs/base.py:size=small --workdir gs://bucket/run \
      --config.mesh.ici_parallelism.data=1 --config.mesh.ici_parallelism.fsdp=-1 --dry_run
  python tools/tpu.py logs --name my-run --num_slices 2 --zone us-west4-a
  python tools/tpu.py stop --name my-run --num_slices 2 --zone us-west4-a
  python tools/tpu.py delete --name my-run --num_slices 2 --zone us-west4-a

Subcommands: create, wait, sync, install, run, logs, stop, delete, and up (= check, create,
wait, sync, install, run). --dry_run prints the exact commands, one a line, and runs nothing;
otherwise they run in order with their output streamed, and the first failure ends the launch
with a message naming the step. Arguments `--config.<field>=<value>` of run/up pass through to
`python -m mllm_jax.train`. See docs/tpu.md.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the library from a checkout without installing it

from mllm_jax.launch import tpu_launch, tpu_vm, worker_scripts  # noqa: E402
from mllm_jax.launch.steps import LaunchError, Step, execute, format_plan  # noqa: E402

SUBCOMMANDS = {
    "create": "queue the TPU slice(s) (a queued resource)",
    "wait": "poll until the queued resource is ACTIVE",
    "sync": "put the code into ~/mllm_jax on every worker",
    "install": "make ~/mllm_jax/.venv with the project and jax[tpu] on every worker",
    "run": "start the trainer in the background on every worker",
    "logs": "print and follow one worker's log",
    "stop": "signal the run (TERM: save a checkpoint and exit)",
    "delete": "delete the queued resource and its nodes",
    "up": "check + create + wait + sync + install + run",
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument("--name", required=True, help="queued resource (and node) name")
    common.add_argument("--num_slices", type=int, default=1, help="slices (nodes) of the request")
    common.add_argument("--zone", help="e.g. us-west4-a (default: gcloud's compute/zone)")
    common.add_argument("--project", help="default: gcloud's core/project")
    common.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")

    create = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    create.add_argument("--accelerator_type", required=True, help="e.g. v4-64, v5litepod-256")
    create.add_argument("--runtime_version", help="default: the JAX image of the TPU family")
    create.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    wait = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    wait.add_argument("--timeout_minutes", type=float, default=120.0)
    wait.add_argument("--poll_seconds", type=float, default=30.0)
    sync = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    sync.add_argument("--sync", choices=("archive", "git"), default="archive",
                      help="archive: git archive of --ref; git: workers fetch --ref")  # fmt: skip
    sync.add_argument("--ref", default="HEAD", help="git revision to ship or fetch")
    sync.add_argument("--git_remote", help="repository URL the workers fetch from (--sync=git)")
    install = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    install.add_argument("--python", default="python3.11", help="interpreter for the venv")
    run = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    run.add_argument("--config", required=True, help="config path[:arg], relative to the repo")
    run.add_argument("--workdir", required=True, help="where the run writes, e.g. gs://b/run")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="extra environment of the trainer (repeatable)")  # fmt: skip

    parents = {
        "create": [create],
        "wait": [wait],
        "sync": [sync],
        "install": [install],
        "run": [run],
        "logs": [],
        "stop": [],
        "delete": [],
        "up": [create, wait, sync, install, run],
    }
    parser = argparse.ArgumentParser(
        prog="tools/tpu.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, summary in SUBCOMMANDS.items():
        sub = commands.add_parser(
            name, parents=[common, *parents[name]], allow_abbrev=False, help=summary
        )
        if name == "logs":
            sub.add_argument("--node", type=int, default=0, help="slice index")
            sub.add_argument("--worker", type=int, default=0, help="host index in the slice")
            sub.add_argument("--lines", type=int, default=100)
            sub.add_argument("--no_follow", action="store_true", help="print and return")
        if name == "stop":
            sub.add_argument("--signal", choices=("TERM", "KILL"), default="TERM",
                             help="TERM: the trainer saves a checkpoint, then exits")  # fmt: skip
    return parser


def _target(args: argparse.Namespace) -> tpu_vm.TpuTarget:
    return tpu_vm.TpuTarget(
        name=args.name, num_slices=args.num_slices, zone=args.zone, project=args.project
    )


def _train_run(args: argparse.Namespace, overrides: list[str]) -> worker_scripts.TrainRun:
    run = worker_scripts.TrainRun(
        config=args.config,
        workdir=args.workdir,
        overrides=tuple(overrides),
        env=worker_scripts.parse_env(args.env),
    )
    worker_scripts.validate_train_run(run, REPO)
    return run


def build_steps(args: argparse.Namespace, overrides: list[str]) -> list[Step]:
    """The steps of ``args.command``; ValueError on invalid input (before anything runs)."""
    target = _target(args)
    command = args.command
    if command == "create":
        return [tpu_launch.create_step(target, args.accelerator_type,
                                       runtime_version=args.runtime_version,
                                       spot=args.spot)]  # fmt: skip
    if command == "wait":
        return [tpu_launch.wait_step(target, timeout_minutes=args.timeout_minutes,
                                     poll_seconds=args.poll_seconds)]  # fmt: skip
    if command == "sync":
        source = tpu_launch.CodeSource(kind=args.sync, ref=args.ref, remote=args.git_remote)
        return [tpu_launch.sync_step(target, source, REPO)]
    if command == "install":
        return [tpu_launch.install_step(target, python=args.python)]
    if command == "run":
        return [tpu_launch.run_step(target, _train_run(args, overrides))]
    if command == "logs":
        return [tpu_launch.logs_step(target, node=args.node, worker=args.worker,
                                     lines=args.lines, follow=not args.no_follow)]  # fmt: skip
    if command == "stop":
        return [tpu_launch.stop_step(target, signal=args.signal)]
    if command == "delete":
        return [tpu_launch.delete_step(target)]
    return tpu_launch.up_steps(
        target,
        accelerator_type=args.accelerator_type,
        runtime_version=args.runtime_version,
        spot=args.spot,
        timeout_minutes=args.timeout_minutes,
        poll_seconds=args.poll_seconds,
        source=tpu_launch.CodeSource(kind=args.sync, ref=args.ref, remote=args.git_remote),
        repo_root=REPO,
        python=args.python,
        run=_train_run(args, overrides),
    )


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, then prints (``--dry_run``) or executes the steps; the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("run", "up"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        steps = build_steps(args, extra)
        if args.dry_run:
            print(format_plan(steps), flush=True)
            return 0
        if shutil.which("gcloud") is None:
            raise LaunchError("gcloud is not on PATH: install the Google Cloud CLI")
        tpu_vm.check_location_defaults(_target(args))
        execute(steps)
    except (ValueError, LaunchError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
