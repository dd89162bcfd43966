"""Tests of ``rows_linear`` against ``F.linear`` and the activation in float64 on the same (already rounded) inputs.

Only rows below ``n_rows`` are specified. The Triton backend must leave the other rows of its (poisoned) output
untouched; the PyTorch backend computes every row, which is checked too as it is the documented baseline.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mp_kernels._triton.semaphores import counters
from mp_kernels.rows_linear import rows_linear
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

# The modules themselves: ``mp_kernels.rows_linear`` is the function once the package exports it.
rows_linear_module = importlib.import_module("mp_kernels.rows_linear")
triton_rows_linear = importlib.import_module("mp_kernels._triton.rows_linear")

BACKENDS = ["triton", "torch"]
ACTIVATIONS = [None, "gelu", "gelu_tanh", "relu", "tanh"]
# Half precision rounds the product, and the PyTorch backend rounds it again after the activation.
SCALE = 2.0

FLOAT64_ACTIVATIONS = {
    None: lambda y: y,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "relu": F.relu,
    "tanh": torch.tanh,
}


def make_inputs(
    capacity: int, k: int, n: int, dtype: torch.dtype, seed: int, with_bias: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x`` ``(capacity, k)``, ``weight`` ``(n, k)`` scaled like an initialised layer, ``bias`` ``(n,)``."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(capacity, k, generator=generator)
    weight = torch.randn(n, k, generator=generator) / k**0.5
    bias = torch.randn(n, generator=generator) * 0.5 if with_bias else None
    to = dict(dtype=dtype, device=DEVICE)
    return x.to(**to), weight.to(**to), None if bias is None else bias.to(**to)


def expected(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """The layer in float64 on the CPU, every row."""
    y = F.linear(x.cpu().double(), weight.cpu().double(), None if bias is None else bias.cpu().double())
    return FLOAT64_ACTIVATIONS[activation](y)


def run(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    n_rows: torch.Tensor,
    backend: str,
    activation: str | None = None,
) -> torch.Tensor:
    """``rows_linear`` with poisoned output allocations; checks the output's dtype and shape."""
    with poisoned_allocations():
        y = rows_linear(x, weight, bias, n_rows, activation=activation, backend=backend)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], weight.shape[0]) and y.device == x.device
    return y


def check(y: torch.Tensor, want: torch.Tensor, live: int, backend: str, dtype: torch.dtype) -> None:
    """``check_live_rows``; the PyTorch backend's float32 matmuls may run in TF32 on a GPU, hence its
    device-dependent tolerance."""
    check_live_rows(y, want, live, backend, dtype, SCALE, device=None if backend == "triton" else DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(("capacity", "k", "n", "live"), [(50, 40, 72, 37), (64, 96, 32, 64), (48, 64, 64, 17)])
def test_matches_float64(
    backend: str, dtype: torch.dtype, activation: str | None, capacity: int, k: int, n: int, live: int
) -> None:
    x, weight, bias = make_inputs(capacity, k, n, dtype, seed=capacity + k + n)
    y = run(x, weight, bias, live_count(live), backend, activation)
    check(y, expected(x, weight, bias, activation), live, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("live", [0, 1, 17, 31, 64])
def test_live_row_counts(backend: str, live: int) -> None:
    """n_rows of 0, 1, odd, prime and the whole capacity, with tile-multiple K and N and no bias."""
    x, weight, _ = make_inputs(64, 64, 64, torch.float32, seed=live)
    y = run(x, weight, None, live_count(live), backend)
    check(y, expected(x, weight, None, None), live, backend, torch.float32)


@pytest.mark.out_of_range
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("live", [-3, 71])
def test_out_of_range_counts_are_clamped(backend: str, live: int) -> None:
    x, weight, bias = make_inputs(40, 24, 24, torch.float32, seed=5)
    y = run(x, weight, bias, live_count(live), backend)
    check(y, expected(x, weight, bias, None), live, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_rows_as_view_of_a_larger_tensor(backend: str) -> None:
    """``cu_seqlens[-1:]`` (a 1-element view at an offset) and a 0-dim element are both accepted."""
    cu_seqlens = torch.tensor([0, 5, 12, 23], dtype=torch.int32, device=DEVICE)
    x, weight, bias = make_inputs(40, 40, 24, torch.float32, seed=3)
    want = expected(x, weight, bias, "relu")
    for n_rows in (cu_seqlens[-1:], cu_seqlens[3], cu_seqlens[1:3][1:]):
        y = run(x, weight, bias, n_rows, backend, "relu")
        live = 23 if n_rows.dim() == 0 or n_rows.storage_offset() == 3 else 12
        check(y, want, live, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_buffer(backend: str) -> None:
    x, weight, bias = make_inputs(0, 16, 24, torch.float32, seed=1)
    assert run(x, weight, bias, live_count(0), backend).shape == (0, 24)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_backends_agree(dtype: torch.dtype) -> None:
    x, weight, bias = make_inputs(33, 56, 40, dtype, seed=9)
    triton_y = run(x, weight, bias, live_count(33), "triton", "gelu")
    torch_y = run(x, weight, bias, live_count(33), "torch", "gelu")
    assert_close(triton_y, torch_y, dtype, scale=2 * SCALE, device=DEVICE)


def test_float64_on_torch_backend() -> None:
    x, weight, bias = make_inputs(9, 12, 7, torch.float64, seed=2)
    y = run(x, weight, bias, live_count(9), "torch", "tanh")
    torch.testing.assert_close(y.cpu(), expected(x, weight, bias, "tanh"), atol=1e-12, rtol=1e-12)


@st.composite
def layer_cases(draw: st.DrawFn) -> dict[str, object]:
    capacity = draw(st.integers(1, 64))
    x, weight, bias = make_inputs(
        capacity,
        draw(st.integers(1, 96)),
        draw(st.integers(1, 96)),
        draw(st.sampled_from(KERNEL_DTYPES)),
        seed=draw(st.integers(0, 2**16)),
        with_bias=draw(st.booleans()),
    )
    live = draw(st.one_of(st.sampled_from([0, 1, capacity]), st.integers(0, capacity)))
    return {"x": x, "weight": weight, "bias": bias, "live": live, "activation": draw(st.sampled_from(ACTIVATIONS))}


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=layer_cases())
def test_random_shapes(backend: str, case: dict[str, object]) -> None:
    x, weight, bias, live, activation = (case[key] for key in ("x", "weight", "bias", "live", "activation"))
    y = run(x, weight, bias, live_count(live), backend, activation)
    check(y, expected(x, weight, bias, activation), live, backend, x.dtype)


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


X, W, B, N = _t(8, 16), _t(24, 16), _t(24), live_count(8)
BAD_INPUTS: list[tuple[str, tuple[object, ...], dict[str, object], type[Exception], str]] = [
    ("x not a tensor", ([[0.0] * 16], W, B, N), {}, TypeError, "x"),
    ("x ndim", (_t(16), W, B, N), {}, ValueError, "x"),
    ("x dtype", (_t(8, 16, dtype=torch.int32), W, B, N), {}, TypeError, "x"),
    ("x strided", (_t(16, 8).t(), W, B, N), {}, ValueError, "x"),
    ("x no features", (_t(8, 0), _t(24, 0), B, N), {}, ValueError, "x"),
    ("weight not a tensor", (X, None, B, N), {}, TypeError, "weight"),
    ("weight ndim", (X, _t(16), B, N), {}, ValueError, "weight"),
    ("weight dtype", (X, _t(24, 16, dtype=torch.float16), B, N), {}, TypeError, "weight"),
    ("weight K", (X, _t(24, 15), B, N), {}, ValueError, "weight"),
    ("weight no rows", (X, _t(0, 16), None, N), {}, ValueError, "weight"),
    ("weight strided", (X, _t(16, 24).t(), B, N), {}, ValueError, "weight"),
    ("bias not a tensor", (X, W, [0.0] * 24, N), {}, TypeError, "bias"),
    ("bias ndim", (X, W, _t(1, 24), N), {}, ValueError, "bias"),
    ("bias dtype", (X, W, _t(24, dtype=torch.float64), N), {}, TypeError, "bias"),
    ("bias shape", (X, W, _t(23), N), {}, ValueError, "bias"),
    ("n_rows int", (X, W, B, 8), {}, TypeError, "n_rows"),
    ("n_rows int64", (X, W, B, _t(1, dtype=torch.int64)), {}, TypeError, "n_rows"),
    ("n_rows float", (X, W, B, _t(1)), {}, TypeError, "n_rows"),
    ("n_rows two values", (X, W, B, _t(2, dtype=torch.int32)), {}, ValueError, "n_rows"),
    ("n_rows empty", (X, W, B, _t(0, dtype=torch.int32)), {}, ValueError, "n_rows"),
    ("n_rows 2-d", (X, W, B, _t(1, 1, dtype=torch.int32)), {}, ValueError, "n_rows"),
    ("activation unknown", (X, W, B, N), {"activation": "swish"}, ValueError, "activation"),
    ("activation case", (X, W, B, N), {"activation": "GELU"}, ValueError, "activation"),
    ("activation not a string", (X, W, B, N), {"activation": F.gelu}, TypeError, "activation"),
    (
        "float64 on triton",
        (_t(8, 16, dtype=torch.float64), W.double(), B.double(), N),
        {"backend": "triton"},
        TypeError,
        "x",
    ),
    ("unknown backend", (X, W, B, N), {"backend": "cuda"}, ValueError, "backend"),
]
if ON_GPU:
    BAD_INPUTS += [
        ("weight on cpu", (X, W.cpu(), B, N), {}, ValueError, "weight"),
        ("bias on cpu", (X, W, B.cpu(), N), {}, ValueError, "bias"),
        ("n_rows on cpu", (X, W, B, N.cpu()), {}, ValueError, "n_rows"),
    ]


@pytest.mark.parametrize(("label", "args", "kwargs", "error", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_before_any_kernel(
    label: str, args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], match: str, monkeypatch
) -> None:
    monkeypatch.setattr(rows_linear_module, "rows_linear_torch", kernel_must_not_run)
    monkeypatch.setattr(triton_rows_linear, "rows_linear_triton", kernel_must_not_run)
    with pytest.raises(error, match=match):
        rows_linear(*args, **kwargs)


@pytest.mark.skipif(not ON_GPU, reason="host synchronisations are only observable on a GPU")
def test_no_host_synchronisation() -> None:
    x, weight, bias = make_inputs(64, 96, 80, torch.float16, seed=4)
    n_rows = live_count(40)
    assert_no_host_synchronisation(lambda: rows_linear(x, weight, bias, n_rows, activation="gelu"))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replays_with_new_row_counts(backend: str) -> None:
    """Captured once, replayed after writing new counts into ``n_rows``: only the live rows are written."""
    x, weight, bias = make_inputs(300, 96, 80, torch.float16, seed=6)
    n_rows = live_count(300)
    graph, y = capture_cuda_graph(lambda: rows_linear(x, weight, bias, n_rows, activation="gelu_tanh", backend=backend))
    want = expected(x, weight, bias, "gelu_tanh")
    for live in (300, 129, 1, 0):
        n_rows.fill_(live)
        poison_(y)
        graph.replay()
        torch.cuda.synchronize()
        check(y, want, live, backend, torch.float16)


# Plans: the GEMMs of BERT-base (d 768, d_ff 3072) and MiniLM (d 384, d_ff 1536) as (k, n): fused QKV, attention
# output, feed-forward in and out; buffers of batch 1 and 8 times every width bucket.
MODEL_GEMMS = {
    "bert-base": ((768, 2304), (768, 768), (768, 3072), (3072, 768)),
    "minilm": ((384, 1152), (384, 384), (384, 1536), (1536, 384)),
}
CAPACITIES = sorted({batch * width for batch in (1, 8) for width in (16, 32, 64, 128, 256, 512)})
SMS = 132


def check_triton_plan(plan: triton_rows_linear.GemmPlan, k: int, n: int, capacity: int) -> None:
    """Tiles are powers of two from 16, ``programs`` is tiles times ``split_k``, and no chunk of ``K`` is empty."""
    assert plan.backend == "triton" and plan.split_k >= 1
    for side in (plan.tiles.block_m, plan.tiles.block_n, plan.tiles.block_k):
        assert side >= 16 and side & (side - 1) == 0, plan
    tiles = -(-capacity // plan.tiles.block_m) * -(-n // plan.tiles.block_n)
    assert plan.programs == tiles * plan.split_k, plan
    k_steps = -(-k // plan.tiles.block_k)
    assert (plan.split_k - 1) * -(-k_steps // plan.split_k) < k_steps, f"an empty chunk of K: {plan}"


@pytest.mark.parametrize("device_name", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
@pytest.mark.parametrize(("model", "index"), [(m, i) for m in MODEL_GEMMS for i in range(4)])
def test_model_gemms_fill_every_sm(device_name: str, model: str, index: int) -> None:
    """At every bucket of batch 1 and 8 a bfloat16 GEMM launches at least one program per SM (splitting K only
    where the tiles alone are too few), unless the measured table sends the shape to cuBLAS."""
    k, n = MODEL_GEMMS[model][index]
    for capacity in CAPACITIES:
        plan = triton_rows_linear.plan_rows_linear(torch.bfloat16, k, n, capacity, SMS, device_name)
        if plan.backend == "cublas":
            assert plan.source == "table"
            continue
        check_triton_plan(plan, k, n, capacity)
        assert plan.programs >= SMS, (capacity, plan)
        if plan.source == "heuristic" and plan.split_k > 1:
            assert plan.programs // plan.split_k < SMS, f"split although the tiles fill the SMs: {plan}"


def test_heuristic_does_not_split_a_full_launch() -> None:
    plan = triton_rows_linear.plan_rows_linear(torch.bfloat16, 768, 3072, 4096, SMS, "NVIDIA H100 80GB HBM3")
    assert plan.split_k == 1 and plan.programs >= SMS


def test_shipped_table_is_well_formed() -> None:
    table = json.loads(triton_rows_linear.TABLE_PATH.read_text())
    assert table["_schema"] and isinstance(table["provenance"], dict)
    keys = [(e["device"], e["dtype"], e["k"], e["n"], e["capacity"]) for e in table["entries"]]
    assert len(keys) == len(set(keys)), "a shape appears twice"
    for entry in table["entries"]:
        assert entry["device"] in table["provenance"] and entry["backend"] in triton_rows_linear.BACKENDS
        if entry["backend"] == "triton":
            plan = triton_rows_linear.plan_rows_linear(
                getattr(torch, entry["dtype"]), entry["k"], entry["n"], entry["capacity"], SMS, entry["device"]
            )
            assert plan.source == "table" and plan.split_k == entry["split_k"]
            check_triton_plan(plan, entry["k"], entry["n"], entry["capacity"])


def forced_plan(
    dtype: torch.dtype, k: int, n: int, capacity: int, split_k: int, backend: str = "triton"
) -> triton_rows_linear.GemmPlan:
    """The heuristic plan on ``DEVICE`` (the interpreter's on the CPU) with ``BLOCK_K`` 32, ``split_k`` and
    ``backend`` forced."""
    plan = triton_rows_linear.device_plan(dtype, k, n, capacity, DEVICE, use_table=False)
    return plan._replace(tiles=plan.tiles._replace(block_k=32), split_k=split_k, backend=backend)


def run_plan(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    live: int,
    plan: triton_rows_linear.GemmPlan,
    activation: str | None,
) -> torch.Tensor:
    """The Triton wrapper with an explicit plan, outputs and workspace poisoned."""
    with poisoned_allocations():
        return triton_rows_linear.rows_linear_triton(
            x, weight, bias, live_count(live), activation=activation, plan=plan
        )


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("split_k", [2, 3, 4])
@pytest.mark.parametrize("live", [0, 1, 37, 50])
def test_split_k_matches_float64(dtype: torch.dtype, split_k: int, live: int) -> None:
    """K = 150 in steps of 32 (the last one partial) cut into 2, 3 or 4 chunks (4 leaves one empty), with bias and
    an activation, live rows 0, 1, odd and all; counters are left at zero."""
    activation = ACTIVATIONS[(split_k + live) % len(ACTIVATIONS)]
    x, weight, bias = make_inputs(50, 150, 72, dtype, seed=split_k * 100 + live)
    plan = forced_plan(dtype, 150, 72, 50, split_k)
    y = run_plan(x, weight, bias, live, plan, activation)
    check(y, expected(x, weight, bias, activation), live, "triton", dtype)
    assert int(counters(1, DEVICE).abs().sum()) == 0, "arrival counters not left at zero"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_split_k_is_bitwise_reproducible(dtype: torch.dtype) -> None:
    x, weight, bias = make_inputs(64, 200, 64, dtype, seed=11)
    plan = forced_plan(dtype, 200, 64, 64, split_k=3)
    first = run_plan(x, weight, bias, 61, plan, "gelu")
    for _ in range(2):
        assert torch.equal(run_plan(x, weight, bias, 61, plan, "gelu")[:61], first[:61])


def test_default_plan_splits_a_narrow_launch() -> None:
    """A shape with fewer tiles than the device has SMs (the interpreter's planner assumes 4) is split by
    ``rows_linear`` itself."""
    x, weight, bias = make_inputs(20, 200, 40, torch.float32, seed=12)
    assert triton_rows_linear.device_plan(torch.float32, 200, 40, 20, DEVICE).split_k > 1
    y = run(x, weight, bias, live_count(19), "triton", "relu")
    check(y, expected(x, weight, bias, "relu"), 19, "triton", torch.float32)


def test_table_entries_override_the_heuristic(monkeypatch) -> None:
    """A "triton" entry sets tiles and split; a "cublas" entry runs ``F.linear`` over every row."""
    x, weight, bias = make_inputs(40, 64, 48, torch.float32, seed=13)
    sm_count, device_name = triton_rows_linear.device_traits(x.device)
    key = {"device": device_name, "dtype": "float32", "k": 64, "n": 48, "capacity": 40}
    tiles = {"block_m": 16, "block_n": 16, "block_k": 16, "group_m": 1, "num_warps": 2, "num_stages": 1}
    entry = {**key, "backend": "triton", **tiles, "split_k": 2}
    monkeypatch.setattr(triton_rows_linear, "gemm_table", lambda: {tuple(key.values()): entry})
    plan = triton_rows_linear.plan_rows_linear(torch.float32, 64, 48, 40, sm_count, device_name)
    assert plan.source == "table" and plan.tiles._asdict() == tiles and plan.split_k == 2 and plan.programs == 18
    check(run(x, weight, bias, live_count(23), "triton"), expected(x, weight, bias, None), 23, "triton", torch.float32)
    entry["backend"] = "cublas"
    plan = triton_rows_linear.plan_rows_linear(torch.float32, 64, 48, 40, sm_count, device_name)
    assert plan.backend == "cublas" and plan.source == "table" and plan.programs == 0
    y = run(x, weight, bias, live_count(23), "triton")
    check(y, expected(x, weight, bias, None), 23, "torch", torch.float32)


def test_wrapper_rejects_a_cublas_plan() -> None:
    x, weight, bias = make_inputs(8, 16, 16, torch.float32, seed=14)
    plan = forced_plan(torch.float32, 16, 16, 8, split_k=1, backend="cublas")
    with pytest.raises(ValueError, match="plan"):
        triton_rows_linear.rows_linear_triton(x, weight, bias, live_count(8), plan=plan)
