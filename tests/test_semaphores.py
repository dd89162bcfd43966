"""Arrival counters: the last program to arrive sees every partial, and leaves the counter at zero."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mp_kernels._triton import semaphores
from mp_kernels._triton.semaphores import arrive, counters
from tests.utils import DEVICE


@triton.jit
def _sum_of_partials_kernel(values_ptr, partial_ptr, out_ptr, counter_ptr, n, BLOCK: tl.constexpr):
    """Program ``p`` of group ``g`` stores ``values[g, p]`` as its partial; the last one of the group adds them."""
    part = tl.program_id(0)
    group = tl.program_id(1)
    parts = tl.num_programs(0)
    tl.store(partial_ptr + group * parts + part, tl.load(values_ptr + group * parts + part) * 2.0)
    if arrive(counter_ptr + group, parts):
        offs = tl.arange(0, BLOCK)
        partial = tl.load(partial_ptr + group * parts + offs, mask=offs < n, other=0.0, cache_modifier=".cg")
        tl.store(out_ptr + group, tl.sum(partial, axis=0))


@pytest.mark.parametrize("parts", [1, 5, 16])
def test_the_last_program_to_arrive_finishes_each_group_and_resets_its_counter(parts: int) -> None:
    groups = 3
    values = torch.randn(groups, parts, device=DEVICE)
    partial = torch.full_like(values, float("nan"))
    out = torch.full((groups,), float("nan"), device=DEVICE)
    buffer = counters(groups, DEVICE)
    for _ in range(2):  # a second launch on the same counters: they were left at zero
        _sum_of_partials_kernel[(parts, groups)](values, partial, out, buffer, parts, BLOCK=16)
        torch.testing.assert_close(out, (values * 2).sum(dim=1), rtol=1e-6, atol=1e-6)
        assert int(buffer[:groups].abs().sum()) == 0


def test_counters_are_shared_and_grow_without_freeing_what_graphs_may_hold() -> None:
    small = counters(4, DEVICE)
    assert counters(2, DEVICE).data_ptr() == small.data_ptr()
    large = counters(small.numel() + 1, DEVICE)
    assert large.numel() > small.numel() and large.dtype == torch.int32 and int(large.abs().sum()) == 0
    assert any(old is small for old in semaphores._RETIRED), "an outgrown buffer stays allocated"
