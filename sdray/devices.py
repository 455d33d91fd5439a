"""Device placement: tensors follow the module that consumes them.

Every path that feeds a module (validation, calibration, evaluation, index and query encoding,
featurisation) asks the module where it lives with :func:`module_device` and moves its inputs
there, instead of assuming the CPU or re-deciding "cuda if available" on its own; results come
back to the host with :func:`to_host` only where NumPy or a CPU-only library takes over.
:func:`backbone_autocast` is the fp16 autocast of a frozen backbone on CUDA (a no-op elsewhere).
"""

from __future__ import annotations

import contextlib

import torch


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def to_module_device(x, module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (array or tensor) as a tensor on ``module``'s device (and ``dtype`` if given)."""
    t = torch.as_tensor(x)
    return t.to(device=module_device(module), dtype=dtype or t.dtype, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU (a no-op when it is there already)."""
    return t.cpu()


def backbone_autocast(device: torch.device, enabled: bool = True):
    """fp16 autocast for a frozen backbone's forward on CUDA; a null context elsewhere.

    fp16 (not bf16) is what the official recipe trains with (DESIGN.md §1); features are cast
    back to float32 by the callers before anything numerical is done with them.
    """
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def resolve_device(use_gpu: bool | None) -> torch.device:
    """``cuda`` (the current device) when ``use_gpu`` is true and one is visible, else CPU.

    ``use_gpu=None`` means "when present". Asking for a GPU that is not there raises, so a
    misconfigured GPU job fails at start instead of silently running on the CPU.
    """
    available = torch.cuda.is_available()
    if use_gpu and not available:
        raise RuntimeError("--use-gpu was given but torch sees no CUDA device")
    if (use_gpu is None and available) or use_gpu:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
