"""Tiles and launch parameters of the ``varlen_attention`` kernels (fixed rules, no autotuning: an autotuner
would benchmark during CUDA-graph capture and choose differently from run to run)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from mp_kernels._triton.rows_linear import device_traits
from mp_kernels.dispatch import triton_interpreting


class AttentionConfig(NamedTuple):
    """Tile sizes and launch parameters of one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Under the interpreter: tiles small enough to give several blocks per tested sequence, large enough to be quick.
INTERPRETER_FORWARD = AttentionConfig(block_m=64, block_n=32, num_warps=1, num_stages=1)
INTERPRETER_IMPORTANCE = AttentionConfig(block_m=32, block_n=64, num_warps=1, num_stages=1)


def forward_config(
    head_dim: int, dtype: torch.dtype, max_seqlen: int, slots: int = 1, sm_count: int = 132
) -> AttentionConfig:
    """Tiles of the forward kernel: small fixed ones under the interpreter, FlashAttention-2's on a GPU.

    float32 inputs get smaller tiles and fewer stages: their exact (``"ieee"``) dots run without tensor cores
    and their tiles take twice the shared memory. 128 query rows a program where that still gives one program per
    SM (``slots``: sequences x heads of the grid), else 64 (at batch 1 the grid is ``heads x cdiv(n, block_m)``:
    48 programs of 128 rows for BERT-base at 512 tokens, 96 of 64).
    """
    if triton_interpreting():
        return INTERPRETER_FORWARD
    tall = max_seqlen > 64 and triton.cdiv(max_seqlen, 128) * slots >= sm_count
    block_m = 128 if tall else 64
    if dtype == torch.float32:
        return AttentionConfig(block_m=64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 32:
        return AttentionConfig(block_m=block_m, block_n=64, num_warps=4, num_stages=4)
    if head_dim <= 64:  # 128-row tiles on 4 warps spill on sm_90 (bench.compile_check): 8 warps for them
        return AttentionConfig(block_m=block_m, block_n=64, num_warps=8 if block_m == 128 else 4, num_stages=3)
    return AttentionConfig(block_m=block_m, block_n=64, num_warps=8, num_stages=3)


def importance_config(head_dim: int, dtype: torch.dtype) -> AttentionConfig:
    """Tiles of the importance kernel (``block_n`` keys held, ``block_m`` queries streamed)."""
    if triton_interpreting():
        return INTERPRETER_IMPORTANCE
    if dtype == torch.float32:
        return AttentionConfig(block_m=32, block_n=64, num_warps=4, num_stages=2)
    return AttentionConfig(block_m=64, block_n=64, num_warps=4 if head_dim <= 64 else 8, num_stages=3)


def choose_head_groups(key_programs: int, heads: int, device: torch.device) -> int:
    """Number of head groups that lets the importance grid fill the GPU (about 4 programs per SM)."""
    if device.type != "cuda":
        return 1
    target = 4 * device_traits(device)[0]
    return max(1, min(heads, triton.cdiv(target, key_programs)))
