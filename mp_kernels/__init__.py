"""Triton kernels (with PyTorch references) for packed BERT inference with token pruning and early exit.

Importing the package registers the ``"mp"`` attention implementation with transformers.
"""

from mp_kernels.add_layer_norm import add_layer_norm
from mp_kernels.attention import MAX_SEQLEN, varlen_attention
from mp_kernels.compact_tokens import compact_tokens
from mp_kernels.compaction import drop_sequences, prune_tokens, scatter_rows
from mp_kernels.early_exit import entropy_exit
from mp_kernels.embed_pack import embed_pack
from mp_kernels.exit_step import exit_step
from mp_kernels.finish_slots import finish_slots
from mp_kernels.hf_backend import capture_importance, register
from mp_kernels.linear_add_layer_norm import linear_add_layer_norm
from mp_kernels.rows_linear import rows_linear

register()

__all__ = [
    "MAX_SEQLEN",
    "add_layer_norm",
    "capture_importance",
    "compact_tokens",
    "drop_sequences",
    "embed_pack",
    "entropy_exit",
    "exit_step",
    "finish_slots",
    "linear_add_layer_norm",
    "prune_tokens",
    "register",
    "rows_linear",
    "scatter_rows",
    "varlen_attention",
]
