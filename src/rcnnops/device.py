"""Which device a stage computes on, and how a run records it."""

from __future__ import annotations

import os
import platform

import torch

from rcnnops.errors import UserError


class DeviceError(UserError, RuntimeError):
    """A device was named that this machine does not have."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as named
    (a CUDA name on a machine without CUDA is an error, not a silent CPU run).

    Under a GPU lease (``CUDA_VISIBLE_DEVICES`` set by the flow, see
    :mod:`pipelines.slots`) ``cuda`` is the first leased GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device is {name!r} but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are "
                f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            )
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tags(device: torch.device, precision: str) -> dict[str, str]:
    """What a training ran on, as MLflow tags: the device, its name, the GPUs
    this process was given (``CUDA_VISIBLE_DEVICES``, the flow's lease) and the
    autocast precision."""
    tags = {"device": str(device), "device_name": device_name(device), "precision": precision}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        tags["cuda_visible_devices"] = visible
    return tags
