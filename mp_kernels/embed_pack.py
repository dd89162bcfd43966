"""``embed_pack``: BERT's embeddings and their LayerNorm, packed from a padded batch, in one launch.

An inference engine receives a padded ``(B, W)`` batch (ids, token types, attention mask) and runs its layers on
packed tokens. ``embed_pack`` computes, for the present tokens only (mask nonzero, any pattern: right or left
padding, holes), exactly what HF's ``BertEmbeddings`` computes in eval mode with absolute positions counted over
the present tokens: token ``j``'s position ``r_j`` is the number of present tokens before it in its row (its
column with right padding, its distance from the row's first real token with left padding, as
``MagicPyramidForSequenceClassification.forward`` defines positions), and packs them:

    e = word[ids] + type[types]     (rounded to the model dtype)
    e = e + position[r_j]           (rounded)
    y = LayerNorm(e) * weight + bias   (float32 statistics, float64 for float64; rounded)

The present tokens of slot ``b`` go, in order, to rows ``cu_seqlens[b] .. cu_seqlens[b + 1]`` of ``hidden``.
On the Triton backend this is one launch whose grid depends on ``B``, ``W`` and ``d`` only, and nothing is read
back to the host (with ``validate=False``): it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from mp_kernels.checks import check_eps, check_tensor
from mp_kernels.dispatch import choose_backend
from mp_kernels.embed_pack_reference import embed_pack_torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
MAX_TRITON_FEATURES = 8192


def _check_table(name: str, table: object, like: torch.Tensor, ndim: int) -> torch.Tensor:
    """A weight with ``like``'s dtype and device, ``ndim`` dimensions, contiguous, last size ``d``."""
    check_tensor(name, table, ndim=ndim, device=like.device)
    if table.dtype != like.dtype:
        raise TypeError(f"{name} must have word_embeddings' dtype {like.dtype}, got {table.dtype}")
    if table.shape[-1] != like.shape[1]:
        raise ValueError(f"{name} must have {like.shape[1]} features (word_embeddings'), got {tuple(table.shape)}")
    return table


def _check_ids_in_range(input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, vocab: int, types: int) -> None:
    """Raise a ``ValueError`` naming ``input_ids`` or ``token_type_ids`` if one lies outside its table (one read)."""
    bad = [((input_ids < 0) | (input_ids >= vocab)).any()]
    if token_type_ids is not None:
        bad.append(((token_type_ids < 0) | (token_type_ids >= types)).any())
    flags = torch.stack(bad).tolist()
    if flags[0]:
        raise ValueError(f"input_ids must lie in [0, {vocab}) (the rows of word_embeddings)")
    if len(flags) > 1 and flags[1]:
        raise ValueError(f"token_type_ids must lie in [0, {types}) (the rows of token_type_embeddings)")


def embed_pack(
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor | None,
    attention_mask: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embed, normalise and pack the present tokens of a padded batch (see the module doc).

    Args:
        input_ids: int64 ``(B, W)``, ``B, W >= 1``, contiguous: word ids in ``[0, V)``.
        token_type_ids: int64 ``(B, W)`` in ``[0, T)``, contiguous, or None (type 0 everywhere).
        attention_mask: ``(B, W)`` bool or integer (uint8, int8, int16, int32, int64), contiguous: nonzero marks
            a present token; any pattern.
        word_embeddings: ``(V, d)``, ``V, d >= 1``, float16, bfloat16 or float32 (float64 on the ``"torch"``
            backend; ``d`` at most ``MAX_TRITON_FEATURES`` on the Triton backend), contiguous: the model dtype.
        position_embeddings: ``(P, d)`` with ``P >= W``, same dtype and device, contiguous.
        token_type_embeddings: ``(T, d)``, ``T >= 1``, same dtype and device, contiguous.
        norm_weight: ``(d,)`` the LayerNorm scale, same dtype and device, contiguous.
        norm_bias: ``(d,)`` the LayerNorm shift, same dtype and device, contiguous.
        eps: a Python float ``> 0`` added to the variance.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
        validate: read the ids (one host synchronisation) and raise a ``ValueError`` naming ``input_ids`` or
            ``token_type_ids`` if one lies outside its table. Without it an out-of-range id is clamped into its
            table on both backends (never a read out of bounds) and nothing is read back on the Triton backend.

    Returns:
        ``hidden`` ``(B * W, d)`` in the model dtype: the present tokens of slot ``b``, in order, in rows
        ``cu_seqlens[b] .. cu_seqlens[b + 1]``; rows at and past ``cu_seqlens[B]`` are unspecified (the Triton
        backend never writes them, the PyTorch backend zeroes them). ``cu_seqlens`` int32 ``(B + 1,)``, from 0:
        the prefix sums of ``lengths``. ``lengths`` int64 ``(B,)``: present tokens per slot. ``alive`` bool
        ``(B,)``: ``lengths > 0``.
    """
    check_tensor("input_ids", input_ids, ndim=2, dtypes=(torch.int64,))
    batch, width = input_ids.shape
    if batch == 0 or width == 0:
        raise ValueError(f"input_ids must have at least one slot and one column, got shape {(batch, width)}")
    device = input_ids.device
    if token_type_ids is not None:
        check_tensor("token_type_ids", token_type_ids, ndim=2, dtypes=(torch.int64,), device=device)
        if token_type_ids.shape != input_ids.shape:
            raise ValueError(f"token_type_ids must have input_ids' shape {(batch, width)}, got {token_type_ids.shape}")
    check_tensor("attention_mask", attention_mask, ndim=2, dtypes=MASK_DTYPES, device=device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {(batch, width)}, got {attention_mask.shape}")
    check_tensor("word_embeddings", word_embeddings, ndim=2, dtypes=TORCH_DTYPES, device=device)
    vocab, d = word_embeddings.shape
    if vocab == 0 or d == 0:
        raise ValueError(f"word_embeddings must have at least one row and one column, got shape {(vocab, d)}")
    _check_table("position_embeddings", position_embeddings, word_embeddings, 2)
    if position_embeddings.shape[0] < width:
        raise ValueError(f"position_embeddings must have at least W={width} rows, got {position_embeddings.shape[0]}")
    _check_table("token_type_embeddings", token_type_embeddings, word_embeddings, 2)
    if token_type_embeddings.shape[0] == 0:
        raise ValueError("token_type_embeddings must have at least one row, got 0")
    _check_table("norm_weight", norm_weight, word_embeddings, 1)
    _check_table("norm_bias", norm_bias, word_embeddings, 1)
    eps = check_eps(eps)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    chosen = choose_backend(backend, device)
    if chosen == "triton":
        if word_embeddings.dtype not in TRITON_DTYPES:
            allowed = "float16, bfloat16 or float32"
            raise TypeError(f"word_embeddings must be {allowed} on the triton backend, got {word_embeddings.dtype}")
        if d > MAX_TRITON_FEATURES:
            raise ValueError(f"word_embeddings has {d} features, more than the triton backend's {MAX_TRITON_FEATURES}")
    if validate:
        _check_ids_in_range(input_ids, token_type_ids, vocab, token_type_embeddings.shape[0])
    args = (input_ids, token_type_ids, attention_mask, word_embeddings, position_embeddings, token_type_embeddings)
    if chosen == "triton":
        from mp_kernels._triton.embed_pack import embed_pack_triton

        return embed_pack_triton(*args, norm_weight, norm_bias, eps)
    return embed_pack_torch(*args, norm_weight, norm_bias, eps)
