"""Triton kernels (with PyTorch references) for packed BERT inference with token pruning and early exit.

Importing the package registers the ``"mp"`` attention implementation with transformers.
"""

from mp_kernels.attention import MAX_SEQLEN, varlen_attention
from mp_kernels.compaction import drop_sequences, prune_tokens, scatter_rows
from mp_kernels.early_exit import entropy_exit
from mp_kernels.hf_backend import capture_importance, register

register()

__all__ = [
    "MAX_SEQLEN",
    "capture_importance",
    "drop_sequences",
    "entropy_exit",
    "prune_tokens",
    "register",
    "scatter_rows",
    "varlen_attention",
]
