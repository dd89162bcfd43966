"""Triton kernels that compact a packed batch on the device: token pruning, sequence dropping, row scatter.

``prune_tokens_triton`` runs three launches and one device-to-host copy:

1. ``_prune_mask_kernel`` (one program per ``MASK_BLOCK`` tokens): finds each token's sequence by binary search
   in ``cu_seqlens``, forms the keep mask (``not importance <= threshold``: a NaN on either side keeps the token)
   and stores its inclusive prefix sum within the block, and the block's count of kept tokens.
2. ``_prune_scan_kernel`` (one program): scans the block counts into block offsets, derives every sequence's
   kept-token prefix ``cu_seqlens_kept`` from them and the in-block prefixes, and stores the kept total and the
   longest kept sequence side by side, so one copy to the host sizes the outputs.
3. ``_prune_scatter_kernel`` (token rows by feature columns): moves each kept row to its destination, the block
   offset plus its in-block prefix, and records the source row in ``kept_index``.

Every launch is balanced over tokens whatever the mix of sequence lengths, and loops handle any batch size.
``drop_sequences_triton`` scans the sequences in one program (kept lengths, their prefix sum, the kept
``seq_index`` and each kept sequence's source offset), copies its totals to the host once, then gathers the kept
tokens with one program per block of output rows. ``scatter_rows_triton`` is one launch and never synchronises.

Outputs are allocated with ``torch.empty`` and every element is written by a kernel; no kernel is handed an empty
tensor. The scans read each sequence's rows with ``segments.segment``, clamped into ``[0, total]`` (``cu_seqlens`` is
checked only with ``validate=True``), so that bad offsets give unspecified results, never an access outside a
tensor (``tests/test_kernel_bounds.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mp_kernels._triton.segments import segment

MASK_BLOCK = 1024
SCAN_BLOCK = 1024
COPY_ROWS = 32
MAX_COPY_COLS = 256
SCATTER_ROWS = 32


def _copy_cols(width: int) -> int:
    """Feature columns per copy program: the width's next power of two, between 16 and ``MAX_COPY_COLS``."""
    return min(max(triton.next_power_of_2(width), 16), MAX_COPY_COLS)


@triton.jit
def _find_segment(cu_ptr, rows, n_segments, n_steps):
    """The segment ``s`` in ``[0, n_segments)`` of each row: the largest ``s`` with ``cu[s] <= row``.

    ``cu`` holds ``n_segments + 1`` non-decreasing offsets; ``n_steps`` is ``n_segments.bit_length()``, enough
    halvings of ``[0, n_segments]``. Empty segments are skipped because the largest matching offset is taken.
    """
    lo = tl.zeros(rows.shape, dtype=tl.int32)
    hi = tl.zeros(rows.shape, dtype=tl.int32) + n_segments
    for _ in range(n_steps):
        mid = (lo + hi + 1) // 2
        below = tl.load(cu_ptr + mid) <= rows
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid - 1)
    return tl.minimum(lo, n_segments - 1)


@triton.jit
def _copy_rows(src_ptr, src_rows, dst_ptr, dst_rows, row_mask, width, COLS: tl.constexpr):
    """Copy columns ``[program_id(1) * COLS, +COLS)`` of rows ``src_rows`` to rows ``dst_rows`` where
    ``row_mask``, both tensors ``width`` columns wide and contiguous."""
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    tile_mask = row_mask[:, None] & (cols < width)[None, :]
    values = tl.load(src_ptr + src_rows.to(tl.int64)[:, None] * width + cols[None, :], mask=tile_mask)
    tl.store(dst_ptr + dst_rows.to(tl.int64)[:, None] * width + cols[None, :], values, mask=tile_mask)


@triton.jit
def _prune_mask_kernel(
    importance_ptr,
    cu_ptr,
    threshold_ptr,
    threshold_value,
    prefix_ptr,
    block_count_ptr,
    total,
    batch,
    n_steps,
    PER_SEQUENCE: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    valid = rows < total
    seq = _find_segment(cu_ptr, rows, batch, n_steps)
    importance = tl.load(importance_ptr + rows, mask=valid, other=0.0)
    if PER_SEQUENCE:
        threshold = tl.load(threshold_ptr + seq, mask=valid, other=0.0)
    else:
        threshold = threshold_value
    keep = (importance <= threshold) == 0
    if KEEP_FIRST:
        keep = keep | (rows == tl.load(cu_ptr + seq, mask=valid, other=-1))
    kept = (keep & valid).to(tl.int32)
    tl.store(prefix_ptr + rows, tl.cumsum(kept, axis=0), mask=valid)
    tl.store(block_count_ptr + pid, tl.sum(kept, axis=0))


@triton.jit
def _kept_before(block_offset_ptr, prefix_ptr, positions, mask, BLOCK: tl.constexpr):
    """How many tokens before each position are kept: its block's offset plus the in-block prefix before it."""
    inside = positions % BLOCK
    before = tl.load(block_offset_ptr + positions // BLOCK, mask=mask, other=0)
    return before + tl.load(prefix_ptr + positions - 1, mask=mask & (inside != 0), other=0)


@triton.jit
def _prune_scan_kernel(
    block_count_ptr,
    block_offset_ptr,
    prefix_ptr,
    cu_ptr,
    cu_kept_ptr,
    stats_ptr,
    n_blocks,
    batch,
    total,
    BLOCK: tl.constexpr,
    SCAN: tl.constexpr,
):
    carry = tl.sum(tl.zeros([SCAN], dtype=tl.int32), axis=0)
    tl.store(block_offset_ptr, carry)
    for start in range(0, n_blocks, SCAN):
        idx = start + tl.arange(0, SCAN)
        in_range = idx < n_blocks
        counts = tl.load(block_count_ptr + idx, mask=in_range, other=0)
        tl.store(block_offset_ptr + idx + 1, tl.cumsum(counts, axis=0) + carry, mask=in_range)
        carry += tl.sum(counts, axis=0)
    tl.debug_barrier()
    longest = tl.sum(tl.zeros([SCAN], dtype=tl.int32), axis=0)
    tl.store(cu_kept_ptr, longest)
    for start in range(0, batch, SCAN):
        seq = start + tl.arange(0, SCAN)
        in_range = seq < batch
        first, n = segment(cu_ptr, seq, total, in_range)
        begin = _kept_before(block_offset_ptr, prefix_ptr, first, in_range, BLOCK)
        end = _kept_before(block_offset_ptr, prefix_ptr, first + n, in_range, BLOCK)
        tl.store(cu_kept_ptr + seq + 1, end, mask=in_range)
        longest = tl.maximum(longest, tl.max(tl.where(in_range, end - begin, 0), axis=0))
    tl.store(stats_ptr, carry)
    tl.store(stats_ptr + 1, longest)


@triton.jit
def _prune_scatter_kernel(
    hidden_ptr,
    prefix_ptr,
    block_offset_ptr,
    hidden_kept_ptr,
    kept_index_ptr,
    total,
    width,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < total
    inclusive = tl.load(prefix_ptr + rows, mask=valid, other=0)
    previous = tl.load(prefix_ptr + rows - 1, mask=valid & (rows % BLOCK != 0), other=0)
    keep = valid & (inclusive != previous)
    dest = tl.load(block_offset_ptr + rows // BLOCK, mask=valid, other=0) + inclusive - 1
    if tl.program_id(1) == 0:
        tl.store(kept_index_ptr + dest, rows.to(tl.int64), mask=keep)
    _copy_rows(hidden_ptr, rows, hidden_kept_ptr, dest, keep, width, COLS)


def prune_tokens_triton(
    hidden: torch.Tensor,
    importance: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: float | torch.Tensor,
    keep_first: bool,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Validated inputs as in ``prune_tokens`` (float32 ``importance``); returns its four outputs."""
    total, width = hidden.shape
    batch = cu_seqlens.numel() - 1
    device = hidden.device
    n_blocks = triton.cdiv(total, MASK_BLOCK)
    prefix = torch.empty(max(total, 1), dtype=torch.int32, device=device)
    block_count = torch.empty(max(n_blocks, 1), dtype=torch.int32, device=device)
    block_offset = torch.empty(n_blocks + 1, dtype=torch.int32, device=device)
    cu_seqlens_kept = torch.empty(batch + 1, dtype=torch.int32, device=device)
    stats = torch.empty(2, dtype=torch.int32, device=device)
    per_sequence = isinstance(threshold, torch.Tensor)
    if n_blocks:
        _prune_mask_kernel[(n_blocks,)](
            importance,
            cu_seqlens,
            threshold if per_sequence else importance,
            0.0 if per_sequence else float(threshold),
            prefix,
            block_count,
            total,
            batch,
            batch.bit_length(),
            PER_SEQUENCE=per_sequence,
            KEEP_FIRST=keep_first,
            BLOCK=MASK_BLOCK,
        )
    _prune_scan_kernel[(1,)](
        block_count,
        block_offset,
        prefix,
        cu_seqlens,
        cu_seqlens_kept,
        stats,
        n_blocks,
        batch,
        total,
        BLOCK=MASK_BLOCK,
        SCAN=SCAN_BLOCK,
    )
    total_kept, max_seqlen_kept = stats.tolist()
    hidden_kept = torch.empty((total_kept, width), dtype=hidden.dtype, device=device)
    kept_index = torch.empty(total_kept, dtype=torch.int64, device=device)
    if total_kept:
        cols = _copy_cols(width)
        _prune_scatter_kernel[(triton.cdiv(total, COPY_ROWS), triton.cdiv(width, cols))](
            hidden,
            prefix,
            block_offset,
            hidden_kept,
            kept_index,
            total,
            width,
            BLOCK=MASK_BLOCK,
            ROWS=COPY_ROWS,
            COLS=cols,
        )
    return hidden_kept, cu_seqlens_kept, max_seqlen_kept, kept_index


@triton.jit
def _drop_scan_kernel(
    cu_ptr,
    keep_ptr,
    seq_index_ptr,
    cu_kept_ptr,
    seq_index_kept_ptr,
    source_start_ptr,
    stats_ptr,
    batch,
    total,
    SCAN: tl.constexpr,
):
    tokens = tl.sum(tl.zeros([SCAN], dtype=tl.int32), axis=0)
    sequences = tokens
    longest = tokens
    tl.store(cu_kept_ptr, tokens)
    for start in range(0, batch, SCAN):
        seq = start + tl.arange(0, SCAN)
        in_range = seq < batch
        begin, length = segment(cu_ptr, seq, total, in_range)
        keep = tl.load(keep_ptr + seq, mask=in_range, other=0) != 0
        kept_length = tl.where(keep, length, 0)
        rank = tl.cumsum(keep.to(tl.int32), axis=0) + sequences - 1
        tl.store(cu_kept_ptr + rank + 1, tl.cumsum(kept_length, axis=0) + tokens, mask=keep)
        tl.store(seq_index_kept_ptr + rank, tl.load(seq_index_ptr + seq, mask=keep, other=0), mask=keep)
        tl.store(source_start_ptr + rank, begin, mask=keep)
        tokens += tl.sum(kept_length, axis=0)
        sequences += tl.sum(keep.to(tl.int32), axis=0)
        longest = tl.maximum(longest, tl.max(kept_length, axis=0))
    tl.store(stats_ptr, tokens)
    tl.store(stats_ptr + 1, longest)
    tl.store(stats_ptr + 2, sequences)


@triton.jit
def _drop_gather_kernel(
    hidden_ptr,
    cu_kept_ptr,
    source_start_ptr,
    hidden_kept_ptr,
    total_kept,
    n_kept,
    n_steps,
    width,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < total_kept
    seq = _find_segment(cu_kept_ptr, rows, n_kept, n_steps)
    offset = rows - tl.load(cu_kept_ptr + seq, mask=valid, other=0)
    source = tl.load(source_start_ptr + seq, mask=valid, other=0) + offset
    _copy_rows(hidden_ptr, source, hidden_kept_ptr, rows, valid, width, COLS)


def drop_sequences_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: torch.Tensor,
    seq_index: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
    """Validated inputs as in ``drop_sequences``; returns its four outputs.

    ``cu_seqlens_kept`` and ``seq_index_kept`` are leading slices of ``(batch + 1,)`` and ``(batch,)`` buffers,
    written before their lengths are known on the host.
    """
    width = hidden.shape[1]
    batch = cu_seqlens.numel() - 1
    device = hidden.device
    cu_buffer = torch.empty(batch + 1, dtype=torch.int32, device=device)
    seq_index_buffer = torch.empty(batch, dtype=torch.int64, device=device)
    source_start = torch.empty(batch, dtype=torch.int32, device=device)
    stats = torch.empty(3, dtype=torch.int32, device=device)
    _drop_scan_kernel[(1,)](
        cu_seqlens,
        keep,
        seq_index,
        cu_buffer,
        seq_index_buffer,
        source_start,
        stats,
        batch,
        hidden.shape[0],
        SCAN=SCAN_BLOCK,
    )
    total_kept, max_seqlen_kept, n_kept = stats.tolist()
    hidden_kept = torch.empty((total_kept, width), dtype=hidden.dtype, device=device)
    if total_kept:
        cols = _copy_cols(width)
        _drop_gather_kernel[(triton.cdiv(total_kept, COPY_ROWS), triton.cdiv(width, cols))](
            hidden,
            cu_buffer,
            source_start,
            hidden_kept,
            total_kept,
            n_kept,
            n_kept.bit_length(),
            width,
            ROWS=COPY_ROWS,
            COLS=cols,
        )
    return hidden_kept, cu_buffer[: n_kept + 1], max_seqlen_kept, seq_index_buffer[:n_kept]


@triton.jit
def _scatter_rows_kernel(
    out_ptr,
    rows_ptr,
    index_ptr,
    mask_ptr,
    n_rows,
    n_out,
    width,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < n_rows
    target = tl.load(index_ptr + rows, mask=valid, other=-1)
    write = (tl.load(mask_ptr + rows, mask=valid, other=0) != 0) & (target >= 0) & (target < n_out)
    _copy_rows(rows_ptr, rows, out_ptr, target, write, width, COLS)


def scatter_rows_triton(out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Validated inputs as in ``scatter_rows``; writes into ``out`` and returns it.

    Indices outside ``[0, out.shape[0])`` are skipped rather than written (they are only caught as errors with
    ``validate=True``, which reads them).
    """
    n_rows = rows.shape[0]
    width = rows[0].numel() if n_rows else 1
    if n_rows and out.numel():
        cols = _copy_cols(width)
        _scatter_rows_kernel[(triton.cdiv(n_rows, SCATTER_ROWS), triton.cdiv(width, cols))](
            out, rows, index, mask, n_rows, out.shape[0], width, ROWS=SCATTER_ROWS, COLS=cols
        )
    return out
