"""Input validation shared by every public kernel: clear errors naming the argument, before any kernel runs.

Shape, dtype, device and contiguity checks are free (no device synchronisation) and always run. Value checks
on ``cu_seqlens`` read the tensor's contents, which costs a host synchronisation on a GPU; callers on a hot
path that build their own inputs pass ``validate=False`` to skip only those.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_eps(eps: object) -> float:
    """Check a LayerNorm epsilon: a real number (not a bool), finite and above 0; returns it as a float."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    eps = float(eps)
    if not (eps > 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite float > 0, got {eps}")
    return eps


def check_tensor(
    name: str,
    tensor: object,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """Check that ``tensor`` is a tensor of the given rank, dtype and device, raising a clear error if not."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if tensor.dtype not in dtypes:
            allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({allowed}), got {str(tensor.dtype).removeprefix('torch.')}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the other inputs are on {device}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return tensor


def check_cu_seqlens(
    cu_seqlens: object,
    total_tokens: int,
    device: torch.device,
    *,
    validate: bool = True,
    max_seqlen: int | None = None,
    name: str = "cu_seqlens",
) -> torch.Tensor:
    """Check a ``(batch + 1,)`` int32 prefix sum of sequence lengths against ``total_tokens``.

    With ``validate`` the values are read: the first entry must be 0, entries non-decreasing, the last equal
    to ``total_tokens`` and, if ``max_seqlen`` is given, no sequence longer than it.
    """
    check_tensor(name, cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must hold at least 2 entries (batch + 1 with batch >= 1): the batch is empty")
    if not validate:
        return cu_seqlens
    values = cu_seqlens.cpu()
    if int(values[0]) != 0:
        raise ValueError(f"{name} must start at 0, got {int(values[0])}")
    lengths = values[1:] - values[:-1]
    if bool((lengths < 0).any()):
        raise ValueError(f"{name} must be non-decreasing")
    if int(values[-1]) != total_tokens:
        raise ValueError(f"{name} must end at the token count {total_tokens}, got {int(values[-1])}")
    if max_seqlen is not None and int(lengths.max()) > max_seqlen:
        raise ValueError(f"a sequence has {int(lengths.max())} tokens, more than max_seqlen={max_seqlen}")
    return cu_seqlens


def check_probability(name: str, value: float) -> float:
    """Check that a scalar lies in [0, 1]."""
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python float, got a tensor")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value
