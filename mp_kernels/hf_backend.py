"""The ``"mp"`` attention implementation for transformers, and a way to read each layer's token importance.

``register()`` (run by ``import mp_kernels``) adds ``"mp"`` to transformers' ``AttentionInterface`` and to its
``AttentionMaskInterface``; the mask registration matters, because without it transformers hands the attention
function no padding mask at all. A stock model then runs on ``varlen_attention``::

    import mp_kernels
    model = BertForSequenceClassification.from_pretrained(path, attn_implementation="mp")
    with mp_kernels.capture_importance() as importance:
        model(**batch)
    importance[0]  # (batch, seq_len) float32: layer 0's token importance, 0 at padding

Padded batches are unpadded to the packed layout (only real tokens are computed), attended, and padded back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mp_kernels.attention import varlen_attention

NAME = "mp"
_captured: ContextVar[list[torch.Tensor] | None] = ContextVar("mp_captured_importance", default=None)


@contextmanager
def capture_importance() -> Iterator[list[torch.Tensor]]:
    """Collect the importance of every ``"mp"`` attention call made inside the block.

    Yields a list that receives, per attention call in call order (one per layer for BERT), a
    ``(batch, seq_len)`` float32 tensor: each token's importance within its own sequence, 0 at padding.
    """
    layers: list[torch.Tensor] = []
    token = _captured.set(layers)
    try:
        yield layers
    finally:
        _captured.reset(token)


def key_padding(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """``(batch, length)`` bool, True at real keys, from the mask transformers passes; None means no padding.

    Accepts the 4D boolean mask of ``sdpa_mask`` (True = attend; a bidirectional padding mask has the same key
    set in every query row) or a 2D padding mask.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        keys = attention_mask[:, 0, 0, :]
        if keys.dtype != torch.bool:
            keys = keys == 0
    elif attention_mask.dim() == 2:
        keys = attention_mask.bool()
    else:
        raise ValueError(f"mp attention expects a 2D or 4D padding mask, got shape {tuple(attention_mask.shape)}")
    if keys.shape != (batch, length):
        raise ValueError(f"attention_mask keys have shape {tuple(keys.shape)}, expected {(batch, length)}")
    return keys


def mp_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query``/``key``/``value`` ``(batch, heads, seq, head_dim)``.

    Returns ``(out (batch, seq, heads, head_dim), None)``. Attention dropout (training only) is not part of the
    kernel, so a call with ``dropout > 0`` runs transformers' SDPA path instead.
    """
    if dropout > 0.0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    batch, heads, length, head_dim = query.shape
    if key.shape[2] != length:
        raise ValueError("mp attention is self-attention: query and key lengths must match")
    packed = [x.transpose(1, 2).reshape(batch * length, heads, head_dim) for x in (query, key, value)]
    keys = key_padding(attention_mask, batch, length)
    layers = _captured.get()
    if keys is None:
        cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device)
        max_seqlen, rows = length, None
    else:
        flat = keys.reshape(-1)
        rows = flat.nonzero().squeeze(1)
        lengths = keys.sum(dim=1, dtype=torch.int32)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
        max_seqlen = max(int(lengths.max()), 1)
        packed = [x.index_select(0, rows) for x in packed]
    if packed[0].shape[0] == 0:
        raise ValueError("attention_mask masks every token of the batch")
    result = varlen_attention(
        *(x.contiguous() for x in packed),
        cu_seqlens,
        max_seqlen,
        scale=scaling,
        return_importance=layers is not None,
        validate=False,
    )
    out, importance = result if layers is not None else (result, None)
    if rows is not None:
        out = out.new_zeros(batch * length, heads, head_dim).index_copy_(0, rows, out)
        if importance is not None:
            importance = importance.new_zeros(batch * length).index_copy_(0, rows, importance)
    if importance is not None:
        layers.append(importance.reshape(batch, length).float())
    return out.reshape(batch, length, heads, head_dim), None


def register() -> None:
    """Register ``"mp"`` with transformers' attention and attention-mask interfaces (idempotent)."""
    AttentionInterface.register(NAME, mp_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
