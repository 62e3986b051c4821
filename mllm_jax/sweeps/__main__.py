"""Command line: run a named sweep point by point, then write its tables and plot.

  python -m mllm_jax.sweeps --sweep experiments/lm_sweeps.py:learning_rates \
      --workdir runs/sweeps/learning_rates

  --dry_run           print the train command of every point without results, run nothing
  --keep_going        go on after a failed point (default: stop at the first failure)
  --echo              also print the jobs' output (it always goes to <point>/train.log)
  --metrics=a,b/*     table columns (fnmatch patterns; default: the sweep's, else all numeric)
  --plot_metrics=a    bar charts (default: the sweep's, else the table's)
  --launcher="..."    what runs a point (default: this Python with -m mllm_jax.train)

Exits with status 1 when a point failed; its row in the tables says how.
"""

import shlex
import sys

from absl import app, flags, logging

from mllm_jax.command_line import run_command
from mllm_jax.sweeps.aggregate import aggregate, collect_results, select_metrics
from mllm_jax.sweeps.definition import load_sweep
from mllm_jax.sweeps.overrides import OverrideError
from mllm_jax.sweeps.report import aggregated_table, write_report
from mllm_jax.sweeps.runner import TRAIN_LAUNCHER, pending_commands, plan_sweep, run_sweep

FLAGS = flags.FLAGS
flags.DEFINE_string("sweep", None, "FILE:NAME of a sweep function, e.g. experiments/x.py:lrs.")
flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory per point, the tables.")
flags.DEFINE_bool("dry_run", False, "Print the commands of the points to run; run nothing.")
flags.DEFINE_bool("keep_going", False, "Run the remaining points after a failure.")
flags.DEFINE_bool("echo", False, "Also print every job's output to stdout.")
flags.DEFINE_list("metrics", None, "Metric patterns for the tables (default: the sweep's).")
flags.DEFINE_list("plot_metrics", None, "Metric patterns to plot (default: the sweep's).")
flags.DEFINE_string("launcher", shlex.join(TRAIN_LAUNCHER), "Command prefix that trains a point.")
flags.mark_flags_as_required(["sweep", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        sweep = load_sweep(FLAGS.sweep)
        planned = plan_sweep(sweep, FLAGS.workdir, shlex.split(FLAGS.launcher))
    except (OverrideError, OSError, ValueError, TypeError) as err:
        sys.exit(f"error: {err}")
    pending = pending_commands(planned)
    if FLAGS.dry_run:
        for command in pending:
            print(command)
        logging.info("%d of %d points to run", len(pending), len(planned))
        return

    statuses = run_sweep(planned, keep_going=FLAGS.keep_going, echo=FLAGS.echo)
    rows = collect_results(planned)
    metrics = select_metrics(rows, FLAGS.metrics or sweep.metrics)
    plot_patterns = FLAGS.plot_metrics or sweep.plot_metrics
    plot_metrics = select_metrics(rows, plot_patterns) if plot_patterns else metrics
    groups = aggregate(rows, metrics, sweep.seed_keys)
    command = shlex.join(["python", "-m", "mllm_jax.sweeps", *sys.argv[1:]])
    written = write_report(
        rows,
        groups,
        FLAGS.workdir,
        metrics=metrics,
        plot_metrics=plot_metrics,
        title=f"Sweep {FLAGS.sweep}",
        command=command,
    )
    print(aggregated_table(groups, metrics))
    logging.info("wrote %s", ", ".join(str(path) for path in written))
    failed = [name for name, status in statuses.items() if status.startswith("failed")]
    if failed:
        sys.exit(f"{len(failed)} of {len(planned)} points failed: {failed}")


def run() -> None:
    """The ``mllm-sweep`` command."""
    run_command(main)


if __name__ == "__main__":
    run()
