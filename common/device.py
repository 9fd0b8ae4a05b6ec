"""Device and precision choice: CUDA > MPS > CPU, with guards for bf16 and 4-bit."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import torch

from common.errors import ConfigError


def pick_device(requested: str = "auto") -> torch.device:
    """Return the device a user asked for, or the best one present for ``auto``."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ConfigError("--device", f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError("--device", f"unsupported device {requested!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device", f"{requested!r} asked for but no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError("--device", f"{requested!r} asked for but only {torch.cuda.device_count()} CUDA "
                                          "device(s) are visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device", "'mps' asked for but this machine has no usable MPS device")
    return device


def bf16_supported(device: torch.device) -> bool:
    """bf16 weights and compute are native on Ampere+ GPUs (used for frozen weights and 4-bit compute)."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """True on CPUs with AMX-BF16 tiles (Intel Sapphire Rapids and later, Linux), where oneDNN runs bf16
    convolutions and matmuls in hardware: measured 1.65 times the fp32 speed for a ResNet-18
    (``benchmarks/train_speed.py``). Elsewhere bf16 on a CPU is emulated and slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and "amx_bf16" in line.split() for line in flags.splitlines())


def mixed_precision(requested: str, device: torch.device, cpu_bf16: bool = False) -> str:
    """Map ``--precision auto|fp32|bf16|fp16`` to Accelerate's ``mixed_precision`` value.

    ``auto`` autocasts to bf16 on Ampere+ GPUs and to fp16 on older ones. On a CPU it stays fp32 unless the caller's
    model gains from bf16 (``cpu_bf16``: a ResNet-18, 1.65 times faster) and the CPU computes bf16 natively
    (AMX-BF16); the tiny transformers of the other pipelines run about 1.7 times slower in bf16 on the same CPU.
    Weights and optimizer state stay fp32 in every case."""
    if requested == "auto":
        if device.type == "cpu":
            return "bf16" if cpu_bf16 and cpu_has_amx_bf16() else "no"
        if device.type != "cuda":
            return "no"
        return "bf16" if bf16_supported(device) else "fp16"
    mapping = {"fp32": "no", "no": "no", "bf16": "bf16", "fp16": "fp16"}
    if requested not in mapping:
        raise ConfigError("--precision", f"unknown precision {requested!r}; choose auto, fp32, bf16 or fp16")
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("--precision", "fp16 autocast needs a CUDA device; use fp32 or bf16 on CPU")
    return mapping[requested]


def compute_dtype(device: torch.device) -> torch.dtype:
    """Dtype for frozen weights and 4-bit compute: bf16 where the hardware has it, else fp16 on GPU, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if bf16_supported(device) else torch.float16
    return torch.float32


def check_bitsandbytes(flag: str = "--quantization") -> None:
    """Raise one clear line when bitsandbytes cannot run here, instead of a CUDA traceback later."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(flag, "4-bit/8-bit loading needs bitsandbytes (pip install bitsandbytes), or pass none")
    try:
        import bitsandbytes  # noqa: F401
        from bitsandbytes.functional import quantize_4bit  # noqa: F401
    except Exception as err:  # bitsandbytes raises many types when its native library is missing
        raise ConfigError(flag, f"bitsandbytes cannot run on this machine ({type(err).__name__}: {err}); "
                                "pass --quantization none") from err
