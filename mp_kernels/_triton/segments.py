"""Where a slot's rows lie in a packed batch, read from ``cu_seqlens`` so that no offset leaves the buffer.

``cu_seqlens`` is checked only with ``validate=True``; without it (the serving path) an offset past the end of the
buffer, negative or below its predecessor must give unspecified results, never an access outside a tensor, which
on a GPU is an illegal address that ends the process. Every Triton kernel that reads a slot's bounds takes them
from ``segment``, the one place the rule is written.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def segment(cu_ptr, index, total, mask=None):
    """The rows ``[start, start + n)`` of slot ``index``, clamped into ``[0, total]``.

    ``start = clamp(cu[index], 0, total)``, ``end = clamp(cu[index + 1], start, total)``, ``n = end - start``;
    valid offsets are unchanged, so results for valid inputs are bitwise the same. ``cu_ptr`` points at int32
    ``cu_seqlens``; ``index`` is a scalar or a block of slot indices (``mask`` excludes the block's lanes past the
    last slot, which read as empty slots at row 0); ``total`` is the buffer's row count. Returns int32 ``(start,
    n)`` of ``index``'s shape, so ``start + n <= total`` and every row ``start + i`` with ``i < n`` is in the buffer.
    """
    if mask is None:
        first = tl.load(cu_ptr + index)
        last = tl.load(cu_ptr + index + 1)
    else:
        first = tl.load(cu_ptr + index, mask=mask, other=0)
        last = tl.load(cu_ptr + index + 1, mask=mask, other=0)
    start = tl.minimum(tl.maximum(first, 0), total)
    end = tl.minimum(tl.maximum(last, start), total)
    return start, end - start
