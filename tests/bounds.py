"""Out-of-bounds checks for Triton kernels, on the CPU and (guard zones only) on a GPU.

Under the Triton interpreter an access outside a tensor reads or writes whatever host memory lies there and passes
silently, where a GPU raises an illegal memory access that poisons the whole process. Two nets: ``bounds_checked``
checks every address a kernel touches against the extents of its tensor arguments (the interpreter, triton 3.9, has
no such option of its own: its ``sanitize_overflow`` is about integer overflow), and ``GuardZones`` carves tensors
out of the middle of larger buffers whose guard zones hold a sentinel, so that a stray write changes a guard and a
stray read of a float shows as NaN.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from tests.utils import ON_GPU, poison_

GUARD_BYTES = 4096


def sentinel(dtype: torch.dtype) -> float | int | bool:
    """The value guard zones hold: NaN for floats, True for bool, the largest value for integers."""
    if dtype.is_floating_point:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max


class GuardZones:
    """Tensors placed in the middle of flat buffers with ``GUARD_BYTES`` of ``sentinel`` before and after each.

    ``copy(tensor)`` returns a contiguous copy so placed; ``empty(...)`` stands in for ``torch.empty`` (its inside
    poisoned, as ``poison_``); ``assert_intact()`` raises if any guard byte changed (an out-of-bounds write).
    """

    def __init__(self) -> None:
        self.buffers: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []

    def empty(self, *size: Any, dtype: torch.dtype | None = None, device: Any = None, **kwargs: Any) -> torch.Tensor:
        """``torch.empty(*size, dtype=, device=)`` inside guard zones, poisoned."""
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        dtype = dtype or torch.get_default_dtype()
        guard = -(-GUARD_BYTES // dtype.itemsize)
        numel = 1
        for n in shape:
            numel *= int(n)
        buffer = torch.full((guard + numel + guard,), sentinel(dtype), dtype=dtype, device=device)
        self.buffers.append((buffer, guard, guard + numel, buffer.view(torch.uint8).clone()))
        return poison_(buffer[guard : guard + numel].view(shape))

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``tensor`` (same dtype and device) inside guard zones."""
        return self.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device).copy_(tensor)

    def assert_intact(self) -> None:
        """Every guard byte still holds its sentinel (the insides may have changed)."""
        for buffer, start, stop, original in self.buffers:
            itemsize = buffer.element_size()
            now = buffer.view(torch.uint8)
            for lo, hi, side in ((0, start, "before"), (stop, buffer.numel(), "after")):
                changed = (now[lo * itemsize : hi * itemsize] != original[lo * itemsize : hi * itemsize]).nonzero()
                assert changed.numel() == 0, (
                    f"out-of-bounds write {side} a {buffer.dtype} tensor of {stop - start} elements: guard bytes "
                    f"{changed[:8, 0].tolist()} changed"
                )


def assert_no_sentinel(tensor: torch.Tensor) -> None:
    """``tensor`` holds no guard value: floats are all finite, integers never the largest value of their dtype."""
    if tensor.is_floating_point():
        assert bool(tensor.isfinite().all()), f"{int((~tensor.isfinite()).sum())} non-finite values (a guard read?)"
    elif tensor.dtype != torch.bool:
        assert not bool((tensor == sentinel(tensor.dtype)).any()), "a guard value was read into the output"


def _tensor_extent(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``(first byte, past the last byte)`` of the elements of ``tensor`` (None if it has none)."""
    if tensor.numel() == 0:
        return None
    span = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    return tensor.data_ptr(), tensor.data_ptr() + (span + 1) * tensor.element_size()


class _Extents:
    """The merged byte ranges of the tensor arguments of the kernel launch the interpreter is running."""

    starts = np.zeros(0, dtype=np.uint64)
    stops = np.zeros(0, dtype=np.uint64)
    kernel = ""

    @classmethod
    def set(cls, kernel: str, tensors: list[torch.Tensor]) -> None:
        ranges = sorted(extent for t in tensors if (extent := _tensor_extent(t)) is not None)
        merged: list[list[int]] = []
        for start, stop in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        cls.kernel = kernel
        cls.starts = np.array([m[0] for m in merged], dtype=np.uint64)
        cls.stops = np.array([m[1] for m in merged], dtype=np.uint64)

    @classmethod
    def check(cls, access: str, pointers: np.ndarray, mask: np.ndarray | None, itemsize: int) -> None:
        """Raise ``IndexError`` naming the kernel if an unmasked element of ``pointers`` lies outside every range."""
        addresses = np.asarray(pointers, dtype=np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask, dtype=bool), addresses.shape)]
        addresses = addresses.reshape(-1)
        if addresses.size == 0:
            return
        slot = np.searchsorted(cls.starts, addresses, side="right").astype(np.int64) - 1
        inside = slot >= 0
        inside[inside] &= addresses[inside] + np.uint64(itemsize) <= cls.stops[slot[inside]]
        if not inside.all():
            bad = addresses[~inside]
            nearest = [
                int(a) - int(cls.stops[s]) if s >= 0 else int(a) - int(cls.starts[0])
                for a, s in zip(bad[:4], slot[~inside][:4], strict=True)
            ]
            raise IndexError(
                f"out-of-bounds {access} in {cls.kernel}: {bad.size} element(s) outside every tensor argument "
                f"(first ones at {nearest} bytes past the end of the range below them, or before the first)"
            )


@contextmanager
def bounds_checked() -> Iterator[GuardZones]:
    """Run Triton kernels under the interpreter with every load, store and atomic checked against the tensors
    passed to the launch, and ``torch.empty`` placed in guard zones; on leaving, the guards must be intact.

    Yields the ``GuardZones`` (``zones.copy(t)`` places inputs the same way). An out-of-bounds access raises
    ``triton.runtime.errors.InterpreterError`` whose message names the kernel ("out-of-bounds load in ...").
    On a GPU only the guard zones apply (run the suite under ``compute-sanitizer`` there).
    """
    zones = GuardZones()
    empty = torch.empty

    def guarded_empty(*size: Any, **kwargs: Any) -> torch.Tensor:
        if set(kwargs) - {"dtype", "device"}:  # out=, requires_grad=, memory_format=...: left alone
            return empty(*size, **kwargs)
        return zones.empty(*size, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", guarded_empty)
        if not ON_GPU:
            _patch_interpreter(patch)
        yield zones
    zones.assert_intact()


def _patch_interpreter(patch: pytest.MonkeyPatch) -> None:
    """Wrap the interpreter's launch (to record the tensor arguments) and its memory accesses (to check them)."""
    from triton.runtime import interpreter

    builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
    init_args, load, store = executor._init_args_hst, builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def init_args_checked(self: Any, args_dev: list[Any], kwargs: dict[str, Any]) -> Any:
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        tensors = [a for a in [*args_hst, *kwargs_hst.values()] if isinstance(a, torch.Tensor)]
        _Extents.set(getattr(self.fn, "__name__", str(self.fn)), tensors)
        return args_hst, kwargs_hst

    def itemsize(handle: Any) -> int:
        return max(1, handle.dtype.scalar.element_ty.primitive_bitwidth // 8)

    def load_checked(self: Any, ptrs: Any, mask: Any, other: Any, *rest: Any) -> Any:
        _Extents.check("load", ptrs.data, mask.data, itemsize(ptrs))
        return load(self, ptrs, mask, other, *rest)

    def store_checked(self: Any, ptrs: Any, value: Any, mask: Any, *rest: Any) -> Any:
        _Extents.check("store", ptrs.data, mask.data, itemsize(ptrs))
        return store(self, ptrs, value, mask, *rest)

    def rmw_checked(self: Any, op: Any, ptr: Any, val: Any, mask: Any, *rest: Any) -> Any:
        _Extents.check("atomic", ptr.data, mask.data, itemsize(ptr))
        return rmw(self, op, ptr, val, mask, *rest)

    def cas_checked(self: Any, ptr: Any, *rest: Any) -> Any:
        _Extents.check("atomic", ptr.data, None, itemsize(ptr))
        return cas(self, ptr, *rest)

    patch.setattr(executor, "_init_args_hst", init_args_checked)
    for name, wrapper in (
        ("create_masked_load", load_checked),
        ("create_masked_store", store_checked),
        ("create_atomic_rmw", rmw_checked),
        ("create_atomic_cas", cas_checked),
    ):
        patch.setattr(builder, name, wrapper)
