"""A stand-in accelerator for CPU-only machines: modules on PyTorch's ``meta`` device.

A ``meta`` tensor has a shape and a dtype but no data, and PyTorch refuses to mix it with CPU
tensors in one op (``Tensor on device meta is not on the expected device cpu!``) exactly as it
refuses to mix CUDA and CPU tensors. Putting a module on ``meta`` therefore reproduces every
"input left on the CPU while the module is on the GPU" bug on a machine without a GPU.

Data cannot be read back from ``meta``, so inside :class:`MetaHost` a copy of a ``meta`` tensor
to the host (``.cpu()``, ``.to("cpu")``) yields a CPU tensor of ones of the same shape and dtype:
the code under test runs to the end (metrics over constant scores), while any op that mixes
devices still raises.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def _is_host(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu"


class MetaHost(TorchFunctionMode):
    """Within this mode, copying a ``meta`` tensor to the CPU gives ones; counts the copies."""

    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args else None
        if isinstance(src, torch.Tensor) and src.is_meta and func in (torch.Tensor.cpu, torch.Tensor.to):
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if func is torch.Tensor.cpu or _is_host(target):
                self.copies += 1
                dtype = kwargs.get("dtype") or src.dtype
                return torch.ones(src.shape, dtype=dtype)
        return func(*args, **kwargs)
