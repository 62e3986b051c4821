"""Model FLOPs utilization: achieved model FLOP/s over the hardware's dense bf16 peak.

Per-device peaks come from a table matched on ``jax.Device.device_kind``. How the whole job's peak
is assembled depends on what a device is:

- Accelerators: one JAX device is one TPU chip (v4 and v5p run both TensorCores of a chip as one
  megacore device) or one GPU, so ``peak_total = peak_per_device * num_devices``.
- CPU: the configured peak is per host (the whole machine), and it must not be multiplied by the
  number of devices XLA splits the host into (``--xla_force_host_platform_device_count``), so
  ``peak_total = configured_host_peak * num_hosts``.

``total_peak_flops`` does that combination.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol


class DeviceLike(Protocol):
    """The attributes of ``jax.Device`` used here."""

    platform: str
    device_kind: str
    process_index: int


# Dense (no structured sparsity) bf16 peak FLOP/s per device, from the vendors' spec sheets:
# Cloud TPU system-architecture pages per chip; NVIDIA datasheets halve their "with sparsity"
# figures. Patterns are full matches on device_kind, ignoring case; the first match wins, so the
# specific GPU variants come before their family.
PEAK_BF16_FLOPS_PER_DEVICE: tuple[tuple[str, float], ...] = (
    (r"TPU v4", 275e12),
    (r"TPU v5 lite|TPU v5e", 197e12),
    (r"TPU v5p?", 459e12),
    (r"TPU v6 lite|TPU v6e", 918e12),
    (r"(NVIDIA )?A100\b.*", 312e12),
    (r"(NVIDIA )?H100\b.*PCIe.*", 756e12),
    (r"(NVIDIA )?H100\b.*NVL.*", 835e12),
    (r"(NVIDIA )?H100\b.*", 989e12),
    (r"(NVIDIA )?H200\b.*NVL.*", 835e12),
    (r"(NVIDIA )?H200\b.*", 989e12),
)


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def peak_flops_per_device(device: DeviceLike, configured: float | None = None) -> float:
    """Dense bf16 peak FLOP/s of one ``device``: ``configured`` if given, else the table's.

    Raises ``ValueError`` naming the device kind when it is not in the table (CPU included) and
    no ``configured`` value is given.
    """
    if configured is not None:
        return _positive("configured peak FLOP/s", configured)
    for pattern, flops in PEAK_BF16_FLOPS_PER_DEVICE:
        if re.fullmatch(pattern, device.device_kind, flags=re.IGNORECASE):
            return flops
    raise ValueError(
        f"no peak FLOP/s known for device kind {device.device_kind!r} "
        f"(platform {device.platform!r}); configure the peak FLOP/s explicitly"
    )


def total_peak_flops(
    devices: Sequence[DeviceLike],
    configured_cpu_host_peak: float | None = None,
    *,
    configured_device_peak: float | None = None,
) -> float:
    """Peak FLOP/s of the whole job on ``devices`` (all of them, across hosts).

    On CPU: ``configured_cpu_host_peak`` times the number of hosts (distinct process indices).
    On accelerators: the sum of ``peak_flops_per_device`` over the devices, where
    ``configured_device_peak`` overrides the table (needed for kinds it lacks).
    """
    if not devices:
        raise ValueError("total_peak_flops needs at least one device")
    platforms = sorted({device.platform for device in devices})
    if len(platforms) > 1:
        raise ValueError(f"devices of several platforms {platforms}; pass one platform's devices")
    if platforms[0] == "cpu":
        if configured_cpu_host_peak is None:
            raise ValueError(
                "no peak FLOP/s known for device kind 'cpu'; configure the per-host CPU peak"
            )
        num_hosts = len({device.process_index for device in devices})
        return _positive("configured CPU host peak FLOP/s", configured_cpu_host_peak) * num_hosts
    return sum(peak_flops_per_device(device, configured_device_peak) for device in devices)


def model_flops_utilization(
    flops_per_step: float, step_seconds: float, peak_flops_total: float
) -> float:
    """Fraction of ``peak_flops_total`` achieved: ``flops_per_step / step_seconds / peak``.

    ``flops_per_step`` counts the model's FLOPs of one step over the whole global batch (e.g.
    ``6 * params * tokens`` for a dense decoder's forward and backward), not rematerialized work.
    """
    if flops_per_step < 0:
        raise ValueError(f"flops_per_step must be non-negative, got {flops_per_step}")
    step_seconds = _positive("step_seconds", step_seconds)
    return flops_per_step / step_seconds / _positive("peak_flops_total", peak_flops_total)
