"""PyTorch implementation of ``entropy_exit``: the CPU backend and the tests' oracle.

The entropy comes from PyTorch's numerically stable softmax; ``xlogy(p, p)`` makes the terms whose probability
underflows to 0 contribute 0.
"""

from __future__ import annotations

import math

import torch


def entropy_exit_torch(logits: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs as in ``entropy_exit``; returns ``(exit_mask, uncertainty)``.

    Computed in float32 (float64 for float64 logits, rounded to float32 at the end).
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    p = logits.softmax(dim=1, dtype=compute)
    entropy = torch.special.xlogy(p, p).sum(dim=1)
    uncertainty = entropy.mul_(-1.0 / math.log(logits.shape[1])).clamp_(0.0, 1.0).to(torch.float32)
    return uncertainty <= tau, uncertainty
