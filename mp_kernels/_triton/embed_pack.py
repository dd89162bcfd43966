"""Triton kernel for ``embed_pack``: lookups, the two rounded adds, LayerNorm and packing, in one launch.

Grid: ``(B, cdiv(W, CHUNK))``, a function of host-known shapes only. Program ``(b, c)`` owns columns
``c * CHUNK .. (c + 1) * CHUNK`` of slot ``b``. Its first output row is the number of present tokens before
token ``(b, c * CHUNK)`` in the row-major mask, i.e. the nonzero count of the flat mask ``[0, b * W + c * CHUNK)``,
which it sums itself in blocks of ``SCAN`` (integers, so the order does not matter: deterministic, no atomics, no
second launch for a scan). Program ``(b, 0)`` also counts slot ``b``'s own tokens and writes ``cu_seqlens[b + 1]``,
``lengths[b]`` and ``alive[b]`` (and ``(0, 0)`` writes ``cu_seqlens[0] = 0``).

The program then walks its columns ``ROWS`` at a time, holding ``ROWS`` whole rows in a ``ROWS x BLOCK_D`` tile:
a present token's rank is the count of present tokens before it in its row (its position: the position table
is read at the rank), and its output row the count of present tokens before its row plus its rank; absent
tokens are masked out of every load and store. Ids are clamped into their tables, so no id reads out of bounds.
The sums are rounded to the model dtype as PyTorch adds two tensors of that dtype (``word + type``, then
``+ position``); mean and biased variance are taken in float32 over the registers, two-pass.

``CHUNK`` grows with ``B * W / d`` so that the prefix count a program reads (at most ``B * W`` mask entries) stays
about as large as the rows it embeds; small batches get one program per ``ROWS`` columns. Tile sizes as
``add_layer_norm``'s (untuned on a GPU); 16 rows under the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mp_kernels._triton.add_layer_norm import normalise_rows
from mp_kernels.dispatch import triton_interpreting

TILE = 4096
MAX_ROWS = 16
SCAN = 1024


@triton.jit
def _count_present(mask_ptr, start, end, SCAN_BLOCK: tl.constexpr):
    """Nonzero entries of the flat mask in ``[start, end)``, as an int32 scalar."""
    total = tl.sum(tl.zeros([SCAN_BLOCK], dtype=tl.int32), axis=0)
    for offset in range(start, end, SCAN_BLOCK):
        idx = offset + tl.arange(0, SCAN_BLOCK)
        present = tl.load(mask_ptr + idx, mask=idx < end, other=0) != 0
        total += tl.sum(present.to(tl.int32), axis=0)
    return total


@triton.jit
def _embed_pack_kernel(
    ids_ptr,
    types_ptr,
    mask_ptr,
    word_ptr,
    position_ptr,
    type_table_ptr,
    weight_ptr,
    bias_ptr,
    hidden_ptr,
    cu_ptr,
    lengths_ptr,
    alive_ptr,
    width,
    d,
    vocab,
    type_vocab,
    eps,
    HAS_TYPES: tl.constexpr,
    CHUNK: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SCAN_BLOCK: tl.constexpr,
):
    """Embed and pack columns ``[c * CHUNK, (c + 1) * CHUNK)`` of slot ``b`` (see the module doc).

    ``ids``, ``types`` int64 and ``mask`` ``(B, W)``; ``word`` ``(V, d)``, ``position`` ``(P >= W, d)``,
    ``type_table`` ``(T, d)``, ``weight``, ``bias`` ``(d,)`` and ``hidden`` ``(B * W, d)`` in the model dtype;
    ``cu`` int32 ``(B + 1,)``, ``lengths`` int64 ``(B,)``, ``alive`` bool ``(B,)``; all contiguous.
    """
    slot = tl.program_id(0)
    chunk = tl.program_id(1)
    slot_start = slot * width
    first = chunk * CHUNK
    base = _count_present(mask_ptr, 0, slot_start, SCAN_BLOCK)
    rank = _count_present(mask_ptr, slot_start, slot_start + first, SCAN_BLOCK)
    if chunk == 0:
        own = _count_present(mask_ptr, slot_start, slot_start + width, SCAN_BLOCK)
        tl.store(cu_ptr + slot + 1, base + own)
        if slot == 0:
            tl.store(cu_ptr, base)
        tl.store(lengths_ptr + slot, own.to(tl.int64))
        tl.store(alive_ptr + slot, own > 0)
    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < d
    weight = tl.load(weight_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_valid, other=0.0).to(tl.float32)
    dtype = hidden_ptr.dtype.element_ty
    for sub in range(first, first + CHUNK, ROWS):
        columns = sub + tl.arange(0, ROWS)
        in_slot = columns < width
        flat = slot_start + columns
        present = (tl.load(mask_ptr + flat, mask=in_slot, other=0) != 0) & in_slot
        taken = present.to(tl.int32)
        ranks = rank + tl.cumsum(taken, axis=0) - 1
        dest = base + ranks
        rank += tl.sum(taken, axis=0)
        ids = tl.load(ids_ptr + flat, mask=present, other=0)
        ids = tl.minimum(tl.maximum(ids, 0), vocab - 1)
        if HAS_TYPES:
            types = tl.load(types_ptr + flat, mask=present, other=0)
            types = tl.minimum(tl.maximum(types, 0), type_vocab - 1)
        else:
            types = tl.zeros([ROWS], dtype=tl.int64)
        tile = present[:, None] & col_valid[None, :]
        word = tl.load(word_ptr + ids[:, None] * d + cols[None, :], mask=tile, other=0.0)
        token_type = tl.load(type_table_ptr + types[:, None] * d + cols[None, :], mask=tile, other=0.0)
        position = tl.load(position_ptr + ranks.to(tl.int64)[:, None] * d + cols[None, :], mask=tile, other=0.0)
        summed = (word.to(tl.float32) + token_type.to(tl.float32)).to(dtype).to(tl.float32)
        summed = (summed + position.to(tl.float32)).to(dtype).to(tl.float32)
        y = normalise_rows(summed, tile, weight, bias, d, eps)
        tl.store(hidden_ptr + dest.to(tl.int64)[:, None] * d + cols[None, :], y.to(dtype), mask=tile)


def layout(batch: int, width: int, d: int) -> tuple[int, int, int, int]:
    """``(CHUNK, ROWS, BLOCK_D, num_warps)`` for a ``(batch, width)`` batch of ``d`` features.

    ``BLOCK_D`` is the next power of two of ``d`` (at least 16); ``ROWS`` fills a tile of about ``TILE`` elements
    up to ``MAX_ROWS`` rows (16 under the interpreter); 4 warps, 8 for tiles over 2048 elements. ``CHUNK`` is the
    next power of two of ``batch * width / d``, between ``ROWS`` and the next power of two of ``width``.
    """
    block_d = max(16, triton.next_power_of_2(d))
    rows = MAX_ROWS if triton_interpreting() else max(1, min(MAX_ROWS, TILE // block_d))
    chunk = min(max(rows, triton.next_power_of_2(triton.cdiv(batch * width, d))), triton.next_power_of_2(width))
    return max(chunk, rows), rows, block_d, 4 if rows * block_d <= 2048 else 8


def embed_pack_triton(
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validated inputs as in ``embed_pack``; returns ``(hidden, cu_seqlens, lengths, alive)``.

    One launch, no host synchronisation; ``hidden`` is allocated with ``torch.empty`` and only its rows below
    ``cu_seqlens[B]`` are written.
    """
    batch, width = input_ids.shape
    d = word_embeddings.shape[1]
    device = input_ids.device
    hidden = torch.empty((batch * width, d), dtype=word_embeddings.dtype, device=device)
    cu_seqlens = torch.empty(batch + 1, dtype=torch.int32, device=device)
    lengths = torch.empty(batch, dtype=torch.int64, device=device)
    alive = torch.empty(batch, dtype=torch.bool, device=device)
    chunk, rows, block_d, num_warps = layout(batch, width, d)
    _embed_pack_kernel[(batch, triton.cdiv(width, chunk))](
        input_ids,
        token_type_ids if token_type_ids is not None else input_ids,
        attention_mask,
        word_embeddings,
        position_embeddings,
        token_type_embeddings,
        norm_weight,
        norm_bias,
        hidden,
        cu_seqlens,
        lengths,
        alive,
        width,
        d,
        word_embeddings.shape[0],
        token_type_embeddings.shape[0],
        eps,
        HAS_TYPES=token_type_ids is not None,
        CHUNK=chunk,
        ROWS=rows,
        BLOCK_D=block_d,
        SCAN_BLOCK=SCAN,
        num_warps=num_warps,
    )
    return hidden, cu_seqlens, lengths, alive
