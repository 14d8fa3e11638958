"""Where a site's nets run: the `device` setting (`auto` | `cpu` | `cuda` | `cuda:N`) and its mixed precision.

One resolver for every caller (the ClientApp's run/node config, `fedliver train --device`,
`fedliver predict --device`, the benchmarks), so that a site asking for a GPU it does not have
fails before any work with one line saying so, instead of a CUDA traceback mid-round.
"""

from __future__ import annotations

import re

import torch

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
AUTOCAST_CHOICES = ("auto", "off", "fp16", "bf16")

_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device | None = "auto", *, gpu_count: int | None = None) -> torch.device:
    """`auto` (a CUDA GPU when there is one, else the CPU), `cpu`, `cuda` or `cuda:N` -> a torch.device.

    gpu_count: the CUDA GPUs to check against (default: `torch.cuda.device_count()`, 0 without
    CUDA). Raises ValueError with one line for a bad spec or a GPU this machine does not have.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    match = _SPEC.match(text)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise ValueError(f"device {str(spec)!r} is not one of {DEVICE_CHOICES}")
    count = cuda_device_count() if gpu_count is None else int(gpu_count)
    kind, index = match.group(1), match.group(2)
    if kind == "cpu" or (kind == "auto" and count == 0):
        return torch.device("cpu")
    if count == 0:
        raise ValueError(f"device {text!r} requested but no CUDA GPU is available on this machine")
    if index is None:
        return torch.device("cuda")
    if int(index) >= count:
        raise ValueError(f"device {text!r} requested but this machine has {count} CUDA GPU(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return torch.device("cuda", int(index))


def cuda_device_count() -> int:
    # A CPU-only torch build, or a driver that cannot be loaded: no GPU, not an error here.
    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The dtype `torch.autocast` runs the forward and loss in, or None for full float32.

    auto: float16 on CUDA (nnU-Net's mixed precision, with a GradScaler), off on the CPU (the
    deterministic float32 path); fp16 / bf16: that dtype on any device (bf16 lets the CPU run the
    mixed-precision path; fp16 autocast on the CPU is slow and only for checks); off: float32.
    """
    if mode not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)}, got {mode!r}")
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else None
    return {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]


def describe(device: torch.device) -> str:
    """`cuda:0 (NVIDIA H200, 139.8 GiB)` or `cpu`, for a log line."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    return f"cuda:{index} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"


__all__ = ["DEVICE_CHOICES", "AUTOCAST_CHOICES", "resolve_device", "cuda_device_count", "autocast_dtype", "describe"]
