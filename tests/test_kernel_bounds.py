"""No Triton kernel of ``mp_kernels`` reads or writes outside its tensors, on normal inputs or out-of-range ones.

On the CPU every kernel runs under ``bounds_checked`` (``tests/bounds.py``): each address the interpreter touches
must lie inside a tensor argument of the launch, outputs allocated with ``torch.empty`` sit between guard zones
that must stay intact, and inputs are carved out of guarded buffers too (``zones.copy``), so that a stray float
read shows as NaN. The out-of-range cases are those the other kernel tests hand over with validation off or with
device-side counts outside ``[0, capacity]``: on a GPU a fault there poisons the whole test process. On a GPU the
guard zones still apply; ``bench.gpu_suite`` runs these tests under ``compute-sanitizer`` for the rest.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError

import mp_kernels
from tests.bounds import assert_no_sentinel, bounds_checked
from tests.utils import DEVICE, KERNEL_DTYPES, ON_GPU, assert_close, live_count

OUT_OF_RANGE = pytest.mark.out_of_range  # what the other tests hand over on purpose, and worse: alone on a GPU
interpreter_only = pytest.mark.skipif(ON_GPU, reason="the address check wraps the Triton interpreter")


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, extra, BLOCK: tl.constexpr):
    """Copies ``n`` elements, reading ``extra`` past the end unmasked (a deliberate fault for the checker)."""
    offsets = tl.arange(0, BLOCK)
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=offsets < n + extra), mask=offsets < n)


@interpreter_only
def test_the_checker_catches_a_read_past_the_end() -> None:
    with pytest.raises(InterpreterError, match="out-of-bounds load in _copy_kernel"):
        with bounds_checked() as zones:
            src = zones.copy(torch.arange(20, dtype=torch.float32))
            _copy_kernel[(1,)](src, torch.empty(20), 20, 1, BLOCK=32)


@interpreter_only
def test_the_checker_catches_a_write_past_the_end() -> None:
    with pytest.raises(InterpreterError, match="out-of-bounds store in _copy_kernel"):
        with bounds_checked() as zones:
            _copy_kernel[(1,)](zones.copy(torch.arange(20, dtype=torch.float32)), torch.empty(19), 20, 0, BLOCK=32)


def test_guard_zones_catch_a_stray_write() -> None:
    with pytest.raises(AssertionError, match="out-of-bounds write after a torch.int32 tensor of 4 elements"):
        with bounds_checked():
            inside = torch.empty(4, dtype=torch.int32, device=DEVICE)
            inside.as_strided((5,), (1,))[4] = 0


def lengths_cu(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(
    "live", [pytest.param(-3, marks=OUT_OF_RANGE), 0, 1, 23, 40, pytest.param(71, marks=OUT_OF_RANGE)]
)
def test_row_kernels_stay_inside_their_rows(dtype: torch.dtype, live: int) -> None:
    """``add_layer_norm`` and ``rows_linear`` with device-side row counts in and out of ``[0, capacity]``."""
    x, residual, weight = randn(40, 24, dtype=dtype), randn(40, 24, dtype=dtype, seed=1), randn(17, 24, dtype=dtype)
    gamma, beta, bias = randn(24, dtype=dtype, seed=2), randn(24, dtype=dtype, seed=3), randn(17, dtype=dtype)
    n = min(max(live, 0), 40)
    with bounds_checked() as zones:
        g = [zones.copy(t) for t in (x, residual, weight, gamma, beta, bias, live_count(live))]
        normed = mp_kernels.add_layer_norm(g[0], g[1], g[3], g[4], 1e-5, g[6], backend="triton")
        linear = mp_kernels.rows_linear(g[0], g[2], g[5], g[6], activation="gelu", backend="triton")
    want_normed = mp_kernels.add_layer_norm(x, residual, gamma, beta, 1e-5, live_count(live), backend="torch")
    want_linear = mp_kernels.rows_linear(x, weight, bias, live_count(live), activation="gelu", backend="torch")
    for got, want in ((normed, want_normed), (linear, want_linear)):
        assert_no_sentinel(got[:n])
        assert_close(got[:n], want[:n], dtype, scale=4.0)
        assert bool(got[n:].isnan().all())


@pytest.mark.parametrize(
    ("max_seqlen", "validate"),
    [(37, True), pytest.param(16, False, marks=OUT_OF_RANGE), pytest.param(1, False, marks=OUT_OF_RANGE)],
)
def test_attention_reads_only_its_sequences(max_seqlen: int, validate: bool) -> None:
    """``varlen_attention`` with a true ``max_seqlen`` and, without validation, ones below the longest length."""
    lengths = [37, 1, 0, 16]
    q, k, v = (randn(54, 2, 16, seed=seed) for seed in range(3))
    cu = lengths_cu(lengths)
    with bounds_checked() as zones:
        out, importance = mp_kernels.varlen_attention(
            *(zones.copy(t) for t in (q, k, v, cu)),
            max_seqlen,
            return_importance=True,
            backend="triton",
            validate=validate,
        )
    want, want_importance = mp_kernels.varlen_attention(q, k, v, cu, 37, return_importance=True, backend="torch")
    assert_no_sentinel(out)
    assert_close(out, want, torch.float32, scale=10.0)
    assert_close(importance, want_importance, torch.float32, scale=10.0)


@pytest.mark.parametrize("max_seqlen", [40, pytest.param(1, marks=OUT_OF_RANGE)])
@pytest.mark.parametrize("rule", ["prune-and-drop", "pack"])
def test_compact_tokens_moves_only_live_rows(max_seqlen: int, rule: str) -> None:
    """``compact_tokens`` with the true ``max_seqlen`` and, without validation, 1 (the grid's smallest)."""
    lengths = [37, 1, 0, 23]
    capacity = sum(lengths) + 3
    hidden, cu = randn(capacity, 24), lengths_cu(lengths)
    importance = torch.rand(capacity, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    extra = {
        "prune-and-drop": dict(
            importance=importance,
            threshold=torch.tensor([0.5], device=DEVICE),
            keep_first=True,
            alive=torch.tensor([True, True, False, True], device=DEVICE),
        ),
        "pack": dict(keep=importance > 0.3),
    }[rule]
    counts = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    want, want_cu = mp_kernels.compact_tokens(hidden, cu, 40, counts=counts.clone(), backend="torch", **extra)
    with bounds_checked() as zones:
        guarded = {name: zones.copy(t) if isinstance(t, torch.Tensor) else t for name, t in extra.items()}
        out, cu_out = mp_kernels.compact_tokens(
            zones.copy(hidden),
            zones.copy(cu),
            max_seqlen,
            counts=zones.copy(counts),
            backend="triton",
            validate=max_seqlen == 40,
            **guarded,
        )
    kept = int(want_cu[-1])
    assert torch.equal(cu_out.cpu(), want_cu.cpu())
    assert_no_sentinel(out[:kept])
    assert torch.equal(out[:kept].cpu(), want[:kept].cpu())


@pytest.mark.parametrize("threshold", [0.5, "per-sequence"])
def test_prune_and_drop_read_only_their_rows(threshold: float | str) -> None:
    lengths = [37, 1, 0, 23, 5]
    hidden, cu = randn(66, 24), lengths_cu(lengths)
    importance = torch.rand(66, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    limit = torch.tensor([0.5, 0.2, 0.9, 0.7, 0.1], device=DEVICE) if threshold == "per-sequence" else threshold
    keep = torch.tensor([True, False, True, True, True], device=DEVICE)
    seq_index = torch.arange(5, device=DEVICE)
    with bounds_checked() as zones:
        g = [zones.copy(t) for t in (hidden, importance, cu, keep, seq_index)]
        g_limit = zones.copy(limit) if isinstance(limit, torch.Tensor) else limit
        pruned = mp_kernels.prune_tokens(g[0], g[1], g[2], g_limit, backend="triton", validate=False)
        dropped = mp_kernels.drop_sequences(g[0], g[2], g[3], g[4], backend="triton", validate=False)
    want_pruned = mp_kernels.prune_tokens(hidden, importance, cu, limit, backend="torch")
    want_dropped = mp_kernels.drop_sequences(hidden, cu, keep, seq_index, backend="torch")
    for got, want in ((pruned, want_pruned), (dropped, want_dropped)):
        assert_no_sentinel(got[0])
        assert torch.equal(got[0].cpu(), want[0].cpu())
        assert torch.equal(got[1].cpu(), want[1].cpu()) and got[2] == want[2]
        assert torch.equal(got[3].cpu(), want[3].cpu())


@OUT_OF_RANGE
def test_scatter_rows_skips_indices_out_of_range() -> None:
    """Indices 4 (one past the end) and -1 are skipped without validation, as the compaction test expects."""
    rows, index = randn(5, 24), torch.tensor([1, 4, -1, 3, 2**40], device=DEVICE)
    mask = torch.tensor([True, True, True, False, True], device=DEVICE)
    with bounds_checked() as zones:
        out = zones.copy(torch.zeros(4, 24, device=DEVICE))
        mp_kernels.scatter_rows(
            out, zones.copy(rows), zones.copy(index), zones.copy(mask), backend="triton", validate=False
        )
    want = torch.zeros(4, 24, device=DEVICE)
    want[1] = rows[0]
    assert torch.equal(out.cpu(), want.cpu())


@pytest.mark.parametrize(("batch", "classes"), [(1, 2), (37, 3), (5, 300)])
def test_entropy_exit_reads_only_its_logits(batch: int, classes: int) -> None:
    logits = randn(batch, classes) * 3
    with bounds_checked() as zones:
        exit_mask, uncertainty = mp_kernels.entropy_exit(zones.copy(logits), 0.5, backend="triton")
    want_mask, want_uncertainty = mp_kernels.entropy_exit(logits, 0.5, backend="torch")
    assert_no_sentinel(uncertainty)
    assert_close(uncertainty, want_uncertainty, torch.float32, scale=10.0)
    assert torch.equal(exit_mask.cpu(), want_mask.cpu())


def test_exit_step_reads_only_live_slots() -> None:
    lengths = [5, 0, 1, 17, 3]
    hidden, cu = randn(28, 48), lengths_cu(lengths)
    weights = [randn(24, 48, seed=1) * 0.3, randn(24, seed=2), randn(3, 24, seed=3), randn(3, seed=4)]
    tau = torch.tensor([0.9], device=DEVICE)
    alive = torch.tensor([True, True, True, False, True], device=DEVICE)

    def run(backend: str, place) -> tuple[torch.Tensor, ...]:
        logits = place(torch.full((5, 3), float("nan"), device=DEVICE))
        exit_layer = place(torch.full((5,), 99, dtype=torch.int64, device=DEVICE))
        still = place(alive.clone())
        mp_kernels.exit_step(
            place(hidden),
            place(cu),
            *(place(w) for w in weights),
            place(tau),
            2,
            logits,
            exit_layer,
            still,
            backend=backend,
        )
        return logits, exit_layer, still

    with bounds_checked() as zones:
        got = run("triton", zones.copy)
    want = run("torch", lambda t: t.clone())
    assert torch.equal(got[1].cpu(), want[1].cpu()) and torch.equal(got[2].cpu(), want[2].cpu())
    assert_close(got[0].nan_to_num(7.0), want[0].nan_to_num(7.0), torch.float32, scale=10.0)


BAD_CU = {
    "past-the-end": [0, 30, 50, 90, 200],
    "decreasing": [0, 40, 10, 60, 66],
    "negative": [0, -5, 12, 30, 66],
    "late-start": [9, 20, 20, 50, 60],
}
BAD_OFFSET_KERNELS = (
    "prune_tokens",
    "drop_sequences",
    "compact_tokens",
    "varlen_attention",
    "pruning_plan",
    "exit_step",
    "finish_slots",
)


Written = list[tuple[torch.Tensor, int, int]]
Place = Callable[[torch.Tensor], torch.Tensor]


def _run_on_bad_offsets(kernel: str, cu: torch.Tensor, hidden: torch.Tensor, place: Place) -> Written:
    """Call ``kernel`` on the Triton backend, validation off, with ``cu`` and the other inputs ``place``d (guarded).

    Returns what it writes for later kernels to follow: ``(offsets, low, high)``, the range they must stay in.
    """
    importance = place(torch.rand(66, generator=torch.Generator().manual_seed(3)).to(DEVICE))
    alive = place(torch.ones(4, dtype=torch.bool, device=DEVICE))
    threshold = place(torch.tensor([0.5], device=DEVICE))
    if kernel in ("prune_tokens", "drop_sequences"):
        if kernel == "prune_tokens":
            kept, cu_kept, _, _ = mp_kernels.prune_tokens(hidden, importance, cu, 0.5, backend="triton", validate=False)
        else:
            index = place(torch.arange(4, device=DEVICE))
            kept, cu_kept, _, _ = mp_kernels.drop_sequences(hidden, cu, alive, index, backend="triton", validate=False)
        return [(cu_kept, 0, kept.shape[0])]
    if kernel == "compact_tokens":
        _, cu_out = mp_kernels.compact_tokens(
            hidden, cu, 16, importance=importance, threshold=threshold, backend="triton", validate=False
        )
        return [(cu_out, 0, 66)]
    if kernel in ("varlen_attention", "pruning_plan"):
        q, k, v = (place(randn(66, 2, 16, seed=s)) for s in range(3))
        if kernel == "varlen_attention":
            mp_kernels.varlen_attention(q, k, v, cu, 40, return_importance=True, backend="triton", validate=False)
            return []
        counts = place(torch.zeros(4, dtype=torch.int64, device=DEVICE))
        _, plan = mp_kernels.varlen_attention(
            q,
            k,
            v,
            cu,
            40,
            prune_threshold=threshold,
            keep_first=True,
            alive=alive,
            counts=counts,
            backend="triton",
            validate=False,
        )
        read = min(max(int(cu[-1]), 0), 66)  # the rows whose destinations a later kernel follows
        return [(plan.cu_seqlens_out, 0, 66), (plan.dest[:read], -1, 65)]
    if kernel == "exit_step":
        weights = [randn(24, 32) * 0.3, randn(24), randn(3, 24), randn(3)]
        mp_kernels.exit_step(
            hidden,
            cu,
            *(place(w) for w in weights),
            place(torch.tensor([0.9], device=DEVICE)),
            2,
            place(torch.zeros(4, 3, device=DEVICE)),
            place(torch.zeros(4, dtype=torch.int64, device=DEVICE)),
            alive,
            backend="triton",
        )
        return []
    mp_kernels.finish_slots(
        hidden,
        cu,
        *(place(w) for w in (randn(32, 32), randn(32), randn(3, 32), randn(3))),
        alive,
        place(torch.tensor([5, 9, 0, 7], device=DEVICE)),
        place(torch.zeros(4, 3, device=DEVICE)),
        place(torch.zeros(4, dtype=torch.int64, device=DEVICE)),
        place(torch.zeros(2, 4, dtype=torch.int64, device=DEVICE)),
        place(torch.zeros(4, dtype=torch.int64, device=DEVICE)),
        (True, False),
        (1, 1, 1, 1, 1),
        early_exit=True,
        backend="triton",
    )
    return []


@OUT_OF_RANGE
@pytest.mark.parametrize("case", BAD_CU)
@pytest.mark.parametrize("kernel", BAD_OFFSET_KERNELS)
def test_unvalidated_bad_offsets_never_leave_the_tensors(kernel: str, case: str) -> None:
    """``cu_seqlens`` out of range, decreasing or not starting at 0, with validation off: the results are
    unspecified, but no kernel touches memory outside its tensors (each reads a slot's rows through
    ``segments.segment``), and the offsets and destinations it writes for later kernels stay inside the buffers
    they index."""
    with bounds_checked() as zones:
        cu = zones.copy(torch.tensor(BAD_CU[case], dtype=torch.int32, device=DEVICE))
        written = _run_on_bad_offsets(kernel, cu, zones.copy(randn(66, 32)), zones.copy)
    for offsets, low, high in written:
        assert int(offsets.min()) >= low and int(offsets.max()) <= high, (offsets.tolist(), low, high)
