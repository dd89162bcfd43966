"""PyTorch implementation of ``varlen_attention``: the CPU backend and the tests' oracle.

Sequences are sorted by length and grouped into buckets whose lengths differ little, each bucket padded only
to its own longest member. Without importance a bucket runs through ``scaled_dot_product_attention`` with a key
mask (PyTorch's fused CPU kernel); with importance the bucket's probabilities are formed explicitly, which is
the n x n work attention needs anyway, and summed over heads and valid query rows. Those buckets are kept to
about an L2 cache's worth of scores (``IMPORTANCE_SCORE_BUDGET``): the scores are written, normalised, read by
the value product and summed, and while they stay in cache these passes cost little more than the fused kernel
(measured on one CPU thread, 16 sequences of 300-512 tokens, 12 heads: 2.4x faster than 256 MB buckets).
Padding waste stays small whatever the mix of lengths, so this is never slower than eager attention on the
padded batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mp_kernels.compact_tokens_reference import keep_rule_torch

BUCKET_SLACK = 1.25
SCORE_BUDGET = 1 << 26
IMPORTANCE_SCORE_BUDGET = 1 << 17


class PrunePlan(NamedTuple):
    """Where each token of a packed batch goes when the pruning rule is applied (``varlen_attention``).

    ``importance``: float32 ``(total_tokens,)`` (float64 for float64 inputs), each token's importance;
    ``dest``: int32 ``(total_tokens,)``, the row a kept token moves to (kept tokens first, in order, slot after
    slot) or -1 for a dropped one; ``cu_seqlens_out``: int32 ``(batch + 1,)``, the kept lengths' prefix sums.
    """

    importance: torch.Tensor
    dest: torch.Tensor
    cu_seqlens_out: torch.Tensor


def prune_plan_torch(
    importance: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: torch.Tensor,
    keep_first: bool,
    alive: torch.Tensor | None,
    counts: torch.Tensor | None,
) -> PrunePlan:
    """The pruning plan of ``importance`` by ``compact_tokens``' rule (``keep_rule_torch``), as the kernel makes it.

    ``importance`` ``(total_tokens,)``, ``threshold`` ``(1,)`` in its dtype, ``alive`` bool ``(batch,)``,
    ``counts`` an optional int64 ``(batch,)`` output for each slot's kept count.
    """
    chosen, sequence = keep_rule_torch(cu_seqlens, None, importance, threshold, keep_first, alive)
    per_sequence_kept = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.int64, device=importance.device)
    per_sequence_kept.index_add_(0, sequence, chosen.long())
    cu_out = torch.zeros_like(cu_seqlens)
    cu_out[1:] = per_sequence_kept.cumsum(0)
    dest = torch.full(importance.shape, -1, dtype=torch.int32, device=importance.device)
    dest[: chosen.numel()] = torch.where(chosen, chosen.int().cumsum(0, dtype=torch.int32) - 1, -1)
    if counts is not None:
        counts.copy_(per_sequence_kept)
    return PrunePlan(importance, dest, cu_out)


def length_buckets(lengths: list[int], heads: int, budget: int = SCORE_BUDGET) -> list[list[int]]:
    """Group sequence indices (non-empty sequences only) into buckets of similar length.

    Sequences are taken longest first; a bucket closes when the next length is below its longest divided by
    ``BUCKET_SLACK``, or when its ``(members, heads, L, L)`` score tensor would exceed ``budget`` elements (a
    bucket holds at least one sequence).
    """
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            top = lengths[buckets[-1][0]]
            fits = lengths[i] * BUCKET_SLACK >= top and (len(buckets[-1]) + 1) * heads * top * top <= budget
            if fits:
                buckets[-1].append(i)
                continue
        buckets.append([i])
    return buckets


def varlen_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    return_importance: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validated inputs as in ``varlen_attention``; returns ``(out, importance or None)``.

    Half-precision inputs are computed in float32 and the output cast back; float64 stays float64.
    """
    total, heads, head_dim = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    starts = cu_seqlens[:-1].tolist()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    out = torch.empty((total, heads, head_dim), dtype=compute, device=q.device)
    importance = torch.empty(total, dtype=compute, device=q.device) if return_importance else None
    budget = IMPORTANCE_SCORE_BUDGET if return_importance else SCORE_BUDGET
    for bucket in length_buckets(lengths, heads, budget):
        width = lengths[bucket[0]]
        padded = lengths[bucket[-1]] != width
        position = torch.arange(width, device=q.device)
        start = torch.tensor([starts[i] for i in bucket], device=q.device)
        length = torch.tensor([lengths[i] for i in bucket], device=q.device)
        valid = position[None, :] < length[:, None]
        rows = start[:, None] + torch.minimum(position[None, :], length[:, None] - 1)
        qb, kb, vb = (x[rows].to(compute).transpose(1, 2) for x in (q, k, v))
        key_mask = valid[:, None, None, :] if padded else None
        if return_importance:
            scores = torch.matmul(qb * scale, kb.transpose(-1, -2))
            if padded:
                scores.masked_fill_(~key_mask, float("-inf"))
            probs = scores.softmax(dim=-1)
            ob = torch.matmul(probs, vb)
            if padded:
                received = torch.matmul(valid[:, None, None, :].to(compute), probs).sum(dim=(1, 2))
            else:
                received = probs.sum(dim=(1, 2))
            importance[rows[valid]] = (received / (heads * length[:, None]))[valid]
        else:
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=key_mask, scale=scale)
        out[rows[valid]] = ob.transpose(1, 2)[valid]
    out = out.to(q.dtype)
    if importance is not None and importance.dtype != torch.float64:
        importance = importance.float()
    return out, importance
