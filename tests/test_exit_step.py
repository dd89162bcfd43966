"""``exit_step`` against a float64 per-slot oracle (segment mean, sub-classifier, normalised entropy), both backends.

Exit decisions must match the oracle wherever the oracle's uncertainty is not within the dtype's tolerance of
``tau``; exiting slots' logits match at the dtype's tolerance; slots that do not exit, dead slots and empty
slots keep their (poisoned) outputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from mp_kernels import exit_step
from mp_kernels._triton.exit_step import CHUNK
from mp_kernels._triton.semaphores import counters
from tests.utils import DEVICE, KERNEL_DTYPES, TOLERANCE, assert_close

BACKENDS = ["triton", "torch"]
LENGTHS = [5, 0, 1, 17, 3, 40, 2, 9]
ALIVE = [True, True, True, False, True, True, True, True]
D, WIDTH, CLASSES = 48, 24, 3
# Logits pass through two products rounded to the dtype: their error grows with |logit| (about 4 here).
LOGIT_SCALE = 4.0


def make_case(dtype: torch.dtype, seed: int = 0, lengths: list[int] = LENGTHS):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths) + 2
    hidden = torch.randn(total, D, generator=generator, dtype=torch.float64) + 0.3
    weights = (
        torch.randn(WIDTH, D, generator=generator, dtype=torch.float64) * 0.3,
        torch.randn(WIDTH, generator=generator, dtype=torch.float64),
        torch.randn(CLASSES, WIDTH, generator=generator, dtype=torch.float64) * 1.5,
        torch.randn(CLASSES, generator=generator, dtype=torch.float64),
    )
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return hidden.to(DEVICE, dtype), cu, [w.to(DEVICE, dtype) for w in weights]


def oracle(hidden, cu, weights):
    """Per-slot logits and uncertainty in float64 from the same rounded inputs (NaN for empty slots)."""
    w1, b1, w2, b2 = (w.double().cpu() for w in weights)
    bounds = cu.tolist()
    logits, uncertainty = [], []
    for slot in range(len(bounds) - 1):
        rows = hidden.double().cpu()[bounds[slot] : bounds[slot + 1]]
        if rows.shape[0] == 0:
            logits.append(torch.full((CLASSES,), math.nan, dtype=torch.float64))
            uncertainty.append(math.nan)
            continue
        z = torch.tanh(rows.mean(0) @ w1.T + b1) @ w2.T + b2
        p = z.softmax(0)
        logits.append(z)
        uncertainty.append(float(-(p * p.log()).sum() / math.log(CLASSES)))
    return torch.stack(logits), torch.tensor(uncertainty, dtype=torch.float64)


def run(backend, hidden, cu, weights, tau, schedule=None, alive=ALIVE, layer=2, max_seqlen=None):
    batch = cu.numel() - 1
    logits = torch.full((batch, CLASSES), math.nan, dtype=hidden.dtype, device=DEVICE)
    exit_layer = torch.full((batch,), 99, dtype=torch.int64, device=DEVICE)
    alive = torch.tensor(alive, device=DEVICE)
    tau = torch.tensor([tau], dtype=torch.float32, device=DEVICE)
    exit_step(
        hidden,
        cu,
        *weights,
        tau,
        layer,
        logits,
        exit_layer,
        alive,
        schedule=schedule,
        max_seqlen=max_seqlen,
        backend=backend,
    )
    return logits.cpu(), exit_layer.cpu(), alive.cpu()


def assert_every_live_slot_exits_with_the_oracle_logits(lengths, alive, logits, exit_layer, expected, dtype):
    """With ``tau = 1`` every live non-empty slot exits with the oracle's logits; the others keep their poison."""
    for slot, (n, live) in enumerate(zip(lengths, alive, strict=True)):
        if live and n > 0:
            assert exit_layer[slot] == 2, f"slot {slot}"
            assert_close(logits[slot], expected[slot], dtype, scale=LOGIT_SCALE)
        else:
            assert logits[slot].isnan().all() and exit_layer[slot] == 99, f"slot {slot} written"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("tau", [0.0, 0.5, 0.8, 0.95, 1.0])
def test_matches_the_float64_oracle(backend: str, dtype: torch.dtype, tau: float) -> None:
    hidden, cu, weights = make_case(dtype)
    expected_logits, uncertainty = oracle(hidden, cu, weights)
    logits, exit_layer, alive = run(backend, hidden, cu, weights, tau)
    was_alive = torch.tensor(ALIVE)
    margin = 10 * TOLERANCE[dtype][0] * LOGIT_SCALE
    for slot in range(len(LENGTHS)):
        if not was_alive[slot] or LENGTHS[slot] == 0:
            expected_exit = False
        elif abs(float(uncertainty[slot]) - tau) <= margin:
            continue
        else:
            expected_exit = float(uncertainty[slot]) <= tau
        assert bool(exit_layer[slot] == 2) == expected_exit, f"slot {slot}"
        assert bool(alive[slot]) == (bool(was_alive[slot]) and not expected_exit), f"slot {slot}"
        if expected_exit:
            assert_close(logits[slot], expected_logits[slot], dtype, scale=LOGIT_SCALE)
        else:
            assert logits[slot].isnan().all() and exit_layer[slot] == 99, f"slot {slot} written"


@pytest.mark.parametrize("backend", BACKENDS)
def test_tau_one_retires_every_live_nonempty_slot(backend: str) -> None:
    hidden, cu, weights = make_case(torch.float32)
    _, exit_layer, alive = run(backend, hidden, cu, weights, 1.0)
    expected = [a and n > 0 for a, n in zip(ALIVE, LENGTHS, strict=True)]
    assert (exit_layer == 2).tolist() == expected
    assert alive.tolist() == [a and not e for a, e in zip(ALIVE, expected, strict=True)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_schedule_replaces_the_entropy_test(backend: str) -> None:
    hidden, cu, weights = make_case(torch.float32)
    schedule = torch.tensor([2, 2, 2, 2, 1, 3, 2, 9], device=DEVICE)
    _, exit_layer, alive = run(backend, hidden, cu, weights, 0.0, schedule=schedule)
    expected = [a and n > 0 and s == 2 for a, n, s in zip(ALIVE, LENGTHS, schedule.tolist(), strict=True)]
    assert (exit_layer == 2).tolist() == expected


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_never_exits(backend: str) -> None:
    """One NaN policy on both backends: a NaN uncertainty fails ``<= tau``, even at ``tau = 1``."""
    hidden, cu, weights = make_case(torch.float32)
    hidden[0, 0] = math.nan
    hidden[int(cu[4]) : int(cu[5])] = math.inf
    _, exit_layer, alive = run(backend, hidden, cu, weights, 1.0)
    assert exit_layer[0] == 99 and alive[0]
    assert exit_layer[4] == 99 and alive[4]
    assert exit_layer[2] == 2 and not alive[2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_tau_lets_nothing_exit(backend: str) -> None:
    """The same policy from the other side: ``uncertainty <= NaN`` is false, so a NaN ``tau`` exits no slot."""
    hidden, cu, weights = make_case(torch.float32)
    logits, exit_layer, alive = run(backend, hidden, cu, weights, math.nan)
    assert (exit_layer == 99).all() and alive.tolist() == ALIVE and logits.isnan().all()


def test_backends_agree_on_the_logits() -> None:
    hidden, cu, weights = make_case(torch.float32, seed=5)
    a, b = (run(backend, hidden, cu, weights, 1.0)[0] for backend in BACKENDS)
    written = ~a.isnan().any(dim=1)
    torch.testing.assert_close(a[written], b[written], atol=1e-5, rtol=1e-5)


LONG = [3 * CHUNK + 5, 1, CHUNK, 2 * CHUNK + 1, 0, 7, CHUNK + 1]  # slots of 1 to 4 row chunks


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("max_seqlen", [1, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5, None])
def test_the_grid_hint_never_changes_the_function(dtype: torch.dtype, max_seqlen: int | None) -> None:
    """``max_seqlen`` sizes the grid only: slots longer than the grid covers are pooled whole, by fewer programs."""
    hidden, cu, weights = make_case(dtype, seed=3, lengths=LONG)
    alive = [True] * len(LONG)
    expected, _ = oracle(hidden, cu, weights)
    logits, exit_layer, _ = run("triton", hidden, cu, weights, 1.0, alive=alive, max_seqlen=max_seqlen)
    assert_every_live_slot_exits_with_the_oracle_logits(LONG, alive, logits, exit_layer, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_slots(backend: str) -> None:
    generator = torch.Generator().manual_seed(11)
    lengths = torch.randint(0, 2 * CHUNK + 3, (37,), generator=generator).tolist()
    lengths[:4] = [0, 1, 2 * CHUNK + 2, CHUNK]
    alive = (torch.rand(37, generator=generator) < 0.8).tolist()
    hidden, cu, weights = make_case(torch.float32, seed=4, lengths=lengths)
    expected, _ = oracle(hidden, cu, weights)
    logits, exit_layer, still_alive = run(backend, hidden, cu, weights, 1.0, alive=alive)
    assert_every_live_slot_exits_with_the_oracle_logits(lengths, alive, logits, exit_layer, expected, torch.float32)
    assert still_alive.tolist() == [live and n == 0 for n, live in zip(lengths, alive, strict=True)]


@pytest.mark.parametrize(
    ("lengths", "alive"),
    [
        (LONG, [True] * len(LONG)),
        (LONG, [False] * len(LONG)),
        (LONG, [True, False, True, False, True, False, True]),
        ([0, 0, 0], [True, True, True]),
    ],
)
@pytest.mark.parametrize("max_seqlen", [1, None])
def test_arrival_counters_are_left_at_zero(lengths: list[int], alive: list[bool], max_seqlen: int | None) -> None:
    """Dead and empty slots never arrive; live ones reset their counter: a CUDA graph can replay the launch."""
    hidden, cu, weights = make_case(torch.float32, lengths=lengths)
    buffer = counters(len(lengths), DEVICE)
    for _ in range(2):
        run("triton", hidden, cu, weights, 0.5, alive=alive, max_seqlen=max_seqlen)
        assert int(buffer.abs().sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_runs_are_bitwise_identical(backend: str, dtype: torch.dtype) -> None:
    """Partial sums are added in a fixed order, whichever program arrives last."""
    hidden, cu, weights = make_case(dtype, seed=6, lengths=LONG)
    alive = [True] * len(LONG)
    first, second = (run(backend, hidden, cu, weights, 1.0, alive=alive, max_seqlen=CHUNK)[0] for _ in range(2))
    torch.testing.assert_close(first, second, rtol=0, atol=0, equal_nan=True)


def _args():
    hidden, cu, weights = make_case(torch.float32)
    batch = cu.numel() - 1
    return dict(
        hidden=hidden,
        cu_seqlens=cu,
        dense_weight=weights[0],
        dense_bias=weights[1],
        classifier_weight=weights[2],
        classifier_bias=weights[3],
        tau=torch.zeros(1, device=DEVICE),
        layer=1,
        logits=torch.zeros(batch, CLASSES, device=DEVICE),
        exit_layer=torch.zeros(batch, dtype=torch.int64, device=DEVICE),
        alive=torch.ones(batch, dtype=torch.bool, device=DEVICE),
    )


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("hidden", "x", TypeError),
        ("dense_weight", torch.zeros(WIDTH, D + 1, device=DEVICE), ValueError),
        ("dense_bias", torch.zeros(WIDTH + 1, device=DEVICE), ValueError),
        ("classifier_weight", torch.zeros(1, WIDTH, device=DEVICE), ValueError),
        ("classifier_bias", torch.zeros(CLASSES, device=DEVICE).half(), TypeError),
        ("tau", torch.zeros(2, device=DEVICE), ValueError),
        ("tau", 0.5, TypeError),
        ("layer", 0, ValueError),
        ("logits", torch.zeros(3, CLASSES, device=DEVICE), ValueError),
        ("exit_layer", torch.zeros(len(LENGTHS), dtype=torch.int32, device=DEVICE), TypeError),
        ("alive", torch.ones(2, dtype=torch.bool, device=DEVICE), ValueError),
        ("schedule", torch.zeros(2, dtype=torch.int64, device=DEVICE), ValueError),
        ("max_seqlen", 0, ValueError),
        ("max_seqlen", sum(LENGTHS) + 3, ValueError),
        ("max_seqlen", 4.0, TypeError),
    ],
)
def test_bad_inputs_raise(name: str, value: object, error: type[Exception]) -> None:
    args = _args()
    args[name] = value
    with pytest.raises(error, match=name):
        exit_step(**args)
