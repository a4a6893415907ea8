"""Mixed precision: which autocast dtype a training uses, and whether it scales the loss.

``train.<variant>.amp`` takes:

* ``auto``: fp16 autocast + GradScaler on CUDA; bf16 autocast on a CPU whose flags
  show AMX-BF16 or AVX512-BF16 (hardware bf16 matrix units: about 6x the fp32
  GEMM rate on such a CPU); fp32 on any other CPU;
* ``cuda``: fp16 autocast + GradScaler on CUDA, fp32 on a CPU (what ``true``,
  the older boolean, meant);
* ``fp16``: fp16 autocast + GradScaler (CUDA only: an error on a CPU);
* ``bf16``: bf16 autocast, no loss scaling (bf16 has fp32's exponent range);
  on a CPU without bf16 instructions PyTorch emulates it, slower than fp32;
* ``fp32`` (or ``false``): no autocast.

Weights, gradients and optimizer state stay fp32 ("master weights"); autocast
only runs matrix multiplies and convolutions in the low dtype. The ops that must
stay fp32 stay there by construction (see :mod:`rcnnops.models.fp32`): the RoI
ops' sampling grids, the heads' outputs (so box decoding, NMS and the losses see
fp32 numbers).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from rcnnops.errors import UserError

AMP_CHOICES = ("auto", "cuda", "bf16", "fp16", "fp32")
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(UserError, ValueError):
    """An ``amp`` setting this device cannot run."""


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The first CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_bf16(flags: frozenset[str] | set[str]) -> bool:
    """Hardware bf16 matrix instructions (AMX tiles or AVX512-BF16 dot products)."""
    return any(f in flags for f in BF16_CPU_FLAGS)


@dataclass(frozen=True)
class Precision:
    """The resolved setting: ``name`` (``fp32``, ``bf16`` or ``fp16``) on ``device_type``."""

    name: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.name)

    @property
    def enabled(self) -> bool:
        return self.name != "fp32"

    @property
    def scales_loss(self) -> bool:
        """fp16 needs loss scaling (its exponent range is narrow); bf16 does not."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_amp(
    setting: str | bool, device: torch.device, flags: frozenset[str] | set[str] | None = None
) -> Precision:
    """The precision ``setting`` means on ``device`` (``flags``: the CPU's, read
    from ``/proc/cpuinfo`` when None). See the module docstring."""
    kind = device.type
    if setting is True or setting == "cuda":
        return Precision("fp16" if kind == "cuda" else "fp32", kind)
    if setting is False or setting == "fp32":
        return Precision("fp32", kind)
    if setting == "auto":
        if kind == "cuda":
            return Precision("fp16", kind)
        if kind == "cpu" and cpu_has_bf16(cpu_flags() if flags is None else flags):
            return Precision("bf16", kind)
        return Precision("fp32", kind)
    if setting == "fp16":
        if kind != "cuda":
            raise PrecisionError(
                f"amp: fp16 needs CUDA, and this training runs on {device}; "
                "use amp: auto (bf16 on CPUs that have it) or bf16"
            )
        return Precision("fp16", kind)
    if setting == "bf16":
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise PrecisionError(f"amp: bf16: {device} has no bf16 support; use fp16 or auto")
        return Precision("bf16", kind)
    raise PrecisionError(f"amp: one of {', '.join(AMP_CHOICES)}, true or false; got {setting!r}")
