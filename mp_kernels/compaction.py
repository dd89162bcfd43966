"""Compaction of a packed batch on the device: ``prune_tokens``, ``drop_sequences`` and ``scatter_rows``.

Pruning and early exit only save time if pruned tokens and finished sequences really leave the packed batch.
These functions remove them in a few launches with at most one host synchronisation each (the sizes of the
outputs, all in one copy), so a model can compact its batch after every layer:

* ``prune_tokens`` keeps the tokens whose importance exceeds their sequence's threshold (a NaN keeps);
* ``drop_sequences`` removes whole sequences (those that exited) and carries their original positions along;
* ``scatter_rows`` writes an exiting layer's per-sequence rows (logits, exit layer) into the caller's output at
  those original positions, without synchronising.

The layout is FlashAttention's varlen one: sequences concatenated along the first dimension, ``cu_seqlens`` the
int32 prefix sum of their lengths (zero-length sequences allowed).
"""

from __future__ import annotations

import math
import numbers

import torch

from mp_kernels.checks import check_cu_seqlens, check_tensor
from mp_kernels.compaction_reference import drop_sequences_torch, prune_tokens_torch, scatter_rows_torch
from mp_kernels.dispatch import choose_backend

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)
SCATTER_DTYPES = (
    *TORCH_DTYPES,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
)


def _check_hidden(hidden: object) -> torch.Tensor:
    check_tensor("hidden", hidden, ndim=2, dtypes=TORCH_DTYPES)
    if hidden.shape[1] == 0:
        raise ValueError("hidden must have at least one feature column, got shape (total_tokens, 0)")
    return hidden


def _check_triton_hidden(backend: str, hidden: torch.Tensor) -> None:
    if backend == "triton" and hidden.dtype not in TRITON_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16 or float32 on the triton backend, got {hidden.dtype}")


def _check_threshold(threshold: object, importance: torch.Tensor, batch: int) -> float | torch.Tensor:
    if isinstance(threshold, torch.Tensor):
        dtypes = (torch.float32, importance.dtype)
        check_tensor("threshold", threshold, ndim=1, dtypes=dtypes, device=importance.device)
        if threshold.shape[0] != batch:
            raise ValueError(f"threshold must hold one value per sequence ({batch}), got {threshold.shape[0]}")
        return threshold
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a float or a (batch,) tensor, got {type(threshold).__name__}")
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must not be NaN")
    return threshold


def prune_tokens(
    hidden: torch.Tensor,
    importance: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    keep_first: bool = True,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Keep the tokens whose importance exceeds their sequence's threshold, in order.

    Token ``j`` of sequence ``b`` stays iff ``not importance[j] <= threshold[b]`` (for numbers: strictly
    above), or, with ``keep_first``, it is the first token of its sequence (CLS), so that no non-empty sequence
    becomes empty.

    NaN policy (both backends): a NaN never removes anything. A token whose importance is NaN, or whose
    sequence's threshold (tensor entry) is NaN, is kept; a Python float threshold that is NaN is rejected.

    Args:
        hidden: ``(total_tokens, d)``, float16, bfloat16 or float32 (float64 on the ``"torch"`` backend),
            contiguous.
        importance: float32 ``(total_tokens,)`` (float64 with float64 ``hidden``), contiguous, on ``hidden``'s
            device.
        cu_seqlens: int32 ``(batch + 1,)``, from 0, non-decreasing, ending at ``total_tokens``.
        threshold: a Python float for every sequence, or a ``(batch,)`` float32 tensor (or ``importance``'s
            dtype) on the same device, one per sequence. It is compared in ``importance``'s dtype.
        keep_first: always keep each non-empty sequence's first token.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
        validate: read ``cu_seqlens`` to check its values (a host synchronisation on GPU). Without it the
            function synchronises once, to size its outputs; invalid offsets are then undefined behaviour.

    Returns:
        ``hidden_kept`` ``(total_kept, d)`` in ``hidden``'s dtype; ``cu_seqlens_kept`` int32 ``(batch + 1,)``
        (empty sequences stay, with length 0); ``max_seqlen_kept``, a Python int; ``kept_index`` int64
        ``(total_kept,)``, the input row of every kept token, to gather any other per-token tensor.
    """
    _check_hidden(hidden)
    check_tensor("importance", importance, ndim=1, dtypes=(torch.float32, torch.float64), device=hidden.device)
    if importance.shape[0] != hidden.shape[0]:
        raise ValueError(f"importance must hold one value per token ({hidden.shape[0]}), got {importance.shape[0]}")
    if importance.dtype == torch.float64 and hidden.dtype != torch.float64:
        raise TypeError("importance may be float64 only with float64 hidden; use float32")
    check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device, validate=validate)
    threshold = _check_threshold(threshold, importance, cu_seqlens.numel() - 1)
    if not isinstance(keep_first, bool):
        raise TypeError(f"keep_first must be a bool, got {type(keep_first).__name__}")
    chosen = choose_backend(backend, hidden.device)
    _check_triton_hidden(chosen, hidden)
    if chosen == "triton":
        from mp_kernels._triton.compaction import prune_tokens_triton

        return prune_tokens_triton(hidden, importance, cu_seqlens, threshold, keep_first)
    return prune_tokens_torch(hidden, importance, cu_seqlens, threshold, keep_first)


def drop_sequences(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: torch.Tensor,
    seq_index: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Remove whole sequences from a packed batch, keeping the order of the others.

    NaN policy (both backends): values are moved, never inspected; NaNs in ``hidden`` pass through unchanged.

    Args:
        hidden: ``(total_tokens, d)``, float16, bfloat16 or float32 (float64 on the ``"torch"`` backend),
            contiguous.
        cu_seqlens: int32 ``(batch + 1,)``, from 0, non-decreasing, ending at ``total_tokens``.
        keep: bool ``(batch,)``: which sequences stay.
        seq_index: int64 ``(batch,)``: each batch row's position among the caller's original examples.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
        validate: read ``cu_seqlens`` to check its values (a host synchronisation on GPU). Without it the
            function synchronises once, to size its outputs; invalid offsets are then undefined behaviour.

    Returns:
        ``hidden_kept`` ``(total_kept, d)``; ``cu_seqlens_kept`` int32 ``(n_kept + 1,)``; ``max_seqlen_kept``, a
        Python int; ``seq_index_kept`` int64 ``(n_kept,)`` (``seq_index[keep]``). Dropping every sequence gives
        0 tokens, ``cu_seqlens_kept == [0]``, 0 and an empty ``seq_index_kept``.
    """
    _check_hidden(hidden)
    check_cu_seqlens(cu_seqlens, hidden.shape[0], hidden.device, validate=validate)
    batch = cu_seqlens.numel() - 1
    for name, tensor, dtype in (("keep", keep, torch.bool), ("seq_index", seq_index, torch.int64)):
        check_tensor(name, tensor, ndim=1, dtypes=(dtype,), device=hidden.device)
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} must hold one entry per sequence ({batch}), got {tensor.shape[0]}")
    chosen = choose_backend(backend, hidden.device)
    _check_triton_hidden(chosen, hidden)
    if chosen == "triton":
        from mp_kernels._triton.compaction import drop_sequences_triton

        return drop_sequences_triton(hidden, cu_seqlens, keep, seq_index)
    return drop_sequences_torch(hidden, cu_seqlens, keep, seq_index)


def scatter_rows(
    out: torch.Tensor,
    rows: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Write ``rows[i]`` into ``out[index[i]]`` for every ``i`` with ``mask[i]``, in place.

    Typically writes an exiting layer's logits ``(batch, classes)`` into a ``(original_batch, classes)`` output
    at ``seq_index``, or the exit layer into a 1-D int64 output. If two selected rows share an index, which one
    lands is unspecified. NaN policy (both backends): values are copied, never inspected; NaNs pass through.

    Args:
        out: ``(N,)`` or ``(N, C)``, contiguous; any float, integer or bool dtype.
        rows: ``(B,)`` or ``(B, C)`` like ``out`` (same trailing shape and dtype, same device), contiguous.
        index: int64 ``(B,)``: the row of ``out`` each row goes to.
        mask: bool ``(B,)``: which rows to write.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
        validate: check that the selected indices lie in ``[0, N)`` (a host synchronisation on GPU). Without
            it the Triton backend never synchronises and skips out-of-range indices.

    Returns:
        ``out``.
    """
    check_tensor("out", out, dtypes=SCATTER_DTYPES)
    if out.dim() not in (1, 2):
        raise ValueError(f"out must have 1 or 2 dimensions, got shape {tuple(out.shape)}")
    check_tensor("rows", rows, ndim=out.dim(), device=out.device)
    if rows.dtype != out.dtype:
        raise TypeError(f"rows must have the dtype of out ({out.dtype}), got {rows.dtype}")
    if rows.shape[1:] != out.shape[1:]:
        raise ValueError(f"rows must have out's trailing shape {tuple(out.shape[1:])}, got {tuple(rows.shape[1:])}")
    for name, tensor, dtype in (("index", index, torch.int64), ("mask", mask, torch.bool)):
        check_tensor(name, tensor, ndim=1, dtypes=(dtype,), device=out.device)
        if tensor.shape[0] != rows.shape[0]:
            raise ValueError(f"{name} must hold one entry per row of rows ({rows.shape[0]}), got {tensor.shape[0]}")
    if validate and bool((mask & ((index < 0) | (index >= out.shape[0]))).any()):
        raise ValueError(f"index holds a selected value outside [0, {out.shape[0]})")
    if choose_backend(backend, out.device) == "triton":
        from mp_kernels._triton.compaction import scatter_rows_triton

        return scatter_rows_triton(out, rows, index, mask)
    return scatter_rows_torch(out, rows, index, mask)
