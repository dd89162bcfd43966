"""Tests of ``add_layer_norm`` against ``F.layer_norm`` in float64 of the sum rounded to the input dtype.

Only rows below ``n_rows`` are specified. The Triton backend must leave the other rows of its (poisoned) output
untouched; the PyTorch backend normalises every row, which is checked too as it is the documented baseline.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mp_kernels.add_layer_norm import add_layer_norm
from tests.utils import (
    DEVICE,
    KERNEL_DTYPES,
    ON_GPU,
    assert_close,
    assert_no_host_synchronisation,
    capture_cuda_graph,
    check_live_rows,
    kernel_must_not_run,
    live_count,
    poison_,
    poisoned_allocations,
)
from tests.utils import HYPOTHESIS_SETTINGS as SETTINGS

# The modules themselves: ``mp_kernels.add_layer_norm`` is the function once the package exports it.
add_layer_norm_module = importlib.import_module("mp_kernels.add_layer_norm")
triton_add_layer_norm = importlib.import_module("mp_kernels._triton.add_layer_norm")

BACKENDS = ["triton", "torch"]
EPS = 1e-5
# Statistics over d features in float32, then a rounding of outputs of a few units in the input dtype.
SCALE = 2.0

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def make_inputs(capacity: int, d: int, dtype: torch.dtype, seed: int) -> Inputs:
    """``x`` and ``residual`` ``(capacity, d)`` with an offset, ``weight`` near 1 and ``bias`` near 0 ``(d,)``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(capacity, d, generator=generator) * 2 + 0.5
    residual = torch.randn(capacity, d, generator=generator)
    weight = 1 + 0.2 * torch.randn(d, generator=generator)
    bias = 0.2 * torch.randn(d, generator=generator)
    return tuple(t.to(dtype=dtype, device=DEVICE) for t in (x, residual, weight, bias))


def expected(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The layer norm in float64 on the CPU of ``x + residual`` rounded to the input dtype, every row."""
    total = (x + residual).cpu().double()
    return F.layer_norm(total, (x.shape[1],), weight.cpu().double(), bias.cpu().double(), EPS)


def run(inputs: Inputs, n_rows: torch.Tensor, backend: str) -> torch.Tensor:
    """``add_layer_norm`` with poisoned output allocations; checks the output's dtype and shape."""
    x = inputs[0]
    with poisoned_allocations():
        y = add_layer_norm(*inputs, EPS, n_rows, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    return y


def check(y: torch.Tensor, want: torch.Tensor, live: int, backend: str, dtype: torch.dtype) -> None:
    check_live_rows(y, want, live, backend, dtype, SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("d", [16, 40, 64, 384, 768, 1000])
def test_matches_float64(backend: str, dtype: torch.dtype, d: int) -> None:
    inputs = make_inputs(45, d, dtype, seed=d)
    y = run(inputs, live_count(37), backend)
    check(y, expected(*inputs), 37, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("live", [0, 1, 17, 31, 48])
def test_live_row_counts(backend: str, live: int) -> None:
    """n_rows of 0, 1, odd, prime and the whole capacity."""
    inputs = make_inputs(48, 40, torch.float32, seed=live)
    check(run(inputs, live_count(live), backend), expected(*inputs), live, backend, torch.float32)


@pytest.mark.out_of_range
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("live", [-3, 71])
def test_out_of_range_counts_are_clamped(backend: str, live: int) -> None:
    inputs = make_inputs(40, 24, torch.float32, seed=5)
    check(run(inputs, live_count(live), backend), expected(*inputs), live, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_rows_as_view_of_a_larger_tensor(backend: str) -> None:
    """``cu_seqlens[-1:]`` (a 1-element view at an offset) and a 0-dim element are both accepted."""
    cu_seqlens = torch.tensor([0, 5, 12, 23], dtype=torch.int32, device=DEVICE)
    inputs = make_inputs(40, 64, torch.float32, seed=3)
    want = expected(*inputs)
    for n_rows, live in ((cu_seqlens[-1:], 23), (cu_seqlens[3], 23), (cu_seqlens[1:3][1:], 12)):
        check(run(inputs, n_rows, backend), want, live, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_sum_is_rounded_to_the_input_dtype(backend: str, dtype: torch.dtype) -> None:
    """2048 + 1 is 2048 in half precision: such a row has no variance and normalises to the bias.

    In float32 the same row alternates 2049, 2048 and normalises to +-1.
    """
    x = torch.full((3, 16), 2048.0, dtype=dtype, device=DEVICE)
    residual = torch.tensor([1.0, 0.0] * 8, dtype=dtype, device=DEVICE).expand(3, 16).contiguous()
    weight = torch.ones(16, dtype=dtype, device=DEVICE)
    bias = torch.zeros(16, dtype=dtype, device=DEVICE)
    y = run((x, residual, weight, bias), live_count(3), backend).cpu().double()
    if dtype == torch.float32:
        want = torch.tensor([1.0, -1.0] * 8, dtype=torch.float64).expand(3, 16)
        assert_close(y, want, torch.float32, scale=100.0)
    else:
        assert torch.equal(y, torch.zeros(3, 16, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_buffer(backend: str) -> None:
    assert run(make_inputs(0, 16, torch.float32, seed=1), live_count(0), backend).shape == (0, 16)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_backends_agree(dtype: torch.dtype) -> None:
    inputs = make_inputs(33, 384, dtype, seed=9)
    triton_y = run(inputs, live_count(33), "triton")
    torch_y = run(inputs, live_count(33), "torch")
    assert_close(triton_y, torch_y.double(), dtype, scale=2 * SCALE)


def test_float64_on_torch_backend() -> None:
    inputs = make_inputs(9, 12, torch.float64, seed=2)
    torch.testing.assert_close(run(inputs, live_count(9), "torch").cpu(), expected(*inputs), atol=1e-12, rtol=1e-12)


@st.composite
def norm_cases(draw: st.DrawFn) -> dict[str, object]:
    capacity = draw(st.integers(1, 64))
    d = draw(st.one_of(st.integers(1, 96), st.integers(500, 1100)))
    inputs = make_inputs(capacity, d, draw(st.sampled_from(KERNEL_DTYPES)), seed=draw(st.integers(0, 2**16)))
    live = draw(st.one_of(st.sampled_from([0, 1, capacity]), st.integers(0, capacity)))
    return {"inputs": inputs, "live": live}


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=norm_cases())
def test_random_shapes(backend: str, case: dict[str, object]) -> None:
    inputs, live = case["inputs"], case["live"]
    check(run(inputs, live_count(live), backend), expected(*inputs), live, backend, inputs[0].dtype)


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


X, W, N = _t(8, 16), _t(16), live_count(8)
F64 = torch.float64
BAD_INPUTS: list[tuple[str, tuple[object, ...], dict[str, object], type[Exception], str]] = [
    ("x not a tensor", ([[0.0] * 16], X, W, W, EPS, N), {}, TypeError, "x"),
    ("x ndim", (_t(16), _t(16), W, W, EPS, N), {}, ValueError, "x"),
    ("x dtype", (_t(8, 16, dtype=torch.int32), X, W, W, EPS, N), {}, TypeError, "x"),
    ("x strided", (_t(16, 8).t(), X, W, W, EPS, N), {}, ValueError, "x"),
    ("x no features", (_t(8, 0), _t(8, 0), _t(0), _t(0), EPS, N), {}, ValueError, "x"),
    ("residual not a tensor", (X, 0.0, W, W, EPS, N), {}, TypeError, "residual"),
    ("residual dtype", (X, _t(8, 16, dtype=torch.float16), W, W, EPS, N), {}, TypeError, "residual"),
    ("residual shape", (X, _t(7, 16), W, W, EPS, N), {}, ValueError, "residual"),
    ("residual strided", (X, _t(16, 8).t(), W, W, EPS, N), {}, ValueError, "residual"),
    ("weight not a tensor", (X, X, None, W, EPS, N), {}, TypeError, "weight"),
    ("weight shape", (X, X, _t(15), W, EPS, N), {}, ValueError, "weight"),
    ("weight ndim", (X, X, _t(1, 16), W, EPS, N), {}, ValueError, "weight"),
    ("weight dtype", (X, X, _t(16, dtype=F64), W, EPS, N), {}, TypeError, "weight"),
    ("bias not a tensor", (X, X, W, None, EPS, N), {}, TypeError, "bias"),
    ("bias shape", (X, X, W, _t(17), EPS, N), {}, ValueError, "bias"),
    ("bias dtype", (X, X, W, _t(16, dtype=torch.float16), EPS, N), {}, TypeError, "bias"),
    ("eps zero", (X, X, W, W, 0.0, N), {}, ValueError, "eps"),
    ("eps negative", (X, X, W, W, -1e-5, N), {}, ValueError, "eps"),
    ("eps nan", (X, X, W, W, float("nan"), N), {}, ValueError, "eps"),
    ("eps inf", (X, X, W, W, float("inf"), N), {}, ValueError, "eps"),
    ("eps string", (X, X, W, W, "1e-5", N), {}, TypeError, "eps"),
    ("eps tensor", (X, X, W, W, torch.tensor(1e-5), N), {}, TypeError, "eps"),
    ("eps bool", (X, X, W, W, True, N), {}, TypeError, "eps"),
    ("n_rows int", (X, X, W, W, EPS, 8), {}, TypeError, "n_rows"),
    ("n_rows int64", (X, X, W, W, EPS, _t(1, dtype=torch.int64)), {}, TypeError, "n_rows"),
    ("n_rows two values", (X, X, W, W, EPS, _t(2, dtype=torch.int32)), {}, ValueError, "n_rows"),
    ("n_rows empty", (X, X, W, W, EPS, _t(0, dtype=torch.int32)), {}, ValueError, "n_rows"),
    ("n_rows 2-d", (X, X, W, W, EPS, _t(1, 1, dtype=torch.int32)), {}, ValueError, "n_rows"),
    (
        "float64 on triton",
        (X.double(), X.double(), W.double(), W.double(), EPS, N),
        {"backend": "triton"},
        TypeError,
        "x",
    ),
    (
        "too wide for triton",
        (_t(2, 9000), _t(2, 9000), _t(9000), _t(9000), EPS, N),
        {"backend": "triton"},
        ValueError,
        "x",
    ),
    ("unknown backend", (X, X, W, W, EPS, N), {"backend": "cuda"}, ValueError, "backend"),
]
if ON_GPU:
    BAD_INPUTS += [
        ("residual on cpu", (X, X.cpu(), W, W, EPS, N), {}, ValueError, "residual"),
        ("weight on cpu", (X, X, W.cpu(), W, EPS, N), {}, ValueError, "weight"),
        ("n_rows on cpu", (X, X, W, W, EPS, N.cpu()), {}, ValueError, "n_rows"),
    ]


@pytest.mark.parametrize(("label", "args", "kwargs", "error", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_before_any_kernel(
    label: str, args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], match: str, monkeypatch
) -> None:
    monkeypatch.setattr(add_layer_norm_module, "add_layer_norm_torch", kernel_must_not_run)
    monkeypatch.setattr(triton_add_layer_norm, "add_layer_norm_triton", kernel_must_not_run)
    with pytest.raises(error, match=match):
        add_layer_norm(*args, **kwargs)


@pytest.mark.skipif(not ON_GPU, reason="host synchronisations are only observable on a GPU")
def test_no_host_synchronisation() -> None:
    inputs = make_inputs(64, 768, torch.float16, seed=4)
    n_rows = live_count(40)
    assert_no_host_synchronisation(lambda: add_layer_norm(*inputs, EPS, n_rows))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replays_with_new_row_counts(backend: str) -> None:
    """Captured once, replayed after writing new counts into ``n_rows``: only the live rows are written."""
    inputs = make_inputs(300, 768, torch.bfloat16, seed=6)
    n_rows = live_count(300)
    graph, y = capture_cuda_graph(lambda: add_layer_norm(*inputs, EPS, n_rows, backend=backend))
    want = expected(*inputs)
    for live in (300, 129, 1, 0):
        n_rows.fill_(live)
        poison_(y)
        graph.replay()
        torch.cuda.synchronize()
        check(y, want, live, backend, torch.bfloat16)
