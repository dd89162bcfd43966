"""Tests of ``linear_add_layer_norm`` against the same function in float64 (its two roundings to the input dtype
mirrored), of its Triton launches split over column and K chunks, and of its GPU plans.

Only the rows that a live row lands in are specified; every other row of the (poisoned) Triton output must keep
its poison. The PyTorch backend must be exactly ``rows_linear`` then ``add_layer_norm`` then the scatter.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from mp_kernels._triton.linear_add_layer_norm import linear_add_layer_norm_triton, make_plan, plan
from mp_kernels._triton.semaphores import counters
from mp_kernels.add_layer_norm import add_layer_norm
from mp_kernels.linear_add_layer_norm import linear_add_layer_norm
from mp_kernels.rows_linear import rows_linear
from tests.utils import (
    DEVICE,
    KERNEL_DTYPES,
    ON_GPU,
    assert_close,
    assert_no_host_synchronisation,
    capture_cuda_graph,
    kernel_must_not_run,
    live_count,
    poison_,
    poisoned_allocations,
)

module = importlib.import_module("mp_kernels.linear_add_layer_norm")
triton_module = importlib.import_module("mp_kernels._triton.linear_add_layer_norm")

EPS = 1e-5
# The float64 reference rounds v and s as the kernel does, but may round a product that sits on a tie the other way
# (one unit of v, amplified by 1/std(s)), and the output is rounded once more.
SCALE = 4.0
SHAPES = [(5, 7), (48, 40), (96, 64), (128, 64)]  # (K, N): below a tile, uneven, tile multiples, BERT-like

Inputs = tuple[torch.Tensor, ...]


def make_inputs(capacity: int, k: int, n: int, dtype: torch.dtype, seed: int) -> Inputs:
    """``x`` ``(capacity, k)``, ``weight`` ``(n, k)`` scaled as initialised, ``bias``, ``residual`` ``(capacity, n)``,
    ``norm_weight`` near 1 and ``norm_bias`` near 0."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(capacity, k, generator=generator)
    weight = torch.randn(n, k, generator=generator) / k**0.5
    bias = torch.randn(n, generator=generator) * 0.5
    residual = torch.randn(capacity, n, generator=generator)
    norm_weight = 1 + 0.2 * torch.randn(n, generator=generator)
    norm_bias = 0.2 * torch.randn(n, generator=generator)
    return tuple(t.to(dtype=dtype, device=DEVICE) for t in (x, weight, bias, residual, norm_weight, norm_bias))


def expected(inputs: Inputs) -> torch.Tensor:
    """Every row in float64 on the CPU: ``v`` and ``v + residual`` rounded to the input dtype, then LayerNorm."""
    x, weight, bias, residual, norm_weight, norm_bias = (t.cpu().double() for t in inputs)
    dtype = inputs[0].dtype
    v = F.linear(x, weight, bias).to(dtype).double()
    s = (v + residual).to(dtype).double()
    return F.layer_norm(s, (s.shape[1],), norm_weight, norm_bias, EPS)


def run(inputs: Inputs, live: int, backend: str, dest: torch.Tensor | None = None, **launch: int) -> torch.Tensor:
    """The op with poisoned allocations (the workspace too); ``launch`` (``block_m``, ``block_nc``, ``block_k``,
    ``split_k``) forces a Triton plan."""
    x, weight = inputs[:2]
    with poisoned_allocations():
        if launch:
            tiles = make_plan(x.dtype, x.shape[1], weight.shape[0], x.shape[0], **launch)
            y = linear_add_layer_norm_triton(*inputs, EPS, live_count(live), dest=dest, launch=tiles)
        else:
            y = linear_add_layer_norm(*inputs, EPS, live_count(live), dest=dest, backend=backend)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], weight.shape[0]) and y.device == x.device
    return y


def check(y: torch.Tensor, want: torch.Tensor, live: int, dest: torch.Tensor | None = None) -> None:
    """Rows that live rows land in match ``want`` (at the input dtype's tolerance); all others are still NaN."""
    y, capacity = y.cpu(), y.shape[0]
    live = max(0, min(live, capacity))
    sources = torch.arange(live)
    targets = sources if dest is None else dest[:live].cpu().long()
    lands = (targets >= 0) & (targets < capacity)
    sources, targets = sources[lands], targets[lands]
    assert_close(y[targets], want[sources], y.dtype, scale=SCALE)
    unwritten = torch.ones(capacity, dtype=torch.bool)
    unwritten[targets] = False
    assert bool(y[unwritten].isnan().all()), "rows no live row lands in were written"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(("k", "n"), SHAPES)
@pytest.mark.parametrize(("block_nc", "split_k"), [(64, 1), (64, 2), (64, 3), (32, 2)])
def test_split_launches_match_float64(dtype: torch.dtype, k: int, n: int, block_nc: int, split_k: int) -> None:
    """Split 1/2/3 over K (16-wide steps) and over column chunks of 32: the same rows, at the same tolerance."""
    inputs = make_inputs(50, k, n, dtype, seed=k + n + split_k)
    y = run(inputs, 37, "triton", block_m=16, block_nc=block_nc, block_k=16, split_k=split_k)
    check(y, expected(inputs), 37)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize(("k", "n"), SHAPES)
def test_matches_float64(backend: str, dtype: torch.dtype, k: int, n: int) -> None:
    inputs = make_inputs(45, k, n, dtype, seed=k * n)
    y = run(inputs, 45, backend)
    check(y, expected(inputs), 45)


@pytest.mark.out_of_range
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("live", [0, 1, 17, 31, 48, -3, 71])
def test_live_row_counts_are_clamped(live: int, split_k: int) -> None:
    """n_rows of 0, 1, odd, prime, the whole capacity, and out of range (clamped into [0, capacity])."""
    inputs = make_inputs(48, 48, 40, torch.float32, seed=live + 7)
    y = run(inputs, live, "triton", block_m=16, block_nc=32, block_k=16, split_k=split_k)
    check(y, expected(inputs), live)


@pytest.mark.out_of_range
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("live", [1, 29, 40])
def test_rows_land_at_their_destinations(backend: str, split_k: int, live: int) -> None:
    """A permutation with drops (-1, -7 and out-of-range 40, 99): live rows land at dest, dead rows never do."""
    inputs = make_inputs(40, 96, 64, torch.float16, seed=live)
    dest = torch.randperm(40, generator=torch.Generator().manual_seed(live)).int()
    dest[3::5] = -1
    dest[4::9] = torch.tensor([-7, 40, 99, 40, 99], dtype=torch.int32)[: len(dest[4::9])]
    dest = dest.to(DEVICE)
    launch = {"block_m": 16, "block_nc": 64, "block_k": 32, "split_k": split_k} if backend == "triton" else {}
    y = run(inputs, live, backend, dest=dest, **launch)
    check(y, expected(inputs), live, dest)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_torch_backend_is_rows_linear_then_add_layer_norm(dtype: torch.dtype) -> None:
    x, weight, bias, residual, norm_weight, norm_bias = make_inputs(33, 56, 40, dtype, seed=3)
    n_rows = live_count(33)
    y = linear_add_layer_norm(x, weight, bias, residual, norm_weight, norm_bias, EPS, n_rows, backend="torch")
    v = rows_linear(x, weight, bias, n_rows, backend="torch")
    assert torch.equal(y, add_layer_norm(v, residual, norm_weight, norm_bias, EPS, n_rows, backend="torch"))


@pytest.mark.parametrize(("block_nc", "split_k"), [(64, 3), (32, 2)])
def test_split_launches_are_bitwise_deterministic_and_leave_counters_at_zero(block_nc: int, split_k: int) -> None:
    inputs = make_inputs(64, 128, 64, torch.float16, seed=11)
    first = run(inputs, 61, "triton", block_m=16, block_nc=block_nc, block_k=16, split_k=split_k)
    for _ in range(2):
        again = run(inputs, 61, "triton", block_m=16, block_nc=block_nc, block_k=16, split_k=split_k)
        assert torch.equal(first[:61], again[:61])
        assert int(counters(4, DEVICE)[:4].abs().sum()) == 0


def test_empty_buffer() -> None:
    inputs = make_inputs(0, 16, 24, torch.float32, seed=1)
    for backend in ("triton", "torch"):
        assert run(inputs, 0, backend, dest=torch.zeros(0, dtype=torch.int32, device=DEVICE)).shape == (0, 24)


def test_float64_on_torch_backend() -> None:
    inputs = make_inputs(9, 12, 7, torch.float64, seed=2)
    torch.testing.assert_close(run(inputs, 9, "torch").cpu(), expected(inputs), atol=1e-12, rtol=1e-10)


# (K, N) of BERT-base's and MiniLM's attention-output and feed-forward-output layers.
MODEL_SHAPES = [(768, 768), (3072, 768), (384, 384), (1536, 384)]
BATCH_1_CAPACITIES = [16, 32, 64, 128, 256, 512]


@pytest.mark.parametrize(("k", "n"), MODEL_SHAPES)
@pytest.mark.parametrize("capacity", BATCH_1_CAPACITIES + [8 * c for c in BATCH_1_CAPACITIES])
def test_gpu_plans_fill_132_sms(k: int, n: int, capacity: int) -> None:
    """Every BERT-base and MiniLM shape at batch 1 and 8 launches at least one program per SM, in tiles a GPU
    accepts: dims of at least 16, whole rows for the epilogue, K chunks of whole steps."""
    tiles = plan(torch.bfloat16, k, n, capacity, 132)
    assert tiles.programs >= 132
    assert min(tiles.block_m, tiles.block_nc, tiles.block_k) >= 16 and tiles.block_n >= n
    assert (
        tiles.k_chunk % tiles.block_k == 0 and (tiles.split_k - 1) * tiles.k_chunk < k <= tiles.split_k * tiles.k_chunk
    )
    assert tiles.programs == -(-capacity // tiles.block_m) * tiles.n_chunks * tiles.split_k


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


X, W, B, R, NW, NB, N = _t(8, 16), _t(24, 16), _t(24), _t(8, 24), _t(24), _t(24), live_count(8)
GOOD = (X, W, B, R, NW, NB, EPS, N)


def _with(index: int, value: object) -> tuple[object, ...]:
    return (*GOOD[:index], value, *GOOD[index + 1 :])


BAD_INPUTS: list[tuple[str, tuple[object, ...], dict[str, object], type[Exception], str]] = [
    ("x not a tensor", _with(0, [[0.0] * 16]), {}, TypeError, "x"),
    ("x ndim", _with(0, _t(16)), {}, ValueError, "x"),
    ("x dtype", _with(0, _t(8, 16, dtype=torch.int32)), {}, TypeError, "x"),
    ("x strided", _with(0, _t(16, 8).t()), {}, ValueError, "x"),
    ("x no features", (_t(8, 0), _t(24, 0), *GOOD[2:]), {}, ValueError, "x"),
    ("weight not a tensor", _with(1, None), {}, TypeError, "weight"),
    ("weight dtype", _with(1, _t(24, 16, dtype=torch.float16)), {}, TypeError, "weight"),
    ("weight K", _with(1, _t(24, 15)), {}, ValueError, "weight"),
    ("weight no rows", _with(1, _t(0, 16)), {}, ValueError, "weight"),
    ("weight strided", _with(1, _t(16, 24).t()), {}, ValueError, "weight"),
    ("bias None", _with(2, None), {}, TypeError, "bias"),
    ("bias dtype", _with(2, _t(24, dtype=torch.float64)), {}, TypeError, "bias"),
    ("bias shape", _with(2, _t(23)), {}, ValueError, "bias"),
    ("residual not a tensor", _with(3, 0.0), {}, TypeError, "residual"),
    ("residual dtype", _with(3, _t(8, 24, dtype=torch.float16)), {}, TypeError, "residual"),
    ("residual shape", _with(3, _t(8, 23)), {}, ValueError, "residual"),
    ("residual strided", _with(3, _t(24, 8).t()), {}, ValueError, "residual"),
    ("norm_weight ndim", _with(4, _t(1, 24)), {}, ValueError, "norm_weight"),
    ("norm_weight dtype", _with(4, _t(24, dtype=torch.float16)), {}, TypeError, "norm_weight"),
    ("norm_bias shape", _with(5, _t(25)), {}, ValueError, "norm_bias"),
    ("eps zero", _with(6, 0.0), {}, ValueError, "eps"),
    ("eps nan", _with(6, float("nan")), {}, ValueError, "eps"),
    ("eps tensor", _with(6, torch.tensor(EPS)), {}, TypeError, "eps"),
    ("eps bool", _with(6, True), {}, TypeError, "eps"),
    ("n_rows int", _with(7, 8), {}, TypeError, "n_rows"),
    ("n_rows int64", _with(7, _t(1, dtype=torch.int64)), {}, TypeError, "n_rows"),
    ("n_rows two values", _with(7, _t(2, dtype=torch.int32)), {}, ValueError, "n_rows"),
    ("dest int64", GOOD, {"dest": _t(8, dtype=torch.int64)}, TypeError, "dest"),
    ("dest shape", GOOD, {"dest": _t(7, dtype=torch.int32)}, ValueError, "dest"),
    ("dest 2-d", GOOD, {"dest": _t(8, 1, dtype=torch.int32)}, ValueError, "dest"),
    ("dest list", GOOD, {"dest": [0] * 8}, TypeError, "dest"),
    (
        "float64 on triton",
        tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in GOOD),
        {"backend": "triton"},
        TypeError,
        "x",
    ),
    (
        "too wide on triton",
        (X, _t(1025, 16), _t(1025), _t(8, 1025), _t(1025), _t(1025), EPS, N),
        {"backend": "triton"},
        ValueError,
        "weight",
    ),
    ("unknown backend", GOOD, {"backend": "cuda"}, ValueError, "backend"),
]
if ON_GPU:
    BAD_INPUTS += [
        ("residual on cpu", _with(3, R.cpu()), {}, ValueError, "residual"),
        ("n_rows on cpu", _with(7, N.cpu()), {}, ValueError, "n_rows"),
        ("dest on cpu", GOOD, {"dest": _t(8, dtype=torch.int32).cpu()}, ValueError, "dest"),
    ]


@pytest.mark.parametrize(("label", "args", "kwargs", "error", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_before_any_kernel(
    label: str, args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], match: str, monkeypatch
) -> None:
    monkeypatch.setattr(module, "linear_add_layer_norm_torch", kernel_must_not_run)
    monkeypatch.setattr(triton_module, "linear_add_layer_norm_triton", kernel_must_not_run)
    with pytest.raises(error, match=match):
        linear_add_layer_norm(*args, **kwargs)


@pytest.mark.skipif(not ON_GPU, reason="host synchronisations are only observable on a GPU")
@pytest.mark.parametrize("capacity", [16, 512])
def test_no_host_synchronisation(capacity: int) -> None:
    inputs = make_inputs(capacity, 768, 768, torch.bfloat16, seed=4)
    dest = torch.arange(capacity, dtype=torch.int32, device=DEVICE).flip(0)
    n_rows = live_count(capacity - 3)
    assert_no_host_synchronisation(lambda: linear_add_layer_norm(*inputs, EPS, n_rows, dest=dest))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(("capacity", "k"), [(16, 3072), (300, 768)])
def test_cuda_graph_replays_with_new_row_counts(backend: str, capacity: int, k: int) -> None:
    """Captured once (split launches included), replayed after writing new counts into ``n_rows``."""
    inputs = make_inputs(capacity, k, 768, torch.bfloat16, seed=6)
    dest = torch.randperm(capacity, generator=torch.Generator().manual_seed(0)).int().to(DEVICE)
    n_rows = live_count(capacity)
    graph, y = capture_cuda_graph(lambda: linear_add_layer_norm(*inputs, EPS, n_rows, dest=dest, backend=backend))
    want = expected(inputs)
    for live in (capacity, capacity // 2 + 1, 1, 0):
        n_rows.fill_(live)
        poison_(y)
        graph.replay()
        torch.cuda.synchronize()
        check(y, want, live, dest)
