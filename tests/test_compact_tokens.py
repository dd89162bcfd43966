"""``compact_tokens`` against a per-sequence Python loop, on both backends: packing, pruning, dropping.

The outputs are row copies and integers, so they must match the loop exactly. Triton outputs are allocated
poisoned (``torch.empty`` patched), so a row or offset no kernel writes shows; rows past the kept ones are not
compared (they are unspecified).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mp_kernels import compact_tokens
from tests.utils import DEVICE, HYPOTHESIS_SETTINGS, KERNEL_DTYPES, poisoned_allocations

BACKENDS = ["triton", "torch"]
LENGTHS = [37, 1, 0, 61, 2, 31, 64, 13]


def loop_oracle(hidden, cu_seqlens, keep, importance, threshold, keep_first, alive):
    """Kept rows and per-slot counts, one token at a time (float64 arithmetic for the threshold).

    The importance rule is ``not importance <= limit``: a NaN importance or threshold keeps the token.
    """
    bounds = cu_seqlens.tolist()
    rows, counts = [], []
    for slot in range(len(bounds) - 1):
        start, end = bounds[slot], bounds[slot + 1]
        n = end - start
        kept = 0
        for j in range(start, end):
            chosen = True
            if keep is not None:
                chosen = bool(keep[j])
            if importance is not None:
                limit = float(torch.tensor(float(threshold[0])) / torch.tensor(float(max(n, 1))))
                chosen = chosen and (float(threshold[0]) <= 0 or not float(importance[j]) <= limit)
            if keep_first and j == start:
                chosen = True
            if alive is not None and not bool(alive[slot]):
                chosen = False
            if chosen:
                rows.append(j)
                kept += 1
        counts.append(kept)
    return rows, counts


def make_case(lengths, width, dtype, seed, spare=3):
    """Packed rows (with ``spare`` dead rows past the live ones), importance on a grid of eighths (ties)."""
    generator = torch.Generator().manual_seed(seed)
    live = sum(lengths)
    capacity = live + spare
    hidden = torch.randn(capacity, width, generator=generator).to(DEVICE, dtype)
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)
    importance = (torch.randint(0, 17, (capacity,), generator=generator).float() / 8 / 16).to(DEVICE)
    keep = (torch.rand(capacity, generator=generator) > 0.4).to(DEVICE)
    alive = (torch.rand(len(lengths), generator=generator) > 0.3).to(DEVICE)
    return hidden, cu.to(DEVICE), importance, keep, alive


def check(hidden, cu, max_seqlen, backend, **rule):
    counts = torch.full((cu.numel() - 1,), -7, dtype=torch.int64, device=DEVICE)
    with poisoned_allocations():
        out, cu_out = compact_tokens(hidden, cu, max_seqlen, counts=counts, backend=backend, **rule)
    rows, expected_counts = loop_oracle(
        hidden.cpu(),
        cu.cpu(),
        *(None if rule.get(n) is None else rule[n].cpu() for n in ("keep", "importance", "threshold")),
        rule.get("keep_first", False),
        None if rule.get("alive") is None else rule["alive"].cpu(),
    )
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    assert counts.tolist() == expected_counts
    assert cu_out.tolist() == [0, *torch.tensor(expected_counts, dtype=torch.int64).cumsum(0).tolist()]
    assert torch.equal(out[: len(rows)].cpu(), hidden.cpu()[rows])


RULES = {
    "pack": lambda imp, keep, alive: dict(keep=keep),
    "prune": lambda imp, keep, alive: dict(importance=imp, threshold=torch.tensor([0.75], device=DEVICE)),
    "prune-keep-first": lambda imp, keep, alive: dict(
        importance=imp, threshold=torch.tensor([1.0], device=DEVICE), keep_first=True
    ),
    "prune-and-drop": lambda imp, keep, alive: dict(
        importance=imp, threshold=torch.tensor([0.5], device=DEVICE), keep_first=True, alive=alive
    ),
    "threshold-zero-keeps-all": lambda imp, keep, alive: dict(importance=imp, threshold=torch.zeros(1, device=DEVICE)),
    "drop": lambda imp, keep, alive: dict(alive=alive),
    "drop-none": lambda imp, keep, alive: dict(alive=torch.ones_like(alive)),
    "drop-all": lambda imp, keep, alive: dict(alive=torch.zeros_like(alive)),
    "copy": lambda imp, keep, alive: dict(),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", list(RULES))
def test_matches_the_loop(backend: str, rule: str) -> None:
    hidden, cu, importance, keep, alive = make_case(LENGTHS, 24, torch.float32, seed=3)
    check(hidden, cu, max(LENGTHS), backend, **RULES[rule](importance, keep, alive))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_every_dtype_moves_rows_bit_for_bit(backend: str, dtype: torch.dtype) -> None:
    hidden, cu, importance, keep, alive = make_case(LENGTHS, 40, dtype, seed=4)
    check(hidden, cu, 64, backend, importance=importance, threshold=torch.tensor([0.75], device=DEVICE), alive=alive)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packs_a_padded_batch(backend: str) -> None:
    """Slots of a padded ``(batch, width)`` batch, any padding side: the mask selects the real tokens."""
    batch, width = 5, 16
    mask = torch.zeros(batch, width, dtype=torch.bool)
    mask[0, :16] = True
    mask[1, 3:] = True
    mask[3, :1] = True
    mask[4, 5:9] = True
    hidden = torch.randn(batch * width, 32).to(DEVICE)
    cu = torch.arange(0, batch * width + 1, width, dtype=torch.int32, device=DEVICE)
    out, cu_out = compact_tokens(hidden, cu, width, keep=mask.view(-1).to(DEVICE), backend=backend)
    assert cu_out.tolist() == [0, *mask.sum(1).cumsum(0).tolist()]
    assert torch.equal(out[: int(mask.sum())].cpu(), hidden.cpu()[mask.view(-1)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_importance_keeps_the_token(backend: str) -> None:
    """NaN policy: a NaN never removes anything; the NaN tokens stay, the others follow the threshold."""
    hidden, cu, importance, keep, alive = make_case(LENGTHS, 16, torch.float32, seed=5)
    importance[::3] = float("nan")
    check(hidden, cu, max(LENGTHS), backend, importance=importance, threshold=torch.tensor([0.75], device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_threshold_keeps_every_token(backend: str) -> None:
    hidden, cu, importance, keep, alive = make_case(LENGTHS, 16, torch.float32, seed=6)
    threshold = torch.tensor([float("nan")], device=DEVICE)
    counts = torch.zeros(len(LENGTHS), dtype=torch.int64, device=DEVICE)
    _, cu_out = compact_tokens(
        hidden, cu, max(LENGTHS), importance=importance, threshold=threshold, counts=counts, backend=backend
    )
    assert counts.tolist() == LENGTHS and torch.equal(cu_out.cpu(), cu.cpu())
    check(hidden, cu, max(LENGTHS), backend, importance=importance, threshold=threshold, alive=alive)


@pytest.mark.out_of_range
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["prune-and-drop", "drop"])
def test_max_seqlen_below_the_longest_is_slower_never_wrong(backend: str, rule: str) -> None:
    """Without validation ``max_seqlen`` only sizes the grid: lengths up to 64 with ``max_seqlen=1`` still move."""
    hidden, cu, importance, keep, alive = make_case(LENGTHS, 16, torch.float32, seed=7)
    check(hidden, cu, 1, backend, validate=False, **RULES[rule](importance, keep, alive))


@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    seed=st.integers(0, 2**16),
    rule=st.sampled_from(list(RULES)),
)
@HYPOTHESIS_SETTINGS
def test_random_batches_match_the_loop(lengths: list[int], seed: int, rule: str) -> None:
    hidden, cu, importance, keep, alive = make_case(lengths, 16, torch.float32, seed=seed)
    for backend in BACKENDS:
        check(hidden, cu, max(max(lengths), 1), backend, **RULES[rule](importance, keep, alive))


def _case():
    hidden, cu, importance, keep, alive = make_case([3, 5], 16, torch.float32, seed=0)
    return dict(hidden=hidden, cu_seqlens=cu, max_seqlen=5, keep=keep, alive=alive, importance=None, threshold=None)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda c: {**c, "hidden": c["hidden"].tolist()}, TypeError, "hidden"),
        (lambda c: {**c, "hidden": c["hidden"][:0]}, ValueError, "hidden"),
        (lambda c: {**c, "cu_seqlens": c["cu_seqlens"].long()}, TypeError, "cu_seqlens"),
        (lambda c: {**c, "max_seqlen": 4.0}, TypeError, "max_seqlen"),
        (lambda c: {**c, "max_seqlen": 0}, ValueError, "max_seqlen"),
        (lambda c: {**c, "max_seqlen": 4}, ValueError, "max_seqlen"),
        (lambda c: {**c, "keep": c["keep"][:3]}, ValueError, "keep"),
        (lambda c: {**c, "keep": c["keep"].int()}, TypeError, "keep"),
        (lambda c: {**c, "importance": torch.zeros(11, device=DEVICE)}, ValueError, "threshold"),
        (
            lambda c: {**c, "importance": torch.zeros(11, device=DEVICE), "threshold": torch.zeros(2, device=DEVICE)},
            ValueError,
            "threshold",
        ),
        (lambda c: {**c, "alive": c["alive"][:1]}, ValueError, "alive"),
        (lambda c: {**c, "cu_seqlens": torch.tensor([0, 9, 4], dtype=torch.int32, device=DEVICE)}, ValueError, "non"),
        (lambda c: {**c, "cu_seqlens": torch.tensor([0, 3, 12], dtype=torch.int32, device=DEVICE)}, ValueError, "end"),
        (lambda c: {**c, "backend": "cuda"}, ValueError, "backend"),
    ],
)
def test_bad_inputs_raise(change, error, match) -> None:
    case = change(_case())
    hidden, cu, max_seqlen = case.pop("hidden"), case.pop("cu_seqlens"), case.pop("max_seqlen")
    with pytest.raises(error, match=match):
        compact_tokens(hidden, cu, max_seqlen, **case)
