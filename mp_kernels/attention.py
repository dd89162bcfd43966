"""``varlen_attention``: attention over a packed batch of sequences that can also return token importance.

Shapes follow FlashAttention's varlen interface: the sequences of a batch are concatenated along the first
dimension and ``cu_seqlens`` holds the prefix sum of their lengths. The importance of token ``j`` of sequence
``b`` (length ``n_b``) is the attention it receives, averaged over heads and query rows::

    importance[j] = 1 / (heads * n_b) * sum_h sum_{i in b} softmax_h(q_i . K_b^T * scale)[j]

so it sums to 1 over each sequence (Learned Token Pruning's score, without padding).

Given ``prune_threshold``, the importance pass also makes the pruning plan (``PrunePlan``) of ``compact_tokens``'
rule, in the same launch on the Triton backend: which row each kept token moves to and the new ``cu_seqlens``,
all in device memory, so that a later kernel (a GEMM epilogue) moves the rows and nothing is read back.
"""

from __future__ import annotations

import torch

from mp_kernels.attention_reference import PrunePlan, prune_plan_torch, varlen_attention_torch
from mp_kernels.checks import check_cu_seqlens, check_tensor
from mp_kernels.dispatch import choose_backend

HEAD_DIMS = (16, 32, 64, 128)
MAX_SEQLEN = 16384
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)


def _check_qkv(q: object, k: object, v: object, dtypes: tuple[torch.dtype, ...]) -> None:
    check_tensor("q", q, ndim=3, dtypes=dtypes, contiguous=False)
    for name, tensor in (("k", k), ("v", v)):
        check_tensor(name, tensor, ndim=3, dtypes=dtypes, device=q.device, contiguous=False)
        if tensor.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(tensor.shape)}")
        if tensor.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {tensor.dtype}")
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if q.shape[0] == 0:
        raise ValueError("q holds no tokens: the batch is empty")
    if q.shape[2] not in HEAD_DIMS:
        raise ValueError(f"head_dim (q.shape[2]) must be one of {HEAD_DIMS}, got {q.shape[2]}")


def _check_prune(
    q: torch.Tensor,
    batch: int,
    return_importance: bool,
    prune_threshold: object,
    keep_first: object,
    alive: object,
    counts: object,
) -> None:
    """Raise if the pruning arguments do not fit (``prune_threshold`` None: the others must be unset)."""
    if not isinstance(keep_first, bool):
        raise TypeError(f"keep_first must be a bool, got {type(keep_first).__name__}")
    if prune_threshold is None:
        for name, value in (("keep_first", keep_first), ("alive", alive), ("counts", counts)):
            if value is not None and value is not False:
                raise ValueError(f"{name} belongs to the pruning plan: give prune_threshold too")
        return
    if return_importance:
        raise ValueError("prune_threshold returns the plan, which holds the importance: leave return_importance off")
    score = torch.float64 if q.dtype == torch.float64 else torch.float32
    check_tensor("prune_threshold", prune_threshold, ndim=1, dtypes=(score,), device=q.device)
    if prune_threshold.shape[0] != 1:
        raise ValueError(f"prune_threshold must be a (1,) tensor, got shape {tuple(prune_threshold.shape)}")
    for name, tensor, dtype in (("alive", alive, torch.bool), ("counts", counts, torch.int64)):
        if tensor is None:
            continue
        check_tensor(name, tensor, ndim=1, dtypes=(dtype,), device=q.device)
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} must hold one entry per sequence ({batch}), got {tensor.shape[0]}")


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float | None = None,
    return_importance: bool = False,
    prune_threshold: torch.Tensor | None = None,
    keep_first: bool = False,
    alive: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, PrunePlan]:
    """Bidirectional softmax attention of each packed sequence with itself.

    NaN policy (both backends): values are never inspected; a NaN (or infinity) in a sequence's ``q``, ``k`` or
    ``v`` spreads only to that sequence's outputs and importances that depend on it, never to another sequence.
    A NaN importance keeps its token in ``prune_tokens`` and ``compact_tokens`` (a NaN never removes anything).

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)``, float16, bfloat16 or float32 (float64 on the ``"torch"``
            backend, for reference computations), on one device, contiguous in ``head_dim``;
            ``head_dim`` in 16, 32, 64, 128.
        cu_seqlens: int32 ``(batch + 1,)``, from 0, non-decreasing, ending at ``total_tokens``.
        max_seqlen: the longest sequence's length, in ``[1, MAX_SEQLEN]``: it sizes the Triton grid (nothing is
            read back); an upper bound is fine; a smaller value is slower, never wrong (with ``validate`` a
            longer sequence is reported as an error).
        scale: softmax scale, ``head_dim ** -0.5`` by default.
        return_importance: also return each token's importance (see the module docstring).
        prune_threshold: ``(1,)`` float32 tensor on the device (float64 for float64 inputs): return the pruning
            plan instead of the importance. Token ``j`` of sequence ``b`` (length ``n_b``) stays iff ``alive[b]``
            and (``keep_first`` and ``j == 0``, or ``threshold <= 0 or not importance[j] <= threshold / n_b``):
            ``compact_tokens``' rule, so a NaN keeps.
        keep_first: with ``prune_threshold``, always keep the first token of every live, non-empty sequence.
        alive: with ``prune_threshold``, bool ``(batch,)``: the sequences to keep (the others keep no token).
        counts: with ``prune_threshold``, an optional int64 ``(batch,)`` output for each sequence's kept count.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
        validate: read ``cu_seqlens`` to check its values (a host synchronisation on GPU).

    Returns:
        ``out`` ``(total_tokens, heads, head_dim)`` in the input dtype; with ``return_importance`` also
        ``importance`` ``(total_tokens,)`` float32 (float64 for float64 inputs); with ``prune_threshold``
        ``(out, PrunePlan(importance, dest, cu_seqlens_out))``: ``dest`` int32 ``(total_tokens,)`` the row each
        kept token moves to (kept tokens first, in order, sequence after sequence) or -1, ``cu_seqlens_out`` int32
        ``(batch + 1,)`` the kept lengths' prefix sums. The Triton backend makes the plan without reading anything
        back, in the importance pass's launch.
    """
    _check_qkv(q, k, v, TORCH_DTYPES)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if not 1 <= max_seqlen <= MAX_SEQLEN:
        raise ValueError(f"max_seqlen must lie in [1, {MAX_SEQLEN}], got {max_seqlen}")
    check_cu_seqlens(cu_seqlens, q.shape[0], q.device, validate=validate, max_seqlen=max_seqlen)
    _check_prune(q, cu_seqlens.shape[0] - 1, return_importance, prune_threshold, keep_first, alive, counts)
    if scale is None:
        scale = q.shape[2] ** -0.5
    elif not float(scale) > 0.0:
        raise ValueError(f"scale must be positive, got {scale}")
    chosen = choose_backend(backend, q.device)
    if chosen == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"q must be float16, bfloat16 or float32 on the triton backend, got {q.dtype}")
        from mp_kernels._triton.attention import varlen_attention_triton

        prune = {"prune_threshold": prune_threshold, "keep_first": keep_first, "alive": alive, "counts": counts}
        out, result = varlen_attention_triton(q, k, v, cu_seqlens, max_seqlen, float(scale), return_importance, **prune)
    else:
        wanted = return_importance or prune_threshold is not None
        out, result = varlen_attention_torch(q, k, v, cu_seqlens, max_seqlen, float(scale), wanted)
        if prune_threshold is not None:
            result = prune_plan_torch(result, cu_seqlens, prune_threshold, keep_first, alive, counts)
    return (out, result) if return_importance or prune_threshold is not None else out
