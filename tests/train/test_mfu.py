"""MFU: peak FLOP/s table lookup on device_kind, per-host CPU peaks, utilization arithmetic."""

from types import SimpleNamespace

import jax
import pytest

from mllm_jax.train.mfu import model_flops_utilization, peak_flops_per_device, total_peak_flops


def _device(kind, platform="gpu", process_index=0):
    return SimpleNamespace(device_kind=kind, platform=platform, process_index=process_index)


@pytest.mark.parametrize(
    "kind, platform, peak",
    [
        ("TPU v4", "tpu", 275e12),
        ("TPU v5 lite", "tpu", 197e12),
        ("TPU v5e", "tpu", 197e12),
        ("TPU v5", "tpu", 459e12),
        ("TPU v5p", "tpu", 459e12),
        ("TPU v6 lite", "tpu", 918e12),
        ("NVIDIA A100-SXM4-40GB", "gpu", 312e12),
        ("NVIDIA A100 80GB PCIe", "gpu", 312e12),
        ("NVIDIA H100 80GB HBM3", "gpu", 989e12),
        ("NVIDIA H100 PCIe", "gpu", 756e12),
        ("NVIDIA H100 NVL", "gpu", 835e12),
        ("NVIDIA H200", "gpu", 989e12),
        ("NVIDIA H200 NVL", "gpu", 835e12),
    ],
)
def test_table_peak_by_device_kind(kind, platform, peak):
    assert peak_flops_per_device(_device(kind, platform)) == peak


@pytest.mark.parametrize("kind", ["TPU v4 lite", "TPU v7x", "NVIDIA L4", "NVIDIA A10G"])
def test_kinds_outside_the_table_are_not_matched_by_prefix(kind):
    with pytest.raises(ValueError, match=f"device kind '{kind}'"):
        peak_flops_per_device(_device(kind))


def test_configured_peak_overrides_the_table_and_is_required_on_cpu():
    assert peak_flops_per_device(_device("NVIDIA H100 80GB HBM3"), 1e15) == 1e15
    assert peak_flops_per_device(_device("NVIDIA L4"), 121e12) == 121e12
    cpu = jax.devices("cpu")[0]
    assert peak_flops_per_device(cpu, 70e9) == 70e9
    with pytest.raises(ValueError, match=r"device kind 'cpu' \(platform 'cpu'\)"):
        peak_flops_per_device(cpu, None)
    with pytest.raises(ValueError, match="must be positive"):
        peak_flops_per_device(cpu, 0.0)


def test_total_peak_multiplies_accelerator_peaks_by_devices():
    devices = [_device("TPU v5 lite", "tpu", process_index=i // 4) for i in range(8)]
    assert total_peak_flops(devices) == pytest.approx(8 * 197e12)
    gpus = [_device("NVIDIA L4") for _ in range(2)]
    assert total_peak_flops(gpus, configured_device_peak=121e12) == pytest.approx(242e12)


def test_total_cpu_peak_is_per_host_not_per_fake_device(devices):
    # The 8 fake CPU devices of the test process are one host.
    assert total_peak_flops(devices, 140e9) == 140e9
    two_hosts = [_device("cpu", "cpu", process_index=i % 2) for i in range(4)]
    assert total_peak_flops(two_hosts, 140e9) == 280e9
    with pytest.raises(ValueError, match="device kind 'cpu'"):
        total_peak_flops(devices)


def test_total_peak_rejects_no_devices_and_mixed_platforms():
    with pytest.raises(ValueError, match="at least one device"):
        total_peak_flops([])
    with pytest.raises(ValueError, match="several platforms"):
        total_peak_flops([_device("cpu", "cpu"), _device("TPU v4", "tpu")], 140e9)


def test_utilization_is_model_flops_per_second_over_peak():
    # A 1M-parameter dense decoder on 1000 tokens: 6 * N * T = 6e9 FLOPs per step.
    flops_per_step = 6 * 1_000_000 * 1000
    assert model_flops_utilization(flops_per_step, 0.1, 140e9) == pytest.approx(6e10 / 140e9)
    assert model_flops_utilization(989e12, 2.0, 989e12) == pytest.approx(0.5)
    assert model_flops_utilization(0, 1.0, 1e12) == 0.0


@pytest.mark.parametrize(
    "args, match",
    [
        ((1e9, 0.0, 1e12), "step_seconds"),
        ((1e9, 1.0, 0.0), "peak_flops_total"),
        ((-1, 1, 1), "flops_per_step"),
    ],
)
def test_utilization_rejects_non_positive_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        model_flops_utilization(*args)
