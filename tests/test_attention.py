"""``varlen_attention``: the Triton kernels against a float64 reference, the PyTorch backend against a naive loop,
and the input checks of the public function.

Every kernel output is compared with the PyTorch backend run in float64 on the same (already rounded) inputs by
FlashAttention's rule (at most twice the error of PyTorch's own attention in the input dtype, on the same device),
and every importance at the float32 tolerance of ``tests/utils.py``. Lengths are uneven on purpose: 1, odd
and prime lengths, exact multiples of the tiles, a zero-length sequence and the longest tested (128), so that
every tail mask, every early exit and the multi-block online softmax are exercised under the interpreter's small
tiles as well as under the GPU's.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mp_kernels._triton.attention as triton_attention
import mp_kernels.attention as attention
from mp_kernels import MAX_SEQLEN, varlen_attention
from mp_kernels._triton.attention import varlen_attention_triton
from tests.utils import (
    DEVICE,
    HYPOTHESIS_SETTINGS,
    KERNEL_DTYPES,
    ON_GPU,
    TOLERANCE,
    assert_close,
    assert_within_twice_torch_error,
    poison_,
)

LENGTHS = (37, 1, 128, 0, 61, 32, 2, 97, 64, 31)
HEADS = 2

# The float64 checks of the PyTorch backend against the einsum loop.
ATOL64, RTOL64 = TOLERANCE[torch.float64]


def packed_inputs(
    lengths: tuple[int, ...],
    head_dim: int,
    dtype: torch.dtype,
    *,
    seed: int,
    heads: int = HEADS,
    spread: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``q, k, v`` ``(total, heads, head_dim)`` in ``dtype`` on DEVICE and int32 ``cu_seqlens``.

    ``q`` is scaled by ``spread`` so that scores spread over several units and the softmax is far from uniform.
    """
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, generator=generator, dtype=torch.float64) for _ in range(3))
    q = q * spread
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), cu_seqlens.to(DEVICE)


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and importance of the PyTorch backend in float64 on the same inputs."""
    max_seqlen = max(int((cu_seqlens[1:] - cu_seqlens[:-1]).max()), 1)
    return varlen_attention(
        q.double(), k.double(), v.double(), cu_seqlens, max_seqlen, scale=scale, return_importance=True, backend="torch"
    )


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence at a time with einsum: the textbook definition of the output and the importance.

    Computed in the inputs' dtype on their device: in float64 it is the oracle of the PyTorch backend; in the
    kernels' dtype it is PyTorch's own attention (scores, probabilities and output each rounded to that dtype, as
    FlashAttention's ``attention_ref(upcast=False)``), the yardstick of FlashAttention's rule.
    """
    out = torch.zeros_like(q)
    importance = torch.zeros(q.shape[0], dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end == start:
            continue
        qs, ks, vs = q[start:end], k[start:end], v[start:end]
        probs = torch.einsum("ihd,jhd->hij", qs, ks).mul(scale).softmax(dim=-1)
        out[start:end] = torch.einsum("hij,jhd->ihd", probs, vs)
        importance[start:end] = probs.sum(dim=(0, 1)) / (q.shape[1] * (end - start))
    return out, importance


def check_against_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    out: torch.Tensor,
    importance: torch.Tensor | None,
    scale: float | None = None,
) -> None:
    """Assert the kernel's ``out`` (and ``importance``) match the float64 reference.

    The output follows FlashAttention's rule: its error is at most twice that of PyTorch's attention computed in
    the input dtype on the same device. (The kernel rounds the probabilities to the input dtype before the P.V
    product and the output once more, about 2u |out| in all; PyTorch in that dtype also rounds the scores, so the
    rule holds with room, whatever the GPU's accumulation order or TF32 setting.) The importance is computed in
    float32 from float32 scores of the same rounded inputs (half-precision products are exact in float32, float32
    dots run in "ieee" precision), so it is held to the float32 tolerance whatever the input dtype and device.
    """
    expected_out, expected_importance = reference(q, k, v, cu_seqlens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch_out, _ = naive_attention(q, k, v, cu_seqlens, q.shape[2] ** -0.5 if scale is None else scale)
    assert_within_twice_torch_error(out, torch_out, expected_out, msg=f"{q.dtype} attention output")
    if importance is not None:
        assert importance.dtype == torch.float32 and importance.shape == (q.shape[0],)
        assert_close(importance, expected_importance, torch.float32)


@pytest.mark.parametrize("head_dim", [16, 32, 64])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_matches_float64_reference(dtype: torch.dtype, head_dim: int) -> None:
    q, k, v, cu_seqlens = packed_inputs(LENGTHS, head_dim, dtype, seed=head_dim)
    out, importance = varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), return_importance=True, backend="triton")
    check_against_reference(q, k, v, cu_seqlens, out, importance)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_head_dim_128(dtype: torch.dtype) -> None:
    lengths = (128, 5, 0, 64)
    q, k, v, cu_seqlens = packed_inputs(lengths, 128, dtype, seed=128)
    out, importance = varlen_attention(q, k, v, cu_seqlens, 128, return_importance=True, backend="triton")
    check_against_reference(q, k, v, cu_seqlens, out, importance)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_without_importance(dtype: torch.dtype) -> None:
    q, k, v, cu_seqlens = packed_inputs(LENGTHS, 32, dtype, seed=7)
    out = varlen_attention(q, k, v, cu_seqlens, max(LENGTHS), backend="triton")
    assert isinstance(out, torch.Tensor)
    check_against_reference(q, k, v, cu_seqlens, out, None)


def test_importance_sums_to_one_per_sequence() -> None:
    q, k, v, cu_seqlens = packed_inputs(LENGTHS, 16, torch.float32, seed=3)
    _, importance = varlen_attention(q, k, v, cu_seqlens, 128, return_importance=True, backend="triton")
    sums = torch.stack(
        [importance[a:b].double().sum() for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True) if b > a]
    )
    # A sum of n float32 probabilities, each within the float32 tolerance: n * u plus the kernel's own error.
    torch.testing.assert_close(sums, torch.ones_like(sums), atol=TOLERANCE[torch.float32][0], rtol=0)
    assert bool((importance >= 0).all())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_writes_every_row_and_nothing_else(dtype: torch.dtype) -> None:
    """Poisoned output buffers with poisoned guard rows on both sides: every row written, no guard touched."""
    q, k, v, cu_seqlens = packed_inputs(LENGTHS, 16, dtype, seed=11)
    total = q.shape[0]
    out_buffer = poison_(torch.empty((total + 2, HEADS, 16), dtype=dtype, device=DEVICE))
    importance_buffer = poison_(torch.empty(total + 2, dtype=torch.float32, device=DEVICE))
    out, importance = varlen_attention_triton(
        q, k, v, cu_seqlens, 128, 16**-0.5, True, out=out_buffer[1:-1], importance=importance_buffer[1:-1]
    )
    assert out.data_ptr() == out_buffer[1:].data_ptr() and importance.data_ptr() == importance_buffer[1:].data_ptr()
    assert bool(out.isfinite().all()) and bool(importance.isfinite().all())
    assert bool(out_buffer[[0, -1]].isnan().all()) and bool(importance_buffer[[0, -1]].isnan().all())
    check_against_reference(q, k, v, cu_seqlens, out, importance, scale=16**-0.5)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_fused_qkv_slices_without_copy(dtype: torch.dtype) -> None:
    """q, k, v as strided views into one ``(total, 3, heads, head_dim)`` tensor, as a fused projection yields."""
    lengths = (45, 0, 128, 3)
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(sum(lengths), 3, HEADS, 32, generator=generator).to(DEVICE, dtype)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    cu_seqlens = torch.tensor([0, 45, 45, 173, 176], dtype=torch.int32, device=DEVICE)
    out, importance = varlen_attention(q, k, v, cu_seqlens, 128, return_importance=True, backend="triton")
    check_against_reference(q, k, v, cu_seqlens, out, importance)


@pytest.mark.parametrize("lengths", [(1,), (128,), (0, 77, 0)], ids=["one-token", "one-full", "zeros-around"])
def test_batch_of_one(lengths: tuple[int, ...]) -> None:
    q, k, v, cu_seqlens = packed_inputs(lengths, 64, torch.float32, seed=len(lengths))
    out, importance = varlen_attention(q, k, v, cu_seqlens, max(lengths), return_importance=True, backend="triton")
    check_against_reference(q, k, v, cu_seqlens, out, importance)
    if lengths == (1,):
        assert_close(out, v.double(), torch.float32)
        assert_close(importance, torch.ones(1, dtype=torch.float64, device=DEVICE), torch.float32)


def test_large_scores_and_loose_max_seqlen() -> None:
    """Scores above 100, where exp overflows float32 without the running maximum, and a loose max_seqlen.

    float32 scores of size |s| carry a rounding error of about |s| * 2^-24 per term, which the softmax turns
    into a relative error of the same size: at |s| ~ 150 that is 10x the error at the usual |s| ~ 10. PyTorch's
    own float32 attention has the same error, so FlashAttention's rule needs no extra allowance.
    """
    q, k, v, cu_seqlens = packed_inputs((50, 0, 19), 32, torch.float32, seed=13, spread=3.5)
    largest = torch.einsum("ihd,jhd->hij", q[:50].double(), k[:50].double()).abs().max() * 2.0
    assert 100 < largest < 250
    out, importance = varlen_attention(q, k, v, cu_seqlens, 200, scale=2.0, return_importance=True, backend="triton")
    check_against_reference(q, k, v, cu_seqlens, out, importance, scale=2.0)


@pytest.mark.out_of_range
@pytest.mark.parametrize("max_seqlen", [1, 40])
def test_max_seqlen_below_the_longest_is_slower_never_wrong(max_seqlen: int) -> None:
    """Without validation, a ``max_seqlen`` below the real lengths only shrinks the grid: each program loops over
    the blocks past it, so output and importance equal the reference (they were garbage before)."""
    q, k, v, cu_seqlens = packed_inputs((128, 0, 37, 1), 16, torch.float32, seed=23)
    out, importance = varlen_attention(
        q, k, v, cu_seqlens, max_seqlen, return_importance=True, backend="triton", validate=False
    )
    check_against_reference(q, k, v, cu_seqlens, out, importance)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_nan_stays_inside_its_sequence(backend: str) -> None:
    """NaN policy: a NaN in one sequence's q makes its outputs and importances NaN, the other sequences exact."""
    q, k, v, cu_seqlens = packed_inputs((20, 33, 1), 16, torch.float32, seed=29)
    q[25, 1, 3] = float("nan")
    out, importance = varlen_attention(q, k, v, cu_seqlens, 33, return_importance=True, backend=backend)
    assert importance[20:53].isnan().all() and out[25, 1].isnan().all() and out[25, 0].isfinite().all()
    clean = torch.ones(q.shape[0], dtype=torch.bool, device=DEVICE)
    clean[20:53] = False
    assert out[clean].isfinite().all() and importance[clean].isfinite().all()
    expected_out, expected_importance = reference(q, k, v, cu_seqlens)
    assert_close(importance[clean], expected_importance[clean], torch.float32)
    assert_close(out[clean], expected_out[clean], torch.float32)


def test_head_groups_are_deterministic() -> None:
    """The importance does not depend on how the heads are split between programs, and repeats bit for bit."""
    q, k, v, cu_seqlens = packed_inputs((70, 9, 0, 33), 16, torch.float32, seed=17, heads=3)
    scale = 16**-0.5
    runs = [varlen_attention_triton(q, k, v, cu_seqlens, 70, scale, True, head_groups=g) for g in (1, 2, 2, 3)]
    for out, _ in runs[1:]:
        assert torch.equal(out, runs[0][0])
    assert torch.equal(runs[1][1], runs[2][1])
    # Head groups only regroup a float32 sum of 3 terms per key: a few units of roundoff (u = 6e-8) apart.
    for _, importance in runs[1:]:
        torch.testing.assert_close(importance, runs[0][1], atol=1e-7, rtol=1e-6)
    check_against_reference(q, k, v, cu_seqlens, *runs[1], scale=scale)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_triton_and_torch_backends_agree(dtype: torch.dtype) -> None:
    """Both backends on DEVICE, each against the float64 reference: they agree within the sum of their errors.

    The PyTorch backend computes half-precision inputs in float32 and rounds the output once, so it meets the
    dtype's tolerance on this device (TF32 included, where cuBLAS uses it); the Triton kernels meet
    FlashAttention's rule.
    """
    q, k, v, cu_seqlens = packed_inputs((23, 128, 8), 32, dtype, seed=19)
    results = {
        backend: varlen_attention(q, k, v, cu_seqlens, 128, return_importance=True, backend=backend)
        for backend in ("triton", "torch")
    }
    (out_triton, importance_triton), (out_torch, importance_torch) = results["triton"], results["torch"]
    assert out_torch.dtype == out_triton.dtype == dtype
    assert importance_torch.dtype == importance_triton.dtype == torch.float32
    expected_out, expected_importance = reference(q, k, v, cu_seqlens)
    assert_close(out_torch, expected_out, dtype, device=DEVICE)
    assert_close(importance_torch, expected_importance, torch.float32, device=DEVICE)
    check_against_reference(q, k, v, cu_seqlens, out_triton, importance_triton)


@HYPOTHESIS_SETTINGS
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6).filter(any),
    heads=st.integers(min_value=1, max_value=3),
    head_dim=st.sampled_from([16, 32]),
    scale=st.floats(min_value=0.05, max_value=2.0),
)
def test_torch_backend_matches_naive_loop(lengths: list[int], heads: int, head_dim: int, scale: float) -> None:
    """The PyTorch backend (length buckets, SDPA without importance) against einsum per sequence, in float64."""
    q, k, v, cu_seqlens = packed_inputs(tuple(lengths), head_dim, torch.float64, seed=sum(lengths), heads=heads)
    expected_out, expected_importance = naive_attention(q, k, v, cu_seqlens, scale)
    out, importance = varlen_attention(
        q, k, v, cu_seqlens, max(lengths), scale=scale, return_importance=True, backend="torch"
    )
    assert out.dtype == importance.dtype == torch.float64
    torch.testing.assert_close(out, expected_out, atol=ATOL64, rtol=RTOL64)
    torch.testing.assert_close(importance, expected_importance, atol=ATOL64, rtol=RTOL64)
    out_only = varlen_attention(q, k, v, cu_seqlens, max(lengths), scale=scale, backend="torch")
    torch.testing.assert_close(out_only, expected_out, atol=ATOL64, rtol=RTOL64)


@pytest.mark.parametrize("budget", [1, 3000, 1 << 30])
def test_torch_backend_is_exact_whatever_the_bucket_budget(budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Buckets split by the score budget (one sequence each, a few, all) give the naive loop's result."""
    import mp_kernels.attention_reference as reference

    monkeypatch.setattr(reference, "IMPORTANCE_SCORE_BUDGET", budget)
    lengths = (37, 1, 40, 29, 40, 0, 23, 31)
    q, k, v, cu_seqlens = packed_inputs(lengths, 16, torch.float64, seed=5, heads=2)
    expected_out, expected_importance = naive_attention(q, k, v, cu_seqlens, 0.3)
    out, importance = varlen_attention(q, k, v, cu_seqlens, 40, scale=0.3, return_importance=True, backend="torch")
    torch.testing.assert_close(out, expected_out, atol=ATOL64, rtol=RTOL64)
    torch.testing.assert_close(importance, expected_importance, atol=ATOL64, rtol=RTOL64)


def test_torch_backend_default_scale_and_half_inputs() -> None:
    """float16 inputs computed in float32 on DEVICE and the output rounded once: the float16 tolerance there."""
    q, k, v, cu_seqlens = packed_inputs((9, 0, 30), 64, torch.float16, seed=23)
    out, importance = varlen_attention(q, k, v, cu_seqlens, 30, return_importance=True, backend="torch")
    assert out.dtype == torch.float16 and importance.dtype == torch.float32
    expected_out, expected_importance = naive_attention(q.double(), k.double(), v.double(), cu_seqlens, 64**-0.5)
    assert_close(out, expected_out, torch.float16, device=DEVICE)
    assert_close(importance, expected_importance, torch.float32, device=DEVICE)


def test_output_buffer_checked() -> None:
    q, k, v, cu_seqlens = packed_inputs((4,), 16, torch.float32, seed=29)
    with pytest.raises(ValueError, match="out must be a"):
        varlen_attention_triton(q, k, v, cu_seqlens, 4, 0.25, False, out=torch.empty(4, HEADS, 32, device=DEVICE))
    with pytest.raises(ValueError, match="importance must be a"):
        varlen_attention_triton(q, k, v, cu_seqlens, 4, 0.25, True, importance=torch.empty(4, device=DEVICE).half())


def _valid(dtype: torch.dtype = torch.float32) -> dict[str, object]:
    """Keyword arguments of a valid call on DEVICE: two sequences (3 and 5 tokens), 2 heads, head_dim 16."""
    q, k, v, cu_seqlens = packed_inputs((3, 5), 16, dtype, seed=31)
    return {"q": q, "k": k, "v": v, "cu_seqlens": cu_seqlens, "max_seqlen": 5}


def _with(**changes: object) -> dict[str, object]:
    return {**_valid(), **changes}


def _cu(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


BAD_INPUTS = {
    "q-not-tensor": (lambda: _with(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    "int-dtype": (lambda: _with(q=_valid()["q"].int()), TypeError, "q must have dtype"),
    "mismatched-dtypes": (lambda: _with(k=_valid()["k"].half()), TypeError, "k must have the dtype of q"),
    "float64-on-triton": (lambda: {**_valid(torch.float64), "backend": "triton"}, TypeError, "triton backend"),
    "mismatched-shapes": (lambda: _with(v=_valid()["v"][:, :1]), ValueError, "v must have the shape of q"),
    "wrong-ndim": (lambda: _with(q=_valid()["q"].flatten(1)), ValueError, "q must have 3 dimensions"),
    "head-dim-24": (
        lambda: (
            {n: torch.zeros(8, HEADS, 24, device=DEVICE) for n in "qkv"} | {"cu_seqlens": _cu(0, 8), "max_seqlen": 8}
        ),
        ValueError,
        "head_dim",
    ),
    "last-dim-strided": (
        lambda: _with(k=torch.zeros(8, HEADS, 32, device=DEVICE)[..., ::2]),
        ValueError,
        "k must be contiguous in its last",
    ),
    "cu-seqlens-int64": (lambda: _with(cu_seqlens=_cu(0, 3, 8).long()), TypeError, "cu_seqlens must have dtype"),
    "cu-seqlens-2d": (lambda: _with(cu_seqlens=_cu(0, 3, 8)[None]), ValueError, "cu_seqlens must have 1 dim"),
    "cu-seqlens-not-from-0": (lambda: _with(cu_seqlens=_cu(1, 3, 8)), ValueError, "must start at 0"),
    "cu-seqlens-decreasing": (lambda: _with(cu_seqlens=_cu(0, 6, 5, 8)), ValueError, "non-decreasing"),
    "cu-seqlens-short-end": (lambda: _with(cu_seqlens=_cu(0, 3, 7)), ValueError, "end at the token count 8"),
    "empty-batch": (lambda: _with(cu_seqlens=_cu(0)), ValueError, "batch is empty"),
    "no-tokens": (
        lambda: (
            {n: torch.zeros(0, HEADS, 16, device=DEVICE) for n in "qkv"} | {"cu_seqlens": _cu(0, 0), "max_seqlen": 1}
        ),
        ValueError,
        "q holds no tokens",
    ),
    "max-seqlen-too-small": (lambda: _with(max_seqlen=4), ValueError, "more than max_seqlen=4"),
    "max-seqlen-too-large": (lambda: _with(max_seqlen=MAX_SEQLEN + 1), ValueError, "max_seqlen must lie in"),
    "max-seqlen-zero": (lambda: _with(max_seqlen=0), ValueError, "max_seqlen must lie in"),
    "max-seqlen-float": (lambda: _with(max_seqlen=5.0), TypeError, "max_seqlen must be an int"),
    "max-seqlen-bool": (lambda: _with(max_seqlen=True), TypeError, "max_seqlen must be an int"),
    "scale-zero": (lambda: _with(scale=0.0), ValueError, "scale must be positive"),
    "scale-negative": (lambda: _with(scale=-0.25), ValueError, "scale must be positive"),
    "scale-nan": (lambda: _with(scale=math.nan), ValueError, "scale must be positive"),
    "unknown-backend": (lambda: _with(backend="cuda"), ValueError, "backend must be one of"),
}


@pytest.fixture
def no_kernel_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to run either backend fail the test: errors must come from validation alone."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a backend ran on invalid inputs")

    monkeypatch.setattr(triton_attention, "varlen_attention_triton", forbidden)
    monkeypatch.setattr(attention, "varlen_attention_torch", forbidden)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_before_any_kernel(case: str, no_kernel_runs: None) -> None:
    make, error, message = BAD_INPUTS[case]
    kwargs = make()
    with pytest.raises(error, match=message):
        varlen_attention(**kwargs, return_importance=True)


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device besides the CPU")
def test_device_mismatch_raises_before_any_kernel(no_kernel_runs: None) -> None:
    kwargs = _with(v=_valid()["v"].cpu())
    with pytest.raises(ValueError, match="v is on cpu"):
        varlen_attention(**kwargs)
