"""A Cloud TPU queued resource and its TPU VM nodes, and the ``gcloud`` commands that act on them.

A request for ``num_slices`` slices of one accelerator type is one queued resource named
``name``. One slice is one node, given the same name (``--node-id``). Several slices (multislice,
joined over the data-centre network) are ``--node-count`` nodes named ``<name>-0``,
``<name>-1``, ... (``--node-prefix``). Commands on the VMs go to every worker (host) of a node
with ``gcloud compute tpus tpu-vm ssh|scp NODE --worker=all``, one command per node.

Zone and project flags are omitted when not given, and gcloud then uses its configuration
(``compute/zone``, ``core/project``); ``check_location_defaults`` says when that is unset.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Callable

QUEUED_RESOURCES = ("gcloud", "compute", "tpus", "queued-resources")
TPU_VM = ("gcloud", "compute", "tpus", "tpu-vm")

# The TPU software version to create nodes with, per accelerator family: the ones Cloud TPU's
# "TPU software versions" page lists for JAX (Ubuntu with the TPU driver; jax brings libtpu).
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# The size after the dash counts TensorCores (two per chip) for v2-v5p, chips for v5e and v6e.
SLICE_CHIPS = {"v5litepod": (1, 4, 8, 16, 32, 64, 128, 256), "v6e": (1, 4, 8, 16, 32, 64, 128, 256)}
MULTISLICE_FAMILIES = ("v4", "v5litepod", "v5p", "v6e")
# Queued-resource states that will not become ACTIVE by waiting.
FAILED_STATES = frozenset({"FAILED", "SUSPENDING", "SUSPENDED", "DELETING"})

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,48}[a-z0-9])?$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
_PROJECT = re.compile(r"^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$")
_ACCELERATOR = re.compile(r"^(v2|v3|v4|v5litepod|v5p|v6e)-([0-9]+)$")


def parse_accelerator_type(accelerator_type: str) -> tuple[str, int]:
    """``"v5litepod-256"`` -> ``("v5litepod", 256)``; ValueError naming the accepted forms."""
    match = _ACCELERATOR.match(accelerator_type)
    if not match:
        raise ValueError(
            f"accelerator type {accelerator_type!r} is not of the form <family>-<size> with "
            f"family one of {sorted(RUNTIME_VERSIONS)}, e.g. v4-64, v5litepod-256, v5p-128, "
            "v6e-16 (v5e is spelled v5litepod)"
        )
    family, size = match.group(1), int(match.group(2))
    if family in SLICE_CHIPS and size not in SLICE_CHIPS[family]:
        raise ValueError(
            f"accelerator type {accelerator_type!r}: {family} slices have "
            f"{', '.join(map(str, SLICE_CHIPS[family]))} chips"
        )
    if family not in SLICE_CHIPS and (size < 8 or size % 8):
        raise ValueError(
            f"accelerator type {accelerator_type!r}: {family} sizes count TensorCores, a "
            "multiple of 8 (4 chips per host), e.g. v4-8, v4-64"
        )
    return family, size


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuTarget:
    """Where commands go: queued resource ``name`` with ``num_slices`` nodes, zone, project."""

    name: str
    num_slices: int = 1
    zone: str | None = None
    project: str | None = None

    def __post_init__(self):
        if not _NAME.match(self.name):
            raise ValueError(
                f"name {self.name!r}: use 1-50 lowercase letters, digits and hyphens, starting "
                "with a letter (multislice nodes get a -<i> suffix)"
            )
        if self.num_slices < 1:
            raise ValueError(f"num_slices must be >= 1, got {self.num_slices}")
        if self.zone is not None and not _ZONE.match(self.zone):
            raise ValueError(f"zone {self.zone!r} is not a zone name like us-central2-b")
        if self.project is not None and not _PROJECT.match(self.project):
            raise ValueError(f"project {self.project!r} is not a Google Cloud project ID")

    @property
    def node_names(self) -> tuple[str, ...]:
        """The TPU VM nodes: ``name`` for one slice, ``name-0 .. name-<n-1>`` for several."""
        if self.num_slices == 1:
            return (self.name,)
        return tuple(f"{self.name}-{i}" for i in range(self.num_slices))

    @property
    def location_flags(self) -> tuple[str, ...]:
        """``--zone`` / ``--project`` when given (else gcloud's configured defaults apply)."""
        flags = []
        if self.zone:
            flags.append(f"--zone={self.zone}")
        if self.project:
            flags.append(f"--project={self.project}")
        return tuple(flags)


def create_command(
    target: TpuTarget,
    accelerator_type: str,
    *,
    runtime_version: str | None = None,
    spot: bool = False,
) -> tuple[str, ...]:
    """``queued-resources create`` for ``target.num_slices`` slices of ``accelerator_type``."""
    family, _ = parse_accelerator_type(accelerator_type)
    if target.num_slices > 1 and family not in MULTISLICE_FAMILIES:
        raise ValueError(
            f"multislice (num_slices={target.num_slices}) needs a TPU of one of "
            f"{MULTISLICE_FAMILIES}, got {accelerator_type}"
        )
    if target.num_slices == 1:
        nodes = (f"--node-id={target.name}",)
    else:
        nodes = (f"--node-count={target.num_slices}", f"--node-prefix={target.name}")
    return (
        *QUEUED_RESOURCES,
        "create",
        target.name,
        *nodes,
        f"--accelerator-type={accelerator_type}",
        f"--runtime-version={runtime_version or RUNTIME_VERSIONS[family]}",
        *target.location_flags,
        *(("--spot",) if spot else ()),
    )


def state_command(target: TpuTarget) -> tuple[str, ...]:
    """``queued-resources describe`` printing only the state (``ACTIVE``, ``FAILED``, ...)."""
    return (
        *QUEUED_RESOURCES,
        "describe",
        target.name,
        *target.location_flags,
        "--format=value(state.state)",
    )


def delete_command(target: TpuTarget) -> tuple[str, ...]:
    """``queued-resources delete --force``: its nodes first, then the request; no prompt."""
    return (*QUEUED_RESOURCES, "delete", target.name, *target.location_flags, "--force", "--quiet")


def ssh_command(
    target: TpuTarget, node: str, script: str, *, worker: str = "all"
) -> tuple[str, ...]:
    """``tpu-vm ssh`` running shell ``script`` on ``worker`` (default: all hosts) of ``node``."""
    return (
        *TPU_VM,
        "ssh",
        node,
        *target.location_flags,
        f"--worker={worker}",
        f"--command={script}",
    )


def scp_command(target: TpuTarget, node: str, local_path: str, remote_path: str) -> tuple[str, ...]:
    """``tpu-vm scp`` of one local file to ``remote_path`` (relative to home) on every worker."""
    return (
        *TPU_VM,
        "scp",
        local_path,
        f"{node}:{remote_path}",
        *target.location_flags,
        "--worker=all",
    )


def check_location_defaults(
    target: TpuTarget, run: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> None:
    """ValueError when neither a flag nor gcloud's configuration gives the zone or the project.

    Runs ``gcloud config get-value``; call it before executing, not in a dry run.
    """
    for value, prop, flag in (
        (target.zone, "compute/zone", "--zone"),
        (target.project, "core/project", "--project"),
    ):
        if value:
            continue
        done = run(
            ["gcloud", "config", "get-value", prop], check=False, capture_output=True, text=True
        )
        if done.returncode != 0 or not done.stdout.strip():
            raise ValueError(
                f"no {prop.split('/')[1]}: pass {flag}, or set a default with "
                f"`gcloud config set {prop} VALUE`"
            )
