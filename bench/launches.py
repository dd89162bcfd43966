"""Recording the kernel launches of a piece of code, on any device (the Triton interpreter included).

``record_launches`` lists every Triton launch (kernel name, grid, argument shapes and scalar values) and every
ATen operator (name and tensor shapes) that runs inside the block, in order; operators that the Triton
interpreter itself issues while it runs a kernel are left out. ``count_launches`` turns such a list into the
number of GPU kernels it stands for: Triton launches plus ATen operators that launch a kernel (views, metadata
and allocations launch none). Both serve the launch floors of ``bench.floors`` and the engine tests ("different
outcomes run the same launches").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {
    "alias",
    "as_strided",
    "detach",
    "empty",
    "empty_like",
    "empty_strided",
    "expand",
    "lift_fresh",
    "new_empty",
    "permute",
    "select",
    "slice",
    "split",
    "squeeze",
    "t",
    "transpose",
    "unbind",
    "unsqueeze",
    "view",
    "_unsafe_view",
}


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return value


@contextmanager
def record_launches() -> Iterator[list[tuple]]:
    """Yield a list that fills with one tuple per Triton launch or ATen operator run inside the block.

    A Triton launch is ``(kernel name, grid, *arguments described, *sorted keyword items)``; an operator is
    ``("aten.<op>...", *tensor arguments described)`` (tensors as ``("tensor", shape, dtype)``).
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    calls: list[tuple] = []
    inside_kernel = [False]

    class Operators(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not inside_kernel[0]:
                calls.append((str(func), *(_describe(a) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    def wrap(original):
        def run(self, *args, grid, warmup, **kwargs):
            calls.append((self.__name__, tuple(grid), *(_describe(a) for a in args), *sorted(kwargs.items())))
            inside_kernel[0] = True
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                inside_kernel[0] = False

        return run

    originals = {cls: cls.run for cls in (JITFunction, InterpretedFunction)}
    try:
        for cls, original in originals.items():
            cls.run = wrap(original)
        with Operators():
            yield calls
    finally:
        for cls, original in originals.items():
            cls.run = original


def count_launches(calls: list[tuple]) -> dict[str, int]:
    """GPU kernels a recorded list stands for: ``triton``, ``aten`` (operators that launch one) and ``total``."""
    triton_launches = sum(not call[0].startswith("aten.") for call in calls)
    aten = sum(call[0].startswith("aten.") and call[0].split(".")[1] not in NO_KERNEL for call in calls)
    return {"triton": triton_launches, "aten": aten, "total": triton_launches + aten}
