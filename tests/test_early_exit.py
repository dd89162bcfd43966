"""Tests of ``entropy_exit`` against a per-example Python loop in float64 and against the PyTorch reference.

The kernels compute in float32 whatever the input dtype, so the uncertainty is compared at float32's tolerance
with the loop run in float64 on the same (already rounded) logits.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mp_kernels
from mp_kernels import early_exit
from mp_kernels._triton import early_exit as triton_early_exit
from tests.utils import DEVICE, KERNEL_DTYPES, ON_GPU, assert_close, poison_
from tests.utils import HYPOTHESIS_SETTINGS as SETTINGS

BACKENDS = ["triton", "torch"]
# Entropy in float32 from the stable softmax: a few units of roundoff on values of order 1.
SCALE = 10.0


def uncertainty_loop(logits: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of every row, one row and one class at a time, in float64."""
    values = []
    for row in logits.double().tolist():
        top = max(row)
        weights = [math.exp(x - top) for x in row]
        total = sum(weights)
        entropy = -sum(w / total * math.log(w / total) for w in weights if w > 0.0)
        values.append(entropy / math.log(len(row)))
    return torch.tensor(values, dtype=torch.float64)


def run(logits: torch.Tensor, tau: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``entropy_exit`` with poisoned output allocations, checked for dtypes, shapes and self-consistency."""
    empty = torch.empty
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", lambda *args, **kwargs: poison_(empty(*args, **kwargs)))
        exit_mask, uncertainty = mp_kernels.entropy_exit(logits, tau, backend=backend)
    assert exit_mask.dtype == torch.bool and exit_mask.shape == (logits.shape[0],)
    assert uncertainty.dtype == torch.float32 and uncertainty.shape == (logits.shape[0],)
    assert bool(((uncertainty >= 0) & (uncertainty <= 1)).all())
    assert torch.equal(exit_mask, uncertainty <= tau)
    return exit_mask, uncertainty


@st.composite
def logit_cases(draw: st.DrawFn) -> dict[str, object]:
    batch = draw(st.integers(1, 40))
    classes = draw(st.one_of(st.integers(2, 20), st.integers(250, 300)))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    spread = draw(st.sampled_from([0.1, 3.0, 30.0]))
    logits = torch.randn(batch, classes, generator=generator) * spread + draw(st.floats(-50, 50))
    tau = draw(st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0)))
    return {"logits": logits.to(dtype=draw(st.sampled_from(KERNEL_DTYPES)), device=DEVICE), "tau": tau}


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=logit_cases())
def test_entropy_exit_matches_loop(backend: str, case: dict[str, object]) -> None:
    logits, tau = case["logits"], case["tau"]
    exit_mask, uncertainty = run(logits, tau, backend)
    expected = uncertainty_loop(logits.cpu())
    assert_close(uncertainty.cpu(), expected, torch.float32, scale=SCALE)
    clear = (expected - tau).abs() > 1e-4
    assert torch.equal(exit_mask.cpu()[clear], (expected <= tau)[clear])
    if tau == 1.0:
        assert bool(exit_mask.all())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_backends_agree(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(11)
    logits = (torch.randn(33, 7, generator=generator) * 4).to(dtype=dtype, device=DEVICE)
    _, triton_uncertainty = run(logits, 0.5, "triton")
    _, torch_uncertainty = run(logits, 0.5, "torch")
    assert_close(triton_uncertainty, torch_uncertainty.double(), torch.float32, scale=SCALE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_extreme_logits(backend: str, dtype: torch.dtype) -> None:
    """Logits of +-1e4: no NaN, and probabilities that underflow to 0 contribute nothing."""
    logits = torch.tensor(
        [
            [1e4, -1e4, -1e4],
            [-1e4, 1e4, 0.0],
            [1e4, 1e4, -1e4],
            [-1e4, -1e4, -1e4],
            [1e4, 1e4, 1e4],
        ],
        dtype=dtype,
        device=DEVICE,
    )
    exit_mask, uncertainty = run(logits, 0.0, backend)
    expected = torch.tensor([0.0, 0.0, math.log(2) / math.log(3), 1.0, 1.0], dtype=torch.float64)
    assert not bool(uncertainty.isnan().any())
    assert_close(uncertainty.cpu(), expected, torch.float32)
    assert exit_mask.tolist() == [True, True, False, False, False]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("classes", [2, 3, 10, 300])
def test_uniform_logits_are_fully_uncertain(backend: str, dtype: torch.dtype, classes: int) -> None:
    logits = torch.full((4, classes), 2.5, dtype=dtype, device=DEVICE)
    logits[1] = 0.0
    logits[2] = -1e4
    exit_mask, uncertainty = run(logits, 1.0, backend)
    assert_close(uncertainty.cpu(), torch.ones(4, dtype=torch.float64), torch.float32)
    assert bool(exit_mask.all())
    assert not bool(run(logits, 0.999, backend)[0].any())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_one_hot_logits_are_certain(backend: str, dtype: torch.dtype) -> None:
    logits = torch.zeros(3, 5, dtype=dtype, device=DEVICE)
    logits[0, 2] = 30.0
    logits[1, 0] = 60.0
    logits[2, 4] = 3.0
    exit_mask, uncertainty = run(logits, 1e-6, backend)
    assert uncertainty[:2].max().item() < 1e-6
    assert uncertainty[2].item() > 0.1
    assert exit_mask.tolist() == [True, True, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_zero_lets_only_certain_examples_exit(backend: str) -> None:
    logits = torch.tensor([[1e4, 0.0], [5.0, 0.0], [0.0, 0.0]], device=DEVICE)
    exit_mask, _ = run(logits, 0.0, backend)
    assert exit_mask.tolist() == [True, False, False]
    assert run(logits, 1.0, backend)[0].tolist() == [True, True, True]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_nan_logits_never_exit(backend: str, dtype: torch.dtype) -> None:
    """One NaN policy on both backends: a NaN logit, or infinite logits of both signs, give a NaN uncertainty,
    which fails ``<= tau`` even at ``tau = 1``; the other rows are unaffected."""
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor([[nan, 1.0, 2.0], [1.0, 2.0, 3.0], [inf, -inf, 0.0], [nan, nan, nan]], device=DEVICE)
    exit_mask, uncertainty = mp_kernels.entropy_exit(logits.to(dtype), 1.0, backend=backend)
    assert exit_mask.tolist() == [False, True, False, False]
    assert uncertainty.isnan().tolist() == [True, False, True, True]


def test_float64_on_torch_backend() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], dtype=torch.float64, device=DEVICE)
    _, uncertainty = run(logits, 0.5, "torch")
    assert_close(uncertainty.cpu(), uncertainty_loop(logits.cpu()), torch.float32)


def _logits(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


BAD_INPUTS: list[tuple[str, object, object, dict[str, object], type[Exception], str]] = [
    ("logits ndim", _logits(4), 0.5, {}, ValueError, "logits"),
    ("logits dtype", _logits(4, 3, dtype=torch.int32), 0.5, {}, TypeError, "logits"),
    ("logits not a tensor", [[0.0, 1.0]], 0.5, {}, TypeError, "logits"),
    ("logits strided", _logits(3, 4).t(), 0.5, {}, ValueError, "logits"),
    ("one class", _logits(4, 1), 0.5, {}, ValueError, "classes"),
    ("empty batch", _logits(0, 3), 0.5, {}, ValueError, "batch is empty"),
    ("tau negative", _logits(4, 3), -0.1, {}, ValueError, "tau"),
    ("tau above one", _logits(4, 3), 1.1, {}, ValueError, "tau"),
    ("tau nan", _logits(4, 3), float("nan"), {}, ValueError, "tau"),
    ("tau string", _logits(4, 3), "0.5", {}, TypeError, "tau"),
    ("tau tensor", _logits(4, 3), torch.tensor(0.5), {}, TypeError, "tau"),
    ("tau bool", _logits(4, 3), True, {}, TypeError, "tau"),
    ("tau none", _logits(4, 3), None, {}, TypeError, "tau"),
    ("float64 on triton", _logits(4, 3, dtype=torch.float64), 0.5, {"backend": "triton"}, TypeError, "logits"),
    ("unknown backend", _logits(4, 3), 0.5, {"backend": "cuda"}, ValueError, "backend"),
]


def _fail(*args: object, **kwargs: object) -> None:
    raise AssertionError("a kernel ran before the inputs were checked")


@pytest.mark.parametrize(
    ("label", "logits", "tau", "kwargs", "error", "match"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_inputs_raise_before_any_kernel(
    label: str, logits: object, tau: object, kwargs: dict[str, object], error: type[Exception], match: str, monkeypatch
) -> None:
    monkeypatch.setattr(early_exit, "entropy_exit_torch", _fail)
    monkeypatch.setattr(triton_early_exit, "entropy_exit_triton", _fail)
    with pytest.raises(error, match=match):
        mp_kernels.entropy_exit(logits, tau, **kwargs)


@pytest.mark.skipif(not ON_GPU, reason="host synchronisations are only observable on a GPU")
def test_no_host_synchronisation() -> None:
    logits = torch.randn(64, 3, device=DEVICE)
    mp_kernels.entropy_exit(logits, 0.5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mp_kernels.entropy_exit(logits, 0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not any("synchroniz" in str(w.message) for w in caught)
