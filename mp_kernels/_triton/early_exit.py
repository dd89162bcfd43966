"""Triton kernel for ``entropy_exit``: one pass over the logits with an online, numerically stable softmax.

Each program takes ``ROWS`` rows and walks their classes in chunks of ``COLS``, keeping per row the running
maximum ``m``, ``s = sum(exp(x - m))`` and ``t = sum(exp(x - m) * (x - m))``. When the maximum rises to ``m'``
both are rescaled by ``a = exp(m - m')``: ``s' = a * s`` and ``t' = a * (t + (m - m') * s)``. The entropy is
``log(s) - t / s``; it is normalised, clamped into [0, 1] by comparisons (a NaN stays NaN, as in the PyTorch
backend, and never passes ``<= tau``; ``tl.minimum``/``tl.maximum`` would turn it into a bound on a GPU) and
compared with ``tau`` in the same program.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_COLS = 256
TILE = 4096


@triton.jit
def _entropy_exit_kernel(
    logits_ptr,
    uncertainty_ptr,
    exit_ptr,
    batch,
    classes,
    inv_log_classes,
    tau,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_valid = rows < batch
    base = logits_ptr + rows.to(tl.int64)[:, None] * classes
    maximum = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    weighted = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, classes, COLS):
        cols = start + tl.arange(0, COLS)
        valid = row_valid[:, None] & (cols < classes)[None, :]
        x = tl.load(base + cols[None, :], mask=valid, other=float("-inf")).to(tl.float32)
        new_maximum = tl.maximum(maximum, tl.max(x, axis=1))
        shift = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
        scale = tl.exp(maximum - shift)
        rise = tl.where(total > 0, maximum - shift, 0.0)
        z = x - shift[:, None]
        w = tl.exp(z)
        weighted = scale * (weighted + rise * total) + tl.sum(w * tl.where(w > 0, z, 0.0), axis=1)
        total = scale * total + tl.sum(w, axis=1)
        maximum = new_maximum
    total = tl.where(row_valid, total, 1.0)
    entropy = tl.log(total) - weighted / total
    uncertainty = entropy * inv_log_classes
    uncertainty = tl.where(uncertainty < 0.0, 0.0, tl.where(uncertainty > 1.0, 1.0, uncertainty))
    tl.store(uncertainty_ptr + rows, uncertainty, mask=row_valid)
    tl.store(exit_ptr + rows, uncertainty <= tau, mask=row_valid)


def entropy_exit_triton(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs as in ``entropy_exit``; returns ``(exit_mask, uncertainty)``."""
    batch, classes = logits.shape
    cols = min(max(triton.next_power_of_2(classes), 16), MAX_COLS)
    rows = max(16, min(128, TILE // cols))
    uncertainty = torch.empty(batch, dtype=torch.float32, device=logits.device)
    exit_mask = torch.empty(batch, dtype=torch.bool, device=logits.device)
    _entropy_exit_kernel[(triton.cdiv(batch, rows),)](
        logits, uncertainty, exit_mask, batch, classes, 1.0 / math.log(classes), tau, ROWS=rows, COLS=cols
    )
    return exit_mask, uncertainty
