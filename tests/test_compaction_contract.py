"""The contract of ``prune_tokens``, ``drop_sequences`` and ``scatter_rows`` around their results.

Bad inputs raise a ``TypeError`` or ``ValueError`` naming the argument before any kernel runs (both backends'
kernels are replaced by a function that fails); tensors on another device are rejected; on a GPU each call makes
at most one host synchronisation (``scatter_rows`` none). Their results are specified in ``test_compaction.py``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch

import mp_kernels
from mp_kernels import compaction
from mp_kernels._triton import compaction as triton_compaction
from tests.test_compaction import make_cu_seqlens, make_hidden
from tests.utils import DEVICE, ON_GPU


def _prune_args(**changes: object) -> dict[str, object]:
    hidden = make_hidden(6, 16, torch.float32, 0)
    args: dict[str, object] = {
        "hidden": hidden,
        "importance": torch.rand(6, device=DEVICE),
        "cu_seqlens": make_cu_seqlens([2, 4]),
        "threshold": 0.5,
    }
    args.update(changes)
    return args


def _drop_args(**changes: object) -> dict[str, object]:
    args: dict[str, object] = {
        "hidden": make_hidden(6, 16, torch.float32, 0),
        "cu_seqlens": make_cu_seqlens([2, 4]),
        "keep": torch.tensor([True, False], device=DEVICE),
        "seq_index": torch.tensor([0, 1], device=DEVICE),
    }
    args.update(changes)
    return args


def _scatter_args(**changes: object) -> dict[str, object]:
    args: dict[str, object] = {
        "out": torch.zeros(5, 3, device=DEVICE),
        "rows": torch.ones(2, 3, device=DEVICE),
        "index": torch.tensor([0, 4], device=DEVICE),
        "mask": torch.tensor([True, True], device=DEVICE),
    }
    args.update(changes)
    return args


def _cu(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


BAD_INPUTS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    (
        "prune hidden dtype",
        lambda: _prune_args(hidden=torch.ones(6, 16, dtype=torch.int32, device=DEVICE)),
        TypeError,
        "hidden",
    ),
    ("prune hidden ndim", lambda: _prune_args(hidden=torch.ones(6, device=DEVICE)), ValueError, "hidden"),
    ("prune hidden strided", lambda: _prune_args(hidden=torch.ones(16, 6, device=DEVICE).t()), ValueError, "hidden"),
    ("prune hidden width 0", lambda: _prune_args(hidden=torch.ones(6, 0, device=DEVICE)), ValueError, "hidden"),
    (
        "prune importance dtype",
        lambda: _prune_args(importance=torch.ones(6, dtype=torch.float16, device=DEVICE)),
        TypeError,
        "importance",
    ),
    ("prune importance shape", lambda: _prune_args(importance=torch.ones(5, device=DEVICE)), ValueError, "importance"),
    (
        "prune importance float64",
        lambda: _prune_args(importance=torch.ones(6, dtype=torch.float64, device=DEVICE)),
        TypeError,
        "importance",
    ),
    (
        "prune importance strided",
        lambda: _prune_args(importance=torch.ones(12, device=DEVICE)[::2]),
        ValueError,
        "importance",
    ),
    ("prune cu dtype", lambda: _prune_args(cu_seqlens=torch.tensor([0, 2, 6], device=DEVICE)), TypeError, "cu_seqlens"),
    ("prune cu start", lambda: _prune_args(cu_seqlens=_cu([1, 2, 6])), ValueError, "cu_seqlens must start at 0"),
    ("prune cu decreasing", lambda: _prune_args(cu_seqlens=_cu([0, 4, 3, 6])), ValueError, "non-decreasing"),
    ("prune cu end", lambda: _prune_args(cu_seqlens=_cu([0, 2, 5])), ValueError, "cu_seqlens must end"),
    ("prune empty batch", lambda: _prune_args(cu_seqlens=_cu([0])), ValueError, "batch is empty"),
    ("prune threshold length", lambda: _prune_args(threshold=torch.ones(3, device=DEVICE)), ValueError, "threshold"),
    (
        "prune threshold dtype",
        lambda: _prune_args(threshold=torch.ones(2, dtype=torch.float64, device=DEVICE)),
        TypeError,
        "threshold",
    ),
    ("prune threshold type", lambda: _prune_args(threshold="0.5"), TypeError, "threshold"),
    ("prune threshold bool", lambda: _prune_args(threshold=True), TypeError, "threshold"),
    ("prune threshold nan", lambda: _prune_args(threshold=float("nan")), ValueError, "threshold"),
    ("prune keep_first", lambda: _prune_args(keep_first=1), TypeError, "keep_first"),
    ("prune backend", lambda: _prune_args(backend="cuda"), ValueError, "backend"),
    (
        "prune float64 on triton",
        lambda: _prune_args(
            hidden=torch.ones(6, 16, dtype=torch.float64, device=DEVICE),
            importance=torch.ones(6, dtype=torch.float64, device=DEVICE),
            backend="triton",
        ),
        TypeError,
        "hidden",
    ),
    ("drop keep dtype", lambda: _drop_args(keep=torch.tensor([1, 0], device=DEVICE)), TypeError, "keep"),
    ("drop keep length", lambda: _drop_args(keep=torch.ones(3, dtype=torch.bool, device=DEVICE)), ValueError, "keep"),
    (
        "drop seq_index dtype",
        lambda: _drop_args(seq_index=torch.tensor([0, 1], dtype=torch.int32, device=DEVICE)),
        TypeError,
        "seq_index",
    ),
    ("drop seq_index length", lambda: _drop_args(seq_index=torch.arange(1, device=DEVICE)), ValueError, "seq_index"),
    ("drop cu end", lambda: _drop_args(cu_seqlens=_cu([0, 2, 7])), ValueError, "cu_seqlens must end"),
    ("drop empty batch", lambda: _drop_args(cu_seqlens=_cu([0])), ValueError, "batch is empty"),
    (
        "drop hidden dtype",
        lambda: _drop_args(hidden=torch.ones(6, 16, dtype=torch.int64, device=DEVICE)),
        TypeError,
        "hidden",
    ),
    ("scatter out ndim", lambda: _scatter_args(out=torch.zeros(5, 3, 1, device=DEVICE)), ValueError, "out"),
    ("scatter out strided", lambda: _scatter_args(out=torch.zeros(3, 5, device=DEVICE).t()), ValueError, "out"),
    (
        "scatter rows dtype",
        lambda: _scatter_args(rows=torch.ones(2, 3, dtype=torch.float64, device=DEVICE)),
        TypeError,
        "rows",
    ),
    ("scatter rows width", lambda: _scatter_args(rows=torch.ones(2, 4, device=DEVICE)), ValueError, "rows"),
    ("scatter rows ndim", lambda: _scatter_args(rows=torch.ones(2, device=DEVICE)), ValueError, "rows"),
    ("scatter index dtype", lambda: _scatter_args(index=_cu([0, 4])), TypeError, "index"),
    ("scatter index length", lambda: _scatter_args(index=torch.tensor([0], device=DEVICE)), ValueError, "index"),
    ("scatter mask dtype", lambda: _scatter_args(mask=torch.tensor([1, 1], device=DEVICE)), TypeError, "mask"),
    (
        "scatter mask length",
        lambda: _scatter_args(mask=torch.ones(3, dtype=torch.bool, device=DEVICE)),
        ValueError,
        "mask",
    ),
    ("scatter index high", lambda: _scatter_args(index=torch.tensor([0, 5], device=DEVICE)), ValueError, "index"),
    ("scatter index negative", lambda: _scatter_args(index=torch.tensor([-1, 4], device=DEVICE)), ValueError, "index"),
]


FUNCTIONS = {"prune": mp_kernels.prune_tokens, "drop": mp_kernels.drop_sequences, "scatter": mp_kernels.scatter_rows}


def _fail(*args: object, **kwargs: object) -> None:
    raise AssertionError("a kernel ran before the inputs were checked")


@pytest.mark.parametrize(("label", "make", "error", "match"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_inputs_raise_before_any_kernel(
    label: str, make: Callable[[], dict[str, object]], error: type[Exception], match: str, monkeypatch
) -> None:
    for name in ("prune_tokens", "drop_sequences", "scatter_rows"):
        monkeypatch.setattr(compaction, f"{name}_torch", _fail)
        monkeypatch.setattr(triton_compaction, f"{name}_triton", _fail)
    with pytest.raises(error, match=match):
        FUNCTIONS[label.split()[0]](**make())


def test_selected_index_only_is_checked() -> None:
    """An out-of-range index whose row is not selected is never used, so it is not an error."""
    args = _scatter_args(index=torch.tensor([0, 9], device=DEVICE), mask=torch.tensor([True, False], device=DEVICE))
    out = mp_kernels.scatter_rows(**args)
    assert out[0].tolist() == [1.0, 1.0, 1.0] and out[1:].sum().item() == 0.0


@pytest.mark.skipif(not ON_GPU, reason="device mismatch needs a GPU")
def test_inputs_on_another_device_are_rejected() -> None:
    with pytest.raises(ValueError, match="importance"):
        mp_kernels.prune_tokens(**_prune_args(importance=torch.rand(6)))
    with pytest.raises(ValueError, match="threshold"):
        mp_kernels.prune_tokens(**_prune_args(threshold=torch.ones(2)))
    with pytest.raises(ValueError, match="cu_seqlens"):
        mp_kernels.prune_tokens(**_prune_args(cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32)))
    with pytest.raises(ValueError, match="keep"):
        mp_kernels.drop_sequences(**_drop_args(keep=torch.tensor([True, False])))
    with pytest.raises(ValueError, match="rows"):
        mp_kernels.scatter_rows(**_scatter_args(rows=torch.ones(2, 3)))


@pytest.mark.skipif(not ON_GPU, reason="host synchronisations are only observable on a GPU")
def test_at_most_one_host_synchronisation() -> None:
    lengths = [5, 0, 17, 64]
    cu_seqlens = make_cu_seqlens(lengths)
    hidden = make_hidden(sum(lengths), 64, torch.float16, 0)
    importance = torch.rand(sum(lengths), device=DEVICE)
    threshold = torch.full((4,), 0.5, device=DEVICE)
    keep = torch.tensor([True, False, True, True], device=DEVICE)
    args = _scatter_args()
    mp_kernels.prune_tokens(hidden, importance, cu_seqlens, threshold, validate=False)
    mp_kernels.drop_sequences(hidden, cu_seqlens, keep, torch.arange(4, device=DEVICE), validate=False)
    mp_kernels.scatter_rows(**args, validate=False)
    torch.cuda.synchronize()
    counts = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for run in (
            lambda: mp_kernels.prune_tokens(hidden, importance, cu_seqlens, threshold, validate=False),
            lambda: mp_kernels.drop_sequences(hidden, cu_seqlens, keep, torch.arange(4, device=DEVICE), validate=False),
            lambda: mp_kernels.scatter_rows(**args, validate=False),
        ):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run()
            counts.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert counts[0] <= 1 and counts[1] <= 1 and counts[2] == 0
