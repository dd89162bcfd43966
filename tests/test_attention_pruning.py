"""The pruning plan of ``varlen_attention(prune_threshold=...)``: ``compact_tokens``' keep rule applied to the
importance, made in the importance pass's own launch (head groups summed, counts, each row's destination and the
new ``cu_seqlens``), deterministic, with its arrival counters left at zero."""

from __future__ import annotations

import math

import pytest
import torch

from mp_kernels import compact_tokens, varlen_attention
from mp_kernels._triton.attention import varlen_attention_triton
from mp_kernels._triton.semaphores import counters
from mp_kernels.attention import PrunePlan
from tests.test_attention import (  # noqa: F401  (no_kernel_runs is a fixture)
    LENGTHS,
    _valid,
    check_against_reference,
    no_kernel_runs,
    packed_inputs,
    reference,
)
from tests.utils import DEVICE, KERNEL_DTYPES, TOLERANCE, assert_close, poison_, poisoned_allocations

DEAD = torch.tensor([True, False, True, True, False, True, True, True, True, True])


def plan_threshold(importance: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """A float32 threshold near 0.9 (uniform attention is 1) such that no float64 importance lies within twice the
    float32 tolerance of ``threshold / n_b``.

    So the kernel's float32 importance falls on the same side of ``threshold / n_b`` as the float64 reference.
    """
    atol, rtol = TOLERANCE[torch.float32]
    bounds = cu_seqlens.cpu().long()
    lengths = (bounds[1:] - bounds[:-1]).clamp(min=1)
    per_token = lengths.repeat_interleave(bounds[1:] - bounds[:-1]).double()
    for step in range(100):
        candidate = torch.tensor([0.9 + (-1) ** step * ((step + 1) // 2) * 0.0123], dtype=torch.float32)
        limit = candidate.double() / per_token
        if bool(((importance.cpu() - limit).abs() > 2 * (atol + rtol * limit)).all()):
            return candidate.to(DEVICE)
    raise AssertionError("no threshold away from every importance: change the seed")


def check_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    plan: PrunePlan,
    counts: torch.Tensor,
    threshold: torch.Tensor,
    keep_first: bool,
    alive: torch.Tensor | None,
) -> None:
    """The plan equals ``compact_tokens``' PyTorch reference applied to the float64 reference importance.

    ``compact_tokens`` moves each row's index, so the rows it keeps, in order, give the expected ``dest``.
    """
    total = q.shape[0]
    _, expected_importance = reference(q, k, v, cu_seqlens)
    assert plan.importance.dtype == torch.float32 and plan.importance.shape == (total,)
    assert_close(plan.importance, expected_importance, torch.float32)
    expected_counts = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.int64, device=DEVICE)
    rows = torch.arange(total, dtype=torch.float32, device=DEVICE)[:, None]
    moved, expected_cu = compact_tokens(
        rows,
        cu_seqlens,
        max(int((cu_seqlens[1:] - cu_seqlens[:-1]).max()), 1),
        importance=expected_importance.float(),
        threshold=threshold,
        keep_first=keep_first,
        alive=alive,
        counts=expected_counts,
        backend="torch",
    )
    kept = int(expected_cu[-1])
    expected_dest = torch.full((total,), -1, dtype=torch.int32)
    expected_dest[moved[:kept, 0].long().cpu()] = torch.arange(kept, dtype=torch.int32)
    assert plan.dest.dtype == plan.cu_seqlens_out.dtype == torch.int32
    assert plan.dest.cpu().tolist() == expected_dest.tolist()
    assert plan.cu_seqlens_out.cpu().tolist() == expected_cu.cpu().tolist()
    assert counts.cpu().tolist() == expected_counts.cpu().tolist()


PLAN_RULES = {
    "threshold": (False, None),
    "keep-first": (True, None),
    "keep-first-and-dead-slots": (True, DEAD),
    "dead-slots": (False, DEAD),
}


@pytest.mark.parametrize("rule", list(PLAN_RULES))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_pruning_plan_follows_the_compact_tokens_rule(backend: str, dtype: torch.dtype, rule: str) -> None:
    """Uneven lengths (1, 0, primes, 128), dead slots, keep_first on and off; outputs allocated poisoned."""
    q, k, v, cu_seqlens = packed_inputs(LENGTHS, 16, dtype, seed=41)
    keep_first, alive = PLAN_RULES[rule]
    alive = None if alive is None else alive.to(DEVICE)
    threshold = plan_threshold(reference(q, k, v, cu_seqlens)[1], cu_seqlens)
    counts = poison_(torch.empty(len(LENGTHS), dtype=torch.int64, device=DEVICE))
    with poisoned_allocations():
        out, plan = varlen_attention(
            q,
            k,
            v,
            cu_seqlens,
            128,
            prune_threshold=threshold,
            keep_first=keep_first,
            alive=alive,
            counts=counts,
            backend=backend,
        )
    assert isinstance(plan, PrunePlan)
    check_against_reference(q, k, v, cu_seqlens, out, None)
    check_plan(q, k, v, cu_seqlens, plan, counts, threshold, keep_first, alive)
    assert 0 < int(plan.cu_seqlens_out[-1]) < q.shape[0]


@pytest.mark.parametrize(("groups", "max_seqlen"), [(1, 128), (2, 128), (3, 70), (2, 40), (3, 1)])
def test_pruning_plan_whatever_the_head_groups_and_grid(groups: int, max_seqlen: int) -> None:
    """Head groups added in the launch (3 heads in 1, 2 or 3 groups), ``max_seqlen`` hints below the longest
    length (programs loop over several key blocks): the same plan, bit for bit from run to run, and the arrival
    counters back at zero after every launch."""
    lengths = (70, 9, 0, 33, 1, 128)
    q, k, v, cu_seqlens = packed_inputs(lengths, 16, torch.float32, seed=43, heads=3)
    alive = torch.tensor([True, True, True, False, True, True], device=DEVICE)
    threshold = plan_threshold(reference(q, k, v, cu_seqlens)[1], cu_seqlens)
    runs = []
    for _ in range(2):
        counts = poison_(torch.empty(len(lengths), dtype=torch.int64, device=DEVICE))
        with poisoned_allocations():
            _, plan = varlen_attention_triton(
                q,
                k,
                v,
                cu_seqlens,
                max_seqlen,
                16**-0.5,
                False,
                head_groups=groups,
                prune_threshold=threshold,
                keep_first=True,
                alive=alive,
                counts=counts,
            )
        assert int(counters(1, DEVICE).abs().sum()) == 0
        check_plan(q, k, v, cu_seqlens, plan, counts, threshold, True, alive)
        runs.append(plan)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("threshold", [0.0, -1.0, math.nan])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_zero_or_nan_threshold_or_importance_keeps_every_token(backend: str, threshold: float) -> None:
    """NaN policy: a threshold of 0 or less, or NaN, keeps every token, and so does a NaN importance (sequence 1)
    under a threshold that prunes the others."""
    lengths = (20, 33, 1, 0, 7)
    q, k, v, cu_seqlens = packed_inputs(lengths, 16, torch.float32, seed=47)
    counts = torch.empty(len(lengths), dtype=torch.int64, device=DEVICE)
    limit = torch.tensor([threshold], device=DEVICE)
    _, plan = varlen_attention(q, k, v, cu_seqlens, 33, prune_threshold=limit, counts=counts, backend=backend)
    assert plan.dest.cpu().tolist() == list(range(q.shape[0]))
    assert torch.equal(plan.cu_seqlens_out.cpu(), cu_seqlens.cpu()) and counts.cpu().tolist() == list(lengths)
    q[25, 1, 3] = math.nan
    _, plan = varlen_attention(
        q, k, v, cu_seqlens, 33, prune_threshold=torch.tensor([1.5], device=DEVICE), backend=backend
    )
    assert plan.importance[20:53].isnan().all() and plan.dest[20:53].cpu().tolist() == [
        int(plan.cu_seqlens_out[1]) + j for j in range(33)
    ]
    assert int(plan.cu_seqlens_out[1]) < 20 and int(plan.cu_seqlens_out[2]) - int(plan.cu_seqlens_out[1]) == 33


def _threshold(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=DEVICE)


BAD_PLANS = {
    "keep-first-not-bool": (dict(prune_threshold=_threshold(1.0), keep_first=1), TypeError, "keep_first must be"),
    "keep-first-alone": (dict(keep_first=True), ValueError, "keep_first belongs to the pruning plan"),
    "alive-alone": (dict(alive=torch.ones(2, dtype=torch.bool)), ValueError, "alive belongs"),
    "counts-alone": (dict(counts=torch.zeros(2, dtype=torch.int64)), ValueError, "counts belongs"),
    "with-importance": (
        dict(prune_threshold=_threshold(1.0), return_importance=True),
        ValueError,
        "leave return_importance off",
    ),
    "threshold-float": (dict(prune_threshold=1.0), TypeError, "prune_threshold must be a torch.Tensor"),
    "threshold-float64": (dict(prune_threshold=_threshold(1.0, dtype=torch.float64)), TypeError, "prune_threshold"),
    "threshold-two": (dict(prune_threshold=_threshold(1.0, 2.0)), ValueError, "prune_threshold must be a \\(1,\\)"),
    "alive-int": (dict(prune_threshold=_threshold(1.0), alive=torch.ones(2, dtype=torch.int32)), TypeError, "alive"),
    "alive-short": (dict(prune_threshold=_threshold(1.0), alive=torch.ones(1, dtype=torch.bool)), ValueError, "alive"),
    "counts-int32": (
        dict(prune_threshold=_threshold(1.0), counts=torch.zeros(2, dtype=torch.int32)),
        TypeError,
        "counts",
    ),
    "counts-long": (
        dict(prune_threshold=_threshold(1.0), counts=torch.zeros(3, dtype=torch.int64)),
        ValueError,
        "counts",
    ),
}


@pytest.mark.usefixtures("no_kernel_runs")
@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_bad_plan_arguments_raise_before_any_kernel(case: str) -> None:
    changes, error, message = BAD_PLANS[case]
    changes = {name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in changes.items()}
    with pytest.raises(error, match=message):
        varlen_attention(**_valid(), **changes)
