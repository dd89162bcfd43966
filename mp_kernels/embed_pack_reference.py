"""PyTorch ``embed_pack``: the CPU backend and the tests' oracle.

It embeds only the present tokens (real removal: ``nonzero`` of the mask, which reads the token count back, one
host synchronisation on a GPU, where the Triton backend reads nothing back), in the order and with the roundings
of HF's ``BertEmbeddings``, then normalises them with ``F.layer_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def embed_pack_torch(
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

    Ids are clamped into their tables, as the Triton kernel does. Rows of ``hidden`` past the present tokens are
    zero.
    """
    batch, width = input_ids.shape
    d = word_embeddings.shape[1]
    present = attention_mask.reshape(-1) != 0
    tokens = present.nonzero().squeeze(1)
    ids = input_ids.reshape(-1)[tokens].clamp(0, word_embeddings.shape[0] - 1)
    types = torch.zeros_like(ids) if token_type_ids is None else token_type_ids.reshape(-1)[tokens]
    types = types.clamp(0, token_type_embeddings.shape[0] - 1)
    positions = (present.view(batch, width).cumsum(dim=1) - 1).reshape(-1)[tokens]
    embedded = word_embeddings[ids] + token_type_embeddings[types]
    embedded = embedded + position_embeddings[positions]
    hidden = word_embeddings.new_empty(batch * width, d)
    hidden[: tokens.numel()] = F.layer_norm(embedded, (d,), norm_weight, norm_bias, eps)
    hidden[tokens.numel() :] = 0
    lengths = present.view(batch, width).sum(dim=1)
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32, device=input_ids.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    return hidden, cu_seqlens, lengths, lengths > 0
