"""Launching training runs on Cloud TPU VMs through ``gcloud`` (``tools/tpu.py``, docs/tpu.md).

The modules build command lists and shell text as pure functions, so that a dry run prints
exactly what a real one executes:

  tpu_vm.py          the queued resource and its nodes, and the ``gcloud`` commands on them
  worker_scripts.py  the shell run on every TPU VM worker: unpack, install, start, stop, tail
  tpu_launch.py      the launcher's subcommands as ordered steps (create ... up)
  steps.py           steps of commands, printed (dry run) or executed with a named failure
"""
