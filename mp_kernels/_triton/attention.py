"""Triton kernels for ``varlen_attention``: a FlashAttention-2 style forward pass and a token-importance pass.

The forward kernel runs one program per (query block, head, sequence) with an online softmax in float32 and
``exp2`` (``scale * log2(e)`` folded into the scores). With importance it also stores each row's log-sum-exp,
in base 2 and in the scaled domain: ``lse2_i = log2 sum_j exp2(q_i . k_j * scale * log2(e))``. The importance
kernel is key-stationary: each program holds a block of keys of one sequence, loops over a group of heads and
over all query blocks of the sequence, recomputes ``p_ij = exp2(q_i . k_j * scale * log2(e) - lse2_i)`` and sums
it over valid query rows and heads. No ``n x n`` matrix is written, no value is accumulated by an atomic, and
the summation order is fixed, so the result is deterministic. When the heads are split into several groups (to
fill the GPU when the batch is small), each group writes its partial sums to its own row and the last group
program to arrive (``semaphores.arrive``) adds the rows in order. Given a threshold, that program also applies
``compact_tokens``' keep rule and ``finish_plan`` makes the compaction plan, in the same launch. Both grids are
sized by the host's ``max_seqlen``; each program loops over its blocks ``p, p + grid_size, ...`` up to the real
length read from ``cu_seqlens``, so a ``max_seqlen`` below a real length is slower, never wrong.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from mp_kernels._triton.attention_config import choose_head_groups, forward_config, importance_config
from mp_kernels._triton.compact_tokens import finish_plan, keep_rule
from mp_kernels._triton.rows_linear import device_traits
from mp_kernels._triton.segments import segment
from mp_kernels._triton.semaphores import arrive, counters
from mp_kernels.attention_reference import PrunePlan

LOG2_E = math.log2(math.e)
MAX_GRID_YZ = 65535
PLAN_BLOCK = 1024


@triton.jit
def _forward_inner(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    offs_n,
    offs_d,
    lo,
    hi,
    n,
    qk_scale,
    MASK_KEYS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Fold the key blocks starting at ``lo, lo + BLOCK_N, ... < hi`` into the running softmax of one query block.

    ``acc`` (BLOCK_M, HEAD_DIM) float32 unnormalised output, ``m_i`` / ``l_i`` (BLOCK_M,) float32 running row
    maximum (base 2, scaled) and row sum; ``q`` (BLOCK_M, HEAD_DIM) in the input dtype. With ``MASK_KEYS`` keys
    at positions ``>= n`` are excluded (score ``-inf``); without it every key of every block must be valid.
    ``PRECISION`` is ``tl.dot``'s input precision: ``"ieee"`` for float32 inputs (no TF32 rounding), else None.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK_KEYS:
            key_valid = cols < n
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=key_valid[:, None], other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=key_valid[:, None], other=0.0)
        else:
            k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
            v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK_KEYS:
            s = tl.where(key_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _varlen_forward_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    cu_seqlens_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_lh,
    qk_scale,
    total,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STORE_LSE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Attention output (and optionally the base-2 log-sum-exp) of one query block of one head of one sequence.

    Grid ``(cdiv(max_seqlen, BLOCK_M), heads, batch)``: program ``p`` handles query blocks ``p, p + grid_size,
    ...`` up to the sequence's real length (from ``cu_seqlens``), so ``max_seqlen`` only sizes the grid: once
    over when it covers the lengths, a loop (slower, same result) when it does not. ``q``/``k``/``v``
    ``(total, heads, HEAD_DIM)`` fp16, bf16 or fp32 with unit stride in ``HEAD_DIM``; ``out`` likewise in the
    input dtype; ``lse`` ``(heads, total)`` float32 with unit token stride (written only if ``STORE_LSE``);
    ``cu_seqlens`` int32 ``(batch + 1,)``, read through ``segment`` (clamped into ``[0, total]``). ``qk_scale`` is
    ``scale * log2(e)``; ``PRECISION`` as in ``_forward_inner``.
    """
    head = tl.program_id(1)
    seq = tl.program_id(2)
    start, n = segment(cu_seqlens_ptr, seq, total)
    start = start.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = q_ptr + start * stride_qt + head * stride_qh
    k_base = k_ptr + start * stride_kt + head * stride_kh
    v_base = v_ptr + start * stride_vt + head * stride_vh
    full_end = n - n % BLOCK_N
    for block in range(tl.program_id(0), tl.cdiv(n, BLOCK_M), tl.num_programs(0)):
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_valid = offs_m < n
        q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_valid[:, None], other=0.0)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = _forward_inner(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            offs_n,
            offs_d,
            0,
            full_end,
            n,
            qk_scale,
            False,
            BLOCK_N,
            PRECISION,
        )
        acc, m_i, l_i = _forward_inner(
            acc,
            m_i,
            l_i,
            q,
            k_base,
            v_base,
            stride_kt,
            stride_vt,
            offs_n,
            offs_d,
            full_end,
            n,
            n,
            qk_scale,
            True,
            BLOCK_N,
            PRECISION,
        )
        acc = acc / l_i[:, None]
        out_rows = out_ptr + start * stride_ot + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
        tl.store(out_rows, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
        if STORE_LSE:
            tl.store(lse_ptr + head * stride_lh + start + offs_m, m_i + tl.math.log2(l_i), mask=row_valid)


@triton.jit
def _varlen_importance_kernel(
    q_ptr,
    k_ptr,
    lse_ptr,
    partial_ptr,
    cu_seqlens_ptr,
    importance_ptr,
    threshold_ptr,
    alive_ptr,
    dest_ptr,
    slot_ptr,
    cu_out_ptr,
    counts_ptr,
    counter_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_lh,
    stride_pg,
    heads,
    heads_per_group,
    qk_scale,
    total,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    REDUCE: tl.constexpr,
    PLAN: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
    HAS_ALIVE: tl.constexpr,
    HAS_COUNTS: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    SLOT_BLOCK: tl.constexpr,
    TOKEN_BLOCK: tl.constexpr,
):
    """Attention received by one block of keys of one sequence, summed over a group of heads and all queries.

    Grid ``(cdiv(max_seqlen, BLOCK_N), groups, batch)``; program ``p`` handles key blocks ``p, p + grid_size, ...``
    up to the sequence's real length, as in the forward kernel; group ``g`` covers heads
    ``[g * heads_per_group, min((g + 1) * heads_per_group, heads))``. ``q``/``k`` as in the forward kernel,
    ``lse`` ``(heads, total)`` float32 from it, ``partial`` ``(groups, total)`` float32 (row stride ``stride_pg``,
    unit token stride) receives ``sum_h sum_i p_ij / (heads * n)`` for the group's heads: the importance itself
    without ``REDUCE``. With ``REDUCE`` the last group program of each (program, sequence) to arrive adds the
    groups' rows in order into ``importance`` float32 ``(total,)``, and with ``PLAN`` the pruning plan follows in
    the same launch (``finish_plan``). ``counter`` int32: ``batch * grid_size + batch + 1`` zeroed arrival
    counters. A sequence's rows come from ``segment`` (clamped into ``[0, total]``), as in the forward kernel.
    """
    group = tl.program_id(1)
    seq = tl.program_id(2)
    start, n = segment(cu_seqlens_ptr, seq, total)
    start = start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    head_lo = group * heads_per_group
    head_hi = tl.minimum(head_lo + heads_per_group, heads)
    for block in range(tl.program_id(0), tl.cdiv(n, BLOCK_N), tl.num_programs(0)):
        offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = offs_n < n
        received = tl.zeros([BLOCK_N], dtype=tl.float32)
        for head in range(head_lo, head_hi):
            q_base = q_ptr + start * stride_qt + head * stride_qh
            lse_base = lse_ptr + head * stride_lh + start
            k_rows = k_ptr + start * stride_kt + head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :]
            k = tl.load(k_rows, mask=key_valid[:, None], other=0.0)
            for start_m in range(0, n, BLOCK_M):
                rows = start_m + offs_m
                row_valid = rows < n
                q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :], mask=row_valid[:, None], other=0.0)
                lse = tl.load(lse_base + rows, mask=row_valid, other=float("inf"))
                s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
                received += tl.sum(tl.math.exp2(s_t - lse[None, :]), 1)
        received = received / (heads * n).to(tl.float32)
        tl.store(partial_ptr + group * stride_pg + start + offs_n, received, mask=key_valid)
    if REDUCE:
        tl.debug_barrier()
        if arrive(counter_ptr + seq * tl.num_programs(0) + tl.program_id(0), tl.num_programs(1)):
            threshold = 0.0
            live = n
            if PLAN:
                threshold = tl.load(threshold_ptr)
                if HAS_ALIVE:
                    live = tl.where(tl.load(alive_ptr + seq) != 0, n, 0)
            for block in range(tl.program_id(0), tl.cdiv(n, BLOCK_N), tl.num_programs(0)):
                idx = block * BLOCK_N + tl.arange(0, BLOCK_N)
                key_valid = idx < n
                importance = tl.zeros([BLOCK_N], dtype=tl.float32)
                for g in range(0, tl.num_programs(1)):
                    row = partial_ptr + g * stride_pg + start + idx
                    importance += tl.load(row, mask=key_valid, other=0.0, cache_modifier=".cg")
                tl.store(importance_ptr + start + idx, importance, mask=key_valid)
                if PLAN:
                    kept = keep_rule(idx < live, idx < live, idx, importance, threshold, n, True, KEEP_FIRST)
                    tl.store(dest_ptr + start + idx, kept.to(tl.int32), mask=key_valid)
            if PLAN:
                finish_plan(
                    cu_seqlens_ptr,
                    dest_ptr,
                    slot_ptr,
                    cu_out_ptr,
                    counts_ptr,
                    counter_ptr + tl.num_programs(2) * tl.num_programs(0),
                    seq,
                    tl.num_programs(2),
                    tl.num_programs(0),
                    start,
                    n,
                    total,
                    HAS_COUNTS,
                    SEQ_BLOCK,
                    SLOT_BLOCK,
                    TOKEN_BLOCK,
                )


def _check_buffer(
    name: str, buffer: torch.Tensor, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype
) -> None:
    """Raise if a caller-provided output buffer does not match what the kernel writes."""
    if tuple(buffer.shape) != shape or buffer.dtype != dtype or buffer.device != like.device:
        raise ValueError(
            f"{name} must be a {dtype} tensor of shape {shape} on {like.device}, "
            f"got {buffer.dtype} {tuple(buffer.shape)} on {buffer.device}"
        )
    if not buffer.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def varlen_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    return_importance: bool,
    *,
    out: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    head_groups: int | None = None,
    prune_threshold: torch.Tensor | None = None,
    keep_first: bool = False,
    alive: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | PrunePlan | None]:
    """Packed attention and optional token importance or pruning plan on the Triton kernels (inputs validated).

    Args:
        q, k, v: ``(total_tokens, heads, head_dim)`` float16, bfloat16 or float32, unit stride in ``head_dim``
            (token and head strides are free: slices of a fused QKV tensor need no copy).
        cu_seqlens: int32 ``(batch + 1,)`` prefix sum of the lengths (zero-length sequences allowed).
        max_seqlen: the longest length, at least 1; it sizes the grid, so nothing is read back from the device.
            An upper bound is fine; a smaller value is slower, never wrong (programs loop over the extra blocks).
        scale: softmax scale.
        return_importance: also compute each token's importance.
        out: optional contiguous ``(total_tokens, heads, head_dim)`` buffer in the input dtype for the output.
        importance: optional contiguous float32 ``(total_tokens,)`` buffer for the importance.
        head_groups: split the heads of the importance pass into this many groups (``None``: enough to fill
            the GPU); the result does not depend on it beyond float32 rounding.
        prune_threshold: float32 ``(1,)``: make the pruning plan with this length-normalised threshold.
        keep_first: the plan always keeps the first token of every live, non-empty sequence.
        alive: bool ``(batch,)``: the plan drops every token of the other sequences.
        counts: optional int64 ``(batch,)`` contiguous output for each sequence's kept count.

    Returns:
        ``(out, importance)``: ``out`` in the input dtype, ``importance`` float32 ``(total_tokens,)`` or None; with
        ``prune_threshold``, ``(out, PrunePlan)`` (two launches, as with importance alone).
    """
    total, heads, head_dim = q.shape
    batch = cu_seqlens.shape[0] - 1
    if batch > MAX_GRID_YZ:
        raise ValueError(f"the triton backend handles at most {MAX_GRID_YZ} sequences per call, got {batch}")
    plan = prune_threshold is not None
    return_importance = return_importance or plan
    if out is None:
        out = torch.empty((total, heads, head_dim), dtype=q.dtype, device=q.device)
    else:
        _check_buffer("out", out, (total, heads, head_dim), q, q.dtype)
    if return_importance:
        if importance is None:
            importance = torch.empty(total, dtype=torch.float32, device=q.device)
        else:
            _check_buffer("importance", importance, (total,), q, torch.float32)
        lse = torch.empty((heads, total), dtype=torch.float32, device=q.device)
    else:
        importance = None
        lse = out
    qk_scale = scale * LOG2_E
    precision = "ieee" if q.dtype == torch.float32 else None
    fwd = forward_config(head_dim, q.dtype, max_seqlen, batch * heads, device_traits(q.device)[0])
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _varlen_forward_kernel[(triton.cdiv(max_seqlen, fwd.block_m), heads, batch)](
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            qk_scale,
            total,
            HEAD_DIM=head_dim,
            BLOCK_M=fwd.block_m,
            BLOCK_N=fwd.block_n,
            STORE_LSE=return_importance,
            PRECISION=precision,
            num_warps=fwd.num_warps,
            num_stages=fwd.num_stages,
        )
        if importance is None:
            return out, None
        imp = importance_config(head_dim, q.dtype)
        key_blocks = triton.cdiv(max_seqlen, imp.block_n)
        groups = head_groups if head_groups is not None else choose_head_groups(key_blocks * batch, heads, q.device)
        groups = max(1, min(groups, heads))
        heads_per_group = triton.cdiv(heads, groups)
        groups = triton.cdiv(heads, heads_per_group)
        partial = importance.view(1, total)
        if groups > 1:
            partial = torch.empty((groups, total), dtype=torch.float32, device=q.device)
        unused = cu_seqlens
        dest, slot = torch.empty((2, total if plan else 1), dtype=torch.int32, device=q.device)
        cu_out = torch.empty_like(cu_seqlens) if plan else unused
        reduce = groups > 1 or plan
        counter = counters(batch * key_blocks + batch + 1, q.device) if reduce else unused
        _varlen_importance_kernel[(key_blocks, groups, batch)](
            q,
            k,
            lse,
            partial,
            cu_seqlens,
            importance,
            prune_threshold if plan else unused,
            alive if alive is not None else unused,
            dest,
            slot,
            cu_out,
            counts if counts is not None else unused,
            counter,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            lse.stride(0),
            partial.stride(0),
            heads,
            heads_per_group,
            qk_scale,
            total,
            HEAD_DIM=head_dim,
            BLOCK_M=imp.block_m,
            BLOCK_N=imp.block_n,
            PRECISION=precision,
            REDUCE=reduce,
            PLAN=plan,
            KEEP_FIRST=keep_first,
            HAS_ALIVE=alive is not None,
            HAS_COUNTS=counts is not None,
            SEQ_BLOCK=min(max(triton.next_power_of_2(max_seqlen), 16), PLAN_BLOCK),
            SLOT_BLOCK=min(max(triton.next_power_of_2(batch), 16), PLAN_BLOCK),
            TOKEN_BLOCK=PLAN_BLOCK,
            num_warps=imp.num_warps,
            num_stages=imp.num_stages,
        )
    if plan:
        return out, PrunePlan(importance, dest, cu_out)
    return out, importance
