"""Tests of ``prune_tokens``, ``drop_sequences`` and ``scatter_rows`` against per-sequence Python loops.

Both backends run every case; the outputs are copies and integers, so they must match the loops exactly. Kernel
outputs are allocated poisoned (``torch.empty`` patched to fill with NaN or an extreme integer), so a row or
offset that no kernel writes shows.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mp_kernels
from mp_kernels import compaction
from mp_kernels._triton import compaction as triton_compaction
from tests.utils import DEVICE, KERNEL_DTYPES, poison_, poisoned_allocations
from tests.utils import HYPOTHESIS_SETTINGS as SETTINGS

BACKENDS = ["triton", "torch"]
# Importance and thresholds on a grid of eighths: exactly representable, so ties with the threshold happen.
GRID = 8


def make_cu_seqlens(lengths: list[int]) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=DEVICE)


def make_hidden(total: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(total, width, generator=generator).to(dtype=dtype, device=DEVICE)


def float32_value(value: float) -> float:
    """``value`` rounded to float32, as the kernels compare it."""
    return torch.tensor(value, dtype=torch.float32).item()


def prune_loop(
    importance: torch.Tensor, cu_seqlens: torch.Tensor, threshold: float | torch.Tensor, keep_first: bool
) -> tuple[list[int], list[int]]:
    """Kept rows and the kept prefix sum, one sequence and one token at a time.

    A token stays iff ``not importance <= threshold``: a NaN on either side keeps it (the NaN policy).
    """
    scores = importance.tolist()
    cu = cu_seqlens.tolist()
    kept: list[int] = []
    cu_kept = [0]
    for b in range(len(cu) - 1):
        limit = threshold[b].item() if isinstance(threshold, torch.Tensor) else float32_value(threshold)
        for j in range(cu[b], cu[b + 1]):
            if not scores[j] <= limit or (keep_first and j == cu[b]):
                kept.append(j)
        cu_kept.append(len(kept))
    return kept, cu_kept


@st.composite
def prune_cases(draw: st.DrawFn) -> dict[str, object]:
    lengths = draw(st.lists(st.integers(0, 64), min_size=1, max_size=8))
    if draw(st.booleans()):
        lengths = [max(n, 1) for n in lengths]
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    total, batch = sum(lengths), len(lengths)
    importance = (torch.randint(0, GRID + 1, (total,), generator=generator) / GRID).to(DEVICE)
    mode = draw(st.sampled_from(["grid", "per_sequence", "keep_all", "keep_none", "off_grid"]))
    threshold: float | torch.Tensor
    if mode == "grid":
        threshold = draw(st.integers(0, GRID)) / GRID
    elif mode == "per_sequence":
        threshold = (torch.randint(0, GRID + 1, (batch,), generator=generator) / GRID).to(DEVICE)
    elif mode == "keep_all":
        threshold = draw(st.sampled_from([-1.0, float("-inf")]))
    elif mode == "keep_none":
        threshold = draw(st.sampled_from([1.0, 2.0, float("inf")]))
    else:
        threshold = draw(st.floats(-0.1, 1.1))
    return {
        "lengths": lengths,
        "hidden": make_hidden(total, draw(st.sampled_from([16, 40])), draw(st.sampled_from(KERNEL_DTYPES)), seed),
        "importance": importance,
        "threshold": threshold,
        "keep_first": draw(st.booleans()),
    }


def check_prune(
    backend: str,
    hidden: torch.Tensor,
    importance: torch.Tensor,
    cu_seqlens: torch.Tensor,
    threshold: float | torch.Tensor,
    keep_first: bool,
) -> None:
    """Run ``prune_tokens`` poisoned and compare every output with ``prune_loop``."""
    with poisoned_allocations():
        hidden_kept, cu_kept, max_kept, kept_index = mp_kernels.prune_tokens(
            hidden, importance, cu_seqlens, threshold, keep_first=keep_first, backend=backend
        )
    rows, cu_expected = prune_loop(importance, cu_seqlens, threshold, keep_first)
    lengths = [cu_expected[b + 1] - cu_expected[b] for b in range(len(cu_expected) - 1)]
    assert kept_index.dtype == torch.int64 and kept_index.tolist() == rows
    assert cu_kept.dtype == torch.int32 and cu_kept.tolist() == cu_expected
    assert isinstance(max_kept, int) and max_kept == max(lengths)
    assert hidden_kept.dtype == hidden.dtype and hidden_kept.shape == (len(rows), hidden.shape[1])
    assert torch.equal(hidden_kept, hidden[torch.tensor(rows, dtype=torch.long, device=DEVICE)])
    if keep_first:
        original = cu_seqlens.tolist()
        assert all(lengths[b] >= 1 for b in range(len(lengths)) if original[b + 1] > original[b])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=prune_cases())
def test_prune_tokens_matches_loop(backend: str, case: dict[str, object]) -> None:
    cu_seqlens = make_cu_seqlens(case["lengths"])
    check_prune(backend, case["hidden"], case["importance"], cu_seqlens, case["threshold"], case["keep_first"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_prune_tokens_large_batch_and_long_sequence(backend: str, dtype: torch.dtype) -> None:
    """Several mask blocks and scan chunks: 1500 short sequences (some empty) and one of 3000 tokens."""
    generator = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 4, (1500,), generator=generator).tolist() + [3000]
    total = sum(lengths)
    importance = torch.rand(total, generator=generator).to(DEVICE)
    threshold = (torch.rand(len(lengths), generator=generator) * 0.8).to(DEVICE)
    hidden = make_hidden(total, 16, dtype, 1)
    cu_seqlens = make_cu_seqlens(lengths)
    check_prune(backend, hidden, importance, cu_seqlens, threshold, True)
    check_prune(backend, hidden, importance, cu_seqlens, 0.5, False)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("keep_first", [True, False])
def test_triton_matches_reference(dtype: torch.dtype, keep_first: bool) -> None:
    """The Triton path returns exactly the reference's outputs, for pruning and for dropping sequences."""
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 0, 17, 1, 64, 0, 2]
    total = sum(lengths)
    importance = torch.rand(total, generator=generator).to(DEVICE)
    threshold = torch.rand(len(lengths), generator=generator).to(DEVICE)
    keep = torch.tensor([True, True, False, True, False, False, True], device=DEVICE)
    hidden = make_hidden(total, 40, dtype, 2)
    cu_seqlens = make_cu_seqlens(lengths)
    pairs = [
        (
            triton_compaction.prune_tokens_triton(hidden, importance, cu_seqlens, threshold, keep_first),
            compaction.prune_tokens_torch(hidden, importance, cu_seqlens, threshold, keep_first),
        ),
        (
            triton_compaction.drop_sequences_triton(hidden, cu_seqlens, keep, torch.arange(7, device=DEVICE)),
            compaction.drop_sequences_torch(hidden, cu_seqlens, keep, torch.arange(7, device=DEVICE)),
        ),
    ]
    for got, want in pairs:
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_importance_is_kept(backend: str) -> None:
    """NaN policy: a NaN never removes anything, whatever the threshold (float or per sequence)."""
    lengths = [5, 0, 9, 1]
    importance = (torch.arange(15, device=DEVICE) % GRID / GRID).float()
    importance[[0, 3, 7, 14]] = float("nan")
    hidden = make_hidden(15, 16, torch.float32, seed=1)
    check_prune(backend, hidden, importance, make_cu_seqlens(lengths), 2.0, False)
    check_prune(backend, hidden, importance, make_cu_seqlens(lengths), torch.full((4,), 0.5, device=DEVICE), False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_sequence_threshold_keeps_the_whole_sequence(backend: str) -> None:
    lengths = [5, 4, 6]
    importance = (torch.arange(15, device=DEVICE) % GRID / GRID).float()
    threshold = torch.tensor([2.0, float("nan"), 0.25], device=DEVICE)
    hidden = make_hidden(15, 16, torch.float32, seed=2)
    _, cu_kept, _, kept_index = mp_kernels.prune_tokens(
        hidden, importance, make_cu_seqlens(lengths), threshold, keep_first=False, backend=backend
    )
    assert set(range(5, 9)) <= set(kept_index.tolist()) and cu_kept[2] - cu_kept[1] == 4
    check_prune(backend, hidden, importance, make_cu_seqlens(lengths), threshold, True)


def test_prune_tokens_float64_on_torch_backend() -> None:
    lengths = [3, 0, 9]
    importance = torch.tensor([0.5, 0.1, 0.7, 0.2, 0.9, 0.25, 0.25, 0.3, 0.0, 1.0, 0.5, 0.4], dtype=torch.float64)
    threshold = torch.tensor([0.6, 0.0, 0.25], dtype=torch.float64, device=DEVICE)
    hidden = make_hidden(sum(lengths), 16, torch.float64, 4)
    check_prune("torch", hidden, importance.to(DEVICE), make_cu_seqlens(lengths), threshold, True)


def drop_loop(
    cu_seqlens: torch.Tensor, keep: torch.Tensor, seq_index: torch.Tensor
) -> tuple[list[int], list[int], list[int]]:
    """Kept token rows, kept prefix sum and kept ``seq_index``, one sequence at a time."""
    cu = cu_seqlens.tolist()
    rows: list[int] = []
    cu_kept = [0]
    index: list[int] = []
    for b, stays in enumerate(keep.tolist()):
        if stays:
            rows.extend(range(cu[b], cu[b + 1]))
            cu_kept.append(len(rows))
            index.append(seq_index[b].item())
    return rows, cu_kept, index


@st.composite
def drop_cases(draw: st.DrawFn) -> dict[str, object]:
    lengths = draw(st.lists(st.integers(0, 64), min_size=1, max_size=10))
    batch = len(lengths)
    keep = draw(
        st.one_of(
            st.lists(st.booleans(), min_size=batch, max_size=batch),
            st.just([False] * batch),
            st.just([True] * batch),
        )
    )
    seed = draw(st.integers(0, 2**16))
    order = torch.randperm(batch, generator=torch.Generator().manual_seed(seed))
    return {
        "lengths": lengths,
        "hidden": make_hidden(
            sum(lengths), draw(st.sampled_from([16, 40])), draw(st.sampled_from(KERNEL_DTYPES)), seed
        ),
        "keep": torch.tensor(keep, dtype=torch.bool, device=DEVICE),
        "seq_index": (order * 3 + 2**33).to(DEVICE),
    }


def check_drop(
    backend: str, hidden: torch.Tensor, cu_seqlens: torch.Tensor, keep: torch.Tensor, seq_index: torch.Tensor
) -> None:
    with poisoned_allocations():
        hidden_kept, cu_kept, max_kept, index_kept = mp_kernels.drop_sequences(
            hidden, cu_seqlens, keep, seq_index, backend=backend
        )
    rows, cu_expected, index_expected = drop_loop(cu_seqlens, keep, seq_index)
    assert cu_kept.dtype == torch.int32 and cu_kept.tolist() == cu_expected
    lengths = [cu_expected[i + 1] - cu_expected[i] for i in range(len(cu_expected) - 1)]
    assert isinstance(max_kept, int) and max_kept == max(lengths, default=0)
    assert index_kept.dtype == torch.int64 and index_kept.tolist() == index_expected
    assert hidden_kept.dtype == hidden.dtype and hidden_kept.shape == (len(rows), hidden.shape[1])
    assert torch.equal(hidden_kept, hidden[torch.tensor(rows, dtype=torch.long, device=DEVICE)])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=drop_cases())
def test_drop_sequences_matches_loop(backend: str, case: dict[str, object]) -> None:
    cu_seqlens = make_cu_seqlens(case["lengths"])
    check_drop(backend, case["hidden"], cu_seqlens, case["keep"], case["seq_index"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_every_sequence(backend: str) -> None:
    hidden = make_hidden(7, 16, torch.float32, 0)
    keep = torch.zeros(3, dtype=torch.bool, device=DEVICE)
    seq_index = torch.arange(3, device=DEVICE)
    hidden_kept, cu_kept, max_kept, index_kept = mp_kernels.drop_sequences(
        hidden, make_cu_seqlens([2, 0, 5]), keep, seq_index, backend=backend
    )
    assert hidden_kept.shape == (0, 16)
    assert cu_kept.tolist() == [0] and max_kept == 0 and index_kept.tolist() == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_sequences_large_batch(backend: str) -> None:
    """More sequences than one scan chunk, and a long one."""
    generator = torch.Generator().manual_seed(5)
    lengths = torch.randint(0, 4, (1500,), generator=generator).tolist() + [1200]
    keep = (torch.rand(len(lengths), generator=generator) < 0.5).to(DEVICE)
    keep[-1] = True
    seq_index = torch.arange(len(lengths), device=DEVICE)
    check_drop(backend, make_hidden(sum(lengths), 16, torch.float16, 3), make_cu_seqlens(lengths), keep, seq_index)


def scatter_loop(out: torch.Tensor, rows: torch.Tensor, index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    expected = out.clone()
    for i, selected in enumerate(mask.tolist()):
        if selected:
            expected[index[i].item()] = rows[i]
    return expected


@st.composite
def scatter_cases(draw: st.DrawFn) -> dict[str, object]:
    n_out = draw(st.integers(1, 70))
    n_rows = draw(st.integers(0, n_out))
    width = draw(st.sampled_from([None, 1, 3, 40]))
    dtype = draw(st.sampled_from([*KERNEL_DTYPES, torch.int64]))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    shape = (n_rows,) if width is None else (n_rows, width)
    rows = (torch.randn(shape, generator=generator) * 100).to(dtype)
    out = poison_(torch.empty((n_out, *shape[1:]), dtype=dtype))
    mask = torch.rand(n_rows, generator=generator) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    index = torch.randperm(n_out, generator=generator)[:n_rows]
    return {"out": out.to(DEVICE), "rows": rows.to(DEVICE), "index": index.to(DEVICE), "mask": mask.to(DEVICE)}


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=scatter_cases())
def test_scatter_rows_matches_loop(backend: str, case: dict[str, object]) -> None:
    out, rows, index, mask = case["out"], case["rows"], case["index"], case["mask"]
    expected = scatter_loop(out, rows, index, mask)
    returned = mp_kernels.scatter_rows(out, rows, index, mask, backend=backend)
    assert returned is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.out_of_range
def test_scatter_rows_triton_skips_out_of_range_without_validation() -> None:
    out = torch.zeros(4, 2, device=DEVICE)
    rows = torch.ones(3, 2, device=DEVICE)
    index = torch.tensor([1, 4, -1], device=DEVICE)
    mask = torch.ones(3, dtype=torch.bool, device=DEVICE)
    mp_kernels.scatter_rows(out, rows, index, mask, backend="triton", validate=False)
    assert out.tolist() == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]
