"""``compact_tokens``: token and sequence removal into a fixed-capacity packed batch, with no host read-back.

The GPU engine keeps its packed batch in buffers whose shapes never change within a (batch, width) bucket, so
that the whole forward pass can be captured once as a CUDA graph and replayed. Sequences keep their slot for the
whole pass: a sequence that exits or was never there (batch padding) is a slot of length 0, and every kernel that
walks ``cu_seqlens`` skips it. ``compact_tokens`` is the one compaction such a batch needs. Token ``j`` of
sequence ``b`` (length ``n_b``) stays iff

    alive[b]  and  (keep_first and j is b's first token   or   keep[j] and importance rule)

where each factor defaults to true when its argument is not given, and the importance rule (with ``importance`` and
``threshold`` given) is ``threshold <= 0 or not importance[j] <= threshold / n_b`` in the importance's dtype
(division correctly rounded; for numbers, ``importance[j] > threshold / n_b``): LTP's per-sequence threshold on
the length-normalised importance, as ``prune_tokens`` applies it. The kept rows move to the front of the output,
in order; ``cu_seqlens_out`` holds the new prefix sums, one slot per input slot. So one function packs a padded
batch (``keep`` = the attention mask), prunes tokens (``importance``, ``threshold``, ``keep_first``) and removes
exited sequences (``alive``), in one or two launches and without reading anything back: the live row count is
``cu_seqlens_out[-1]``, in device memory, where the next kernels read it.

NaN policy (both backends): a NaN never removes anything. A token whose importance is NaN, or any token when
the threshold is NaN, passes the importance rule (``keep``, ``keep_first`` and ``alive`` still apply); values of
``hidden`` are moved, never inspected.
"""

from __future__ import annotations

import torch

from mp_kernels.checks import check_cu_seqlens, check_tensor
from mp_kernels.compact_tokens_reference import compact_tokens_torch
from mp_kernels.dispatch import choose_backend

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)


def _check_per_token(name: str, tensor: object, total: int, dtypes: tuple[torch.dtype, ...], device: torch.device):
    check_tensor(name, tensor, ndim=1, dtypes=dtypes, device=device)
    if tensor.shape[0] != total:
        raise ValueError(f"{name} must hold one value per row of hidden ({total}), got {tensor.shape[0]}")


def compact_tokens(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    keep: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    keep_first: bool = False,
    alive: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept tokens of a packed batch to the front of a buffer of the same size (see the module doc).

    Args:
        hidden: ``(capacity, d)`` float16, bfloat16 or float32 (float64 on the ``"torch"`` backend), contiguous;
            rows at and past ``cu_seqlens[-1]`` are not read.
        cu_seqlens: int32 ``(batch + 1,)``, from 0, non-decreasing, ending at most at ``capacity``.
        max_seqlen: a Python int in ``[1, capacity]``, the longest sequence's length (it sizes the Triton grid,
            so that nothing is read back): an upper bound is fine; a smaller value is slower, never wrong (with
            ``validate`` a longer sequence is reported as an error).
        keep: bool ``(capacity,)`` per-token flags (a padded batch's attention mask, flattened).
        importance: float32 ``(capacity,)`` token importance (float64 allowed with float64 ``hidden``); needs
            ``threshold``.
        threshold: ``(1,)`` tensor in ``importance``'s dtype on the device: the length-normalised threshold (0 or
            less keeps all).
        keep_first: always keep the first token of every live, non-empty sequence.
        alive: bool ``(batch,)``: sequences to keep; the others become empty slots.
        counts: optional int64 ``(batch,)`` contiguous output, receives each slot's kept-token count.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
        validate: read ``cu_seqlens`` to check its values (a host synchronisation on a GPU); without it nothing
            is read back on the Triton backend (the PyTorch backend reads the sizes it needs).

    Returns:
        ``hidden_out`` ``(capacity, d)`` in ``hidden``'s dtype, the kept rows first (rows past
        ``cu_seqlens_out[-1]`` are unspecified), and ``cu_seqlens_out`` int32 ``(batch + 1,)``.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=TORCH_DTYPES)
    capacity = hidden.shape[0]
    if capacity == 0 or hidden.shape[1] == 0:
        raise ValueError(f"hidden must have at least one row and one column, got shape {tuple(hidden.shape)}")
    device = hidden.device
    check_cu_seqlens(cu_seqlens, capacity, device, validate=False)
    batch = cu_seqlens.numel() - 1
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if not 1 <= max_seqlen <= capacity:
        raise ValueError(f"max_seqlen must lie in [1, {capacity}] (the rows of hidden), got {max_seqlen}")
    if keep is not None:
        _check_per_token("keep", keep, capacity, (torch.bool,), device)
    if (importance is None) != (threshold is None):
        raise ValueError("importance and threshold go together: give both or neither")
    if importance is not None:
        scores = (torch.float32, torch.float64) if hidden.dtype == torch.float64 else (torch.float32,)
        _check_per_token("importance", importance, capacity, scores, device)
        check_tensor("threshold", threshold, ndim=1, dtypes=(importance.dtype,), device=device)
        if threshold.shape[0] != 1:
            raise ValueError(f"threshold must be a (1,) tensor, got shape {tuple(threshold.shape)}")
    if not isinstance(keep_first, bool):
        raise TypeError(f"keep_first must be a bool, got {type(keep_first).__name__}")
    for name, tensor, dtype in (("alive", alive, torch.bool), ("counts", counts, torch.int64)):
        if tensor is None:
            continue
        check_tensor(name, tensor, ndim=1, dtypes=(dtype,), device=device)
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} must hold one entry per sequence ({batch}), got {tensor.shape[0]}")
    if validate:
        values = cu_seqlens.cpu()
        lengths = values[1:] - values[:-1]
        if int(values[0]) != 0 or bool((lengths < 0).any()) or int(values[-1]) > capacity:
            raise ValueError(f"cu_seqlens must start at 0, be non-decreasing and end at most at {capacity}")
        if int(lengths.max()) > max_seqlen:
            raise ValueError(f"a sequence has {int(lengths.max())} tokens, more than max_seqlen={max_seqlen}")
    args = (hidden, cu_seqlens, max_seqlen, keep, importance, threshold, keep_first, alive, counts)
    if choose_backend(backend, device) == "triton":
        if hidden.dtype not in TRITON_DTYPES:
            raise TypeError(f"hidden must be float16, bfloat16 or float32 on the triton backend, got {hidden.dtype}")
        from mp_kernels._triton.compact_tokens import compact_tokens_triton

        return compact_tokens_triton(*args)
    return compact_tokens_torch(*args)
