"""Triton kernels for ``compact_tokens``: one or two launches, nothing read back to the host.

1. ``_count_kernel`` (one program per sequence slot; only when a token-level rule applies: ``keep``,
   ``importance`` or ``keep_first``): walks the slot's tokens in blocks, decides which stay, stores the inclusive
   prefix count of kept tokens within the sequence for every token, and the slot's kept count.
2. ``_move_kernel`` (grid: row blocks of ``max_seqlen`` x feature-column blocks x slots): each program finds its
   slot's output offset by summing the kept counts of the slots before it (at most a few hundred integers, read
   from L2; cheaper than a third launch for a scan), writes the slot's ``cu_seqlens_out`` entry and kept count
   (first program of the slot), and moves its kept rows to ``offset + prefix - 1``, looping over the row blocks
   ``block, block + grid_size, ...`` up to the slot's real length (once when ``max_seqlen`` covers it).
   Programs past the slot's length, and slots with nothing kept, return at once.

The token rule is ``keep_rule``'s, shared with the pruning plan of ``varlen_attention`` (whose importance kernel
finishes its plan with ``finish_plan``, in its own launch): the importance rule is ``not importance <= threshold /
n`` (a NaN importance or threshold keeps the token).

Without a token-level rule (only ``alive``), a slot keeps all or nothing, so its count is its length or 0 and
the first launch is skipped. Sizes come from device memory only; the grid is sized by the host-known
``max_seqlen`` and slot count, so the launches are the same whatever the outcome (CUDA-graph friendly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mp_kernels._triton.compaction import COPY_ROWS, _copy_cols, _copy_rows
from mp_kernels._triton.segments import segment
from mp_kernels._triton.semaphores import arrive

COUNT_BLOCK = 1024
SCAN = 1024


@triton.jit
def keep_rule(chosen, valid, idx, importance, threshold, n, HAS_IMPORTANCE: tl.constexpr, KEEP_FIRST: tl.constexpr):
    """``compact_tokens``' token rule on a block of one sequence's tokens: the one place it is written on Triton.

    ``chosen`` (BLOCK,) bool: the tokens the other factors keep (in range, ``keep``, ``alive``); ``valid``
    (BLOCK,) bool: in range and alive; ``idx`` (BLOCK,) int32 positions in the sequence; ``importance`` (BLOCK,)
    float32 and ``threshold`` a float32 scalar (read only with ``HAS_IMPORTANCE``); ``n`` the sequence's length.
    Returns ``chosen and (threshold <= 0 or not importance <= threshold / n)`` (division correctly rounded, so a
    NaN keeps), or-ed with ``valid and idx == 0`` under ``KEEP_FIRST``.
    """
    if HAS_IMPORTANCE:
        per_token = tl.math.div_rn(threshold, tl.maximum(n, 1).to(tl.float32))
        keep_all = (tl.zeros_like(importance) + threshold) <= 0.0
        chosen = chosen & (keep_all | ((importance <= per_token) == 0))
    if KEEP_FIRST:
        chosen = chosen | (valid & (idx == 0))
    return chosen


@triton.jit
def finish_plan(
    cu_seqlens_ptr,
    dest_ptr,
    slot_ptr,
    cu_out_ptr,
    counts_ptr,
    counter_ptr,
    seq,
    batch,
    parts,
    start,
    n,
    capacity,
    HAS_COUNTS: tl.constexpr,
    SEQ_BLOCK: tl.constexpr,
    SLOT_BLOCK: tl.constexpr,
    TOKEN_BLOCK: tl.constexpr,
):
    """A compaction plan (``keep_rule``'s flags to destination rows) finished in the launch that made the flags.

    Called by each of the ``parts`` programs that stored keep flags (int32 0/1) for the tokens ``[start, start +
    n)`` of slot ``seq`` (of ``batch``; ``segment``'s rows) in ``dest`` int32 ``(capacity,)``, once their flags
    are stored.
    ``counter`` points at ``batch + 1`` zeroed arrival counters. The last of a slot's programs to arrive turns its
    flags into in-slot ranks (-1 where dropped), marks its tokens' slot in ``slot`` int32 ``(capacity,)`` and stores
    its kept count in ``cu_out[seq + 1]``; the last slot scans the counts into ``cu_out`` int32 ``(batch + 1,)``
    (and ``counts`` int64 ``(batch,)``) and adds each slot's offset to its kept tokens' ranks, so ``dest`` holds
    each kept token's row in the compacted batch, or -1. Every sum runs in index order: deterministic.

    Bad ``cu_seqlens`` (unchecked without validation) can make slots overlap, keep more than ``capacity`` rows or
    leave rows that no slot flagged: ``cu_out`` is clamped into ``[0, capacity]``, a destination outside
    ``[0, capacity)`` becomes -1 and an unflagged row's stale slot is never followed outside ``cu_out``.
    """
    tl.debug_barrier()
    if arrive(counter_ptr + seq, parts):
        carry = tl.sum(tl.zeros([SEQ_BLOCK], dtype=tl.int32), axis=0)
        for offset in range(0, n, SEQ_BLOCK):
            idx = offset + tl.arange(0, SEQ_BLOCK)
            valid = idx < n
            kept = tl.load(dest_ptr + start + idx, mask=valid, other=0, cache_modifier=".cg")
            rank = tl.cumsum(kept, axis=0) + carry - 1
            tl.store(dest_ptr + start + idx, tl.where(kept != 0, rank, -1), mask=valid)
            tl.store(slot_ptr + start + idx, tl.zeros([SEQ_BLOCK], dtype=tl.int32) + seq, mask=valid)
            carry += tl.sum(kept, axis=0)
        tl.store(cu_out_ptr + seq + 1, carry)
        tl.debug_barrier()
        if arrive(counter_ptr + batch, batch):
            kept_total = tl.sum(tl.zeros([SLOT_BLOCK], dtype=tl.int32), axis=0)
            tl.store(cu_out_ptr, kept_total)
            for first in range(0, batch, SLOT_BLOCK):
                slots = first + tl.arange(0, SLOT_BLOCK)
                in_batch = slots < batch
                count = tl.load(cu_out_ptr + 1 + slots, mask=in_batch, other=0, cache_modifier=".cg")
                ends = tl.minimum(tl.cumsum(count, axis=0) + kept_total, capacity)
                tl.store(cu_out_ptr + 1 + slots, ends, mask=in_batch)
                if HAS_COUNTS:
                    tl.store(counts_ptr + slots, count.to(tl.int64), mask=in_batch)
                kept_total += tl.sum(count, axis=0)
            tl.debug_barrier()
            last_start, last_n = segment(cu_seqlens_ptr, batch - 1, capacity)
            for first in range(0, last_start + last_n, TOKEN_BLOCK):
                rows = first + tl.arange(0, TOKEN_BLOCK)
                live = rows < last_start + last_n
                rank = tl.load(dest_ptr + rows, mask=live, other=-1, cache_modifier=".cg")
                slot = tl.load(slot_ptr + rows, mask=live, other=0, cache_modifier=".cg")
                planned = live & (rank >= 0) & (slot >= 0) & (slot < batch)
                target = tl.load(cu_out_ptr + slot, mask=planned, other=0, cache_modifier=".cg") + rank
                lands = planned & (target >= 0) & (target < capacity)
                tl.store(dest_ptr + rows, tl.where(lands, target, -1), mask=live)


@triton.jit
def _count_kernel(
    cu_ptr,
    keep_ptr,
    importance_ptr,
    threshold_ptr,
    alive_ptr,
    prefix_ptr,
    count_ptr,
    capacity,
    HAS_KEEP: tl.constexpr,
    HAS_IMPORTANCE: tl.constexpr,
    KEEP_FIRST: tl.constexpr,
    HAS_ALIVE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Kept flags of one slot's tokens: in-sequence inclusive prefix ``prefix`` (int32) and the slot's count."""
    seq = tl.program_id(0)
    start, n = segment(cu_ptr, seq, capacity)
    if HAS_ALIVE:
        n = tl.where(tl.load(alive_ptr + seq) != 0, n, 0)
    threshold = 0.0
    if HAS_IMPORTANCE:
        threshold = tl.load(threshold_ptr)
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for offset in range(0, n, BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        valid = idx < n
        rows = start + idx
        chosen = valid
        if HAS_KEEP:
            chosen = chosen & (tl.load(keep_ptr + rows, mask=valid, other=0) != 0)
        importance = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_IMPORTANCE:
            importance = tl.load(importance_ptr + rows, mask=valid, other=0.0)
        chosen = keep_rule(chosen, valid, idx, importance, threshold, n, HAS_IMPORTANCE, KEEP_FIRST)
        kept = chosen.to(tl.int32)
        tl.store(prefix_ptr + rows, tl.cumsum(kept, axis=0) + carry, mask=valid)
        carry += tl.sum(kept, axis=0)
    tl.store(count_ptr + seq, carry)


@triton.jit
def _slot_count(cu_ptr, count_ptr, alive_ptr, slots, mask, capacity, PER_TOKEN: tl.constexpr, HAS_ALIVE: tl.constexpr):
    """Kept tokens of each slot in ``slots`` (0 where not ``mask``)."""
    if PER_TOKEN:
        count = tl.load(count_ptr + slots, mask=mask, other=0)
    else:
        _, count = segment(cu_ptr, slots, capacity, mask)
        if HAS_ALIVE:
            count = tl.where(tl.load(alive_ptr + slots, mask=mask, other=0) != 0, count, 0)
    return count


@triton.jit
def _move_kernel(
    hidden_ptr,
    cu_ptr,
    prefix_ptr,
    count_ptr,
    alive_ptr,
    hidden_out_ptr,
    cu_out_ptr,
    counts_ptr,
    width,
    capacity,
    PER_TOKEN: tl.constexpr,
    HAS_ALIVE: tl.constexpr,
    HAS_COUNTS: tl.constexpr,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    """Move one slot's kept rows (columns of program 1) to their place in the output.

    Program ``block`` moves row blocks ``block, block + grid_size, ...`` up to the slot's real length (read from
    ``cu_seqlens``), so the grid's ``cdiv(max_seqlen, ROWS)`` is a size hint: once over when it covers the
    lengths, a loop when it does not, never a wrong result. The slot's rows come from ``segment``; bad
    ``cu_seqlens`` (unchecked without validation) can still make slots overlap and keep more than ``capacity``
    rows, so ``cu_seqlens_out`` is clamped into ``[0, capacity]`` and a row whose destination falls outside
    ``[0, capacity)`` is not moved.
    """
    block = tl.program_id(0)
    seq = tl.program_id(2)
    start, n = segment(cu_ptr, seq, capacity)
    offset = tl.sum(tl.zeros([SCAN_BLOCK], dtype=tl.int32), axis=0)
    for first in range(0, seq, SCAN_BLOCK):
        slots = first + tl.arange(0, SCAN_BLOCK)
        offset += tl.sum(
            _slot_count(cu_ptr, count_ptr, alive_ptr, slots, slots < seq, capacity, PER_TOKEN, HAS_ALIVE), 0
        )
    if PER_TOKEN:
        own = tl.load(count_ptr + seq)
    else:
        own = n
        if HAS_ALIVE:
            own = tl.where(tl.load(alive_ptr + seq) != 0, n, 0)
    if (block == 0) & (tl.program_id(1) == 0):
        tl.store(cu_out_ptr + seq + 1, tl.minimum(offset + own, capacity))
        if seq == 0:
            tl.store(cu_out_ptr, offset)
        if HAS_COUNTS:
            tl.store(counts_ptr + seq, own.to(tl.int64))
    if (block * ROWS >= n) | (own == 0):
        return
    for first_row in range(block * ROWS, n, tl.num_programs(0) * ROWS):
        idx = first_row + tl.arange(0, ROWS)
        valid = idx < n
        rows = start + idx
        if PER_TOKEN:
            inclusive = tl.load(prefix_ptr + rows, mask=valid, other=0)
            previous = tl.load(prefix_ptr + rows - 1, mask=valid & (idx > 0), other=0)
            chosen = valid & (inclusive != previous)
            dest = offset + inclusive - 1
        else:
            chosen = valid
            dest = offset + idx
        chosen = chosen & (dest >= 0) & (dest < capacity)
        _copy_rows(hidden_ptr, rows, hidden_out_ptr, dest, chosen, width, COLS)


def compact_tokens_triton(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    keep: torch.Tensor | None,
    importance: torch.Tensor | None,
    threshold: torch.Tensor | None,
    keep_first: bool,
    alive: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs as in ``compact_tokens``; returns ``(hidden_out, cu_seqlens_out)``, never synchronising."""
    capacity, width = hidden.shape
    batch = cu_seqlens.numel() - 1
    hidden_out = torch.empty_like(hidden)
    cu_out = torch.empty_like(cu_seqlens)
    per_token = keep is not None or importance is not None or keep_first
    unused = cu_seqlens
    prefix = count = unused
    if per_token:
        prefix = torch.empty(capacity, dtype=torch.int32, device=hidden.device)
        count = torch.empty(batch, dtype=torch.int32, device=hidden.device)
        _count_kernel[(batch,)](
            cu_seqlens,
            keep if keep is not None else unused,
            importance if importance is not None else unused,
            threshold if threshold is not None else unused,
            alive if alive is not None else unused,
            prefix,
            count,
            capacity,
            HAS_KEEP=keep is not None,
            HAS_IMPORTANCE=importance is not None,
            KEEP_FIRST=keep_first,
            HAS_ALIVE=alive is not None,
            BLOCK=min(max(triton.next_power_of_2(max_seqlen), 16), COUNT_BLOCK),
        )
    cols = _copy_cols(width)
    _move_kernel[(triton.cdiv(max_seqlen, COPY_ROWS), triton.cdiv(width, cols), batch)](
        hidden,
        cu_seqlens,
        prefix,
        count,
        alive if alive is not None else unused,
        hidden_out,
        cu_out,
        counts if counts is not None else unused,
        width,
        capacity,
        PER_TOKEN=per_token,
        HAS_ALIVE=alive is not None,
        HAS_COUNTS=counts is not None,
        ROWS=COPY_ROWS,
        COLS=cols,
        SCAN_BLOCK=min(max(triton.next_power_of_2(batch), 16), SCAN),
    )
    return hidden_out, cu_out
