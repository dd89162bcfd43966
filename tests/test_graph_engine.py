"""Specification of the GPU engine (``mp_model.graph_engine``): same results as the packed path, no host
synchronisation, the same launches whatever the outcome, buckets and knobs without recapture.

On a CPU the Triton side runs under the interpreter (structure and arithmetic, not speed); on a GPU the same
tests run the engine on CUDA, where it captures CUDA graphs, and the GPU-only tests check capture and replay.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench.floors import per_layer_launches
from bench.launches import record_launches
from mp_model.graph_engine import bucket
from tests.test_model import KNOB_SETTINGS as KNOBS
from tests.test_model import LENGTHS, TINY, random_batch, tiny_model
from tests.utils import DEVICE, ON_GPU

THRESHOLDS = [0.97, 1.01, 1.03, 1.05]
SYNC_OPS = ("_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero")
HOST_READS = ("tolist", "cpu", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture(scope="module")
def model():
    return tiny_model(THRESHOLDS).float().to(DEVICE)


@pytest.fixture(scope="module")
def batch():
    return {name: tensor.to(DEVICE) for name, tensor in random_batch(LENGTHS, TINY["vocab_size"]).items()}


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("knobs", KNOBS, ids=[f"knobs{i}" for i in range(len(KNOBS))])
def test_same_results_as_the_packed_path(model, batch, backend: str, knobs: dict[str, Any]) -> None:
    expected = model(**batch, **knobs, engine="packed", backend="torch")
    out = model(**batch, **knobs, engine="graph", backend=backend)
    assert torch.equal(out.exit_layer, expected.exit_layer)
    assert torch.equal(out.kept_tokens, expected.kept_tokens)
    assert torch.equal(out.flops, expected.flops)
    assert torch.equal(out.logits.argmax(dim=1), expected.logits.argmax(dim=1))
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_the_equivalence_test_sees_pruning_exits_and_padding_slots(model, batch) -> None:
    out = model(**batch, tau=0.2, engine="graph", backend="torch")
    lengths = batch["attention_mask"].sum(1)
    layers = TINY["num_hidden_layers"]
    assert (out.exit_layer < layers).any() and (out.exit_layer == layers).any()
    assert (out.kept_tokens[:, 1] < lengths).any()
    assert bucket(len(LENGTHS), model.graph_engine.batch_buckets) > len(LENGTHS), "the batch bucket pads slots"


class SyncRecorder(TorchDispatchMode):
    """Records the ATen operators that read device data back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def host_reads() -> Iterator[list[str]]:
    """ATen reads (dispatch) and Python-level reads (``.tolist()``, ``.cpu()``, ``bool()``...) of tensors made by
    our code; the Triton interpreter's own copies of kernel arguments are not counted."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if not caller.startswith(("triton", "torch", "numpy")):
                calls.append(f"Tensor.{name} from {caller}")
            return original(self, *args, **kwargs)

        return read

    with pytest.MonkeyPatch.context() as patch, SyncRecorder() as recorder:
        for name, original in originals.items():
            patch.setattr(torch.Tensor, name, wrap(name, original))
        yield calls
    calls.extend(recorder.calls)


def test_no_host_synchronisation_between_the_inputs_and_the_outputs(model, batch) -> None:
    knobs = dict(tau=0.2, threshold_scale=1.0, prune=True, early_exit=True, exit_schedule=None, backend="triton")
    engine = model.graph_engine
    engine(**batch, knobs=model.resolve_knobs(**knobs))
    other = random_batch(list(reversed(LENGTHS)), TINY["vocab_size"], seed=5)
    other = {name: tensor.to(DEVICE) for name, tensor in other.items()}
    with host_reads() as calls:
        engine(**other, knobs=model.resolve_knobs(**knobs))
    assert calls == []
    with host_reads() as calls:
        model(**other, tau=0.2, engine="packed", backend="triton", validate=False)
    assert calls, "the recorder must see the packed path's read-backs"


def test_different_outcomes_run_the_same_launches(model, batch) -> None:
    engine = model.graph_engine
    other = random_batch([5, 64, 2, 33, 9, 1, 17, 40, 3, 12], TINY["vocab_size"], seed=9)
    other = {name: tensor.to(DEVICE) for name, tensor in other.items()}
    engine.use_graphs = False
    try:
        runs = []
        for inputs, tau, scale in ((batch, 0.0, 0.5), (other, 0.6, 1.5)):
            knobs = model.resolve_knobs(tau=tau, threshold_scale=scale, prune=True, early_exit=True, backend="triton")
            engine(**inputs, knobs=knobs)
            with record_launches() as calls:
                out = engine(**inputs, knobs=knobs)
            runs.append((calls, out))
    finally:
        engine.use_graphs = None
    (first, a), (second, b) = runs
    assert not torch.equal(a.exit_layer, b.exit_layer) and not torch.equal(a.kept_tokens, b.kept_tokens)
    assert any(call[0] == "_varlen_importance_kernel" for call in first), "the pruning plan must run"
    assert first == second


@pytest.mark.slow
def test_launch_budget_of_a_layer_and_of_the_forward_around_it(request: pytest.FixtureRequest) -> None:
    """Issue #37's structure targets: a pruning and exiting layer is 7 launches (Q/K/V, attention, importance
    with the pruning plan, output projection with add, norm and move, two feed-forward GEMMs, exit step), a dense
    layer 5, a layer without pruning but with exits 7 (exited slots dropped by ``compact_tokens``); no ATen kernel
    inside a layer; outside the layers at most 2 Triton launches (``embed_pack``, ``finish_slots``) and 4 ATen
    kernels per call (copying the inputs in and the outputs out)."""
    if request.config.getoption("--bounds-check"):
        pytest.skip("--bounds-check poisons every allocation with fill kernels, which the count would include")
    split = per_layer_launches()
    expected = {"dense": 5, "ltp": 6, "fastbert": 7, "mp": 7}
    assert {name: parts["layer"]["total"] for name, parts in split.items()} == expected
    for name, parts in split.items():
        assert parts["layer"]["aten"] == 0, name
        assert parts["outside"]["triton"] <= 2 and parts["outside"]["aten"] <= 4, (name, parts["outside"])


def test_buckets_and_knobs_reuse_one_plan(model) -> None:
    from mp_model.graph_engine import GraphEngine

    engine = GraphEngine(model, batch_buckets=(4, 16), width_buckets=(16, 32))
    for lengths, tau, scale in (([3, 9, 16], 0.1, 1.0), ([20, 2, 5, 7], 0.9, 0.5), ([1], 0.5, 2.0)):
        inputs = {n: t.to(DEVICE) for n, t in random_batch(lengths, TINY["vocab_size"]).items()}
        knobs = model.resolve_knobs(tau=tau, threshold_scale=scale, prune=True, early_exit=True, backend="torch")
        engine(**inputs, knobs=knobs)
    assert sorted(engine.stats()["buckets"]) == [[4, 16], [4, 32]]
    knobs = model.resolve_knobs(tau=0.5, threshold_scale=0.0, prune=True, early_exit=True, backend="torch")
    engine(**inputs, knobs=knobs)
    assert engine.stats()["plans"] == 3, "no layer prunes at scale 0: another structure, another plan"


def test_warm_up_prepares_every_width_bucket_up_to_the_length(model) -> None:
    from mp_model.graph_engine import GraphEngine

    engine = GraphEngine(model, batch_buckets=(2, 8), width_buckets=(16, 32, 64))
    stats = engine.warm_up([1, 5], 40, model.resolve_knobs(prune=True, early_exit=True, backend="torch"))
    assert sorted(map(tuple, stats["buckets"])) == [(2, 16), (2, 32), (2, 64), (8, 16), (8, 32), (8, 64)]
    assert stats["graphs"] == 0 or ON_GPU


def test_moving_the_model_drops_its_plans() -> None:
    model = tiny_model(THRESHOLDS).float().to(DEVICE)
    inputs = {n: t.to(DEVICE) for n, t in random_batch([4, 7], TINY["vocab_size"]).items()}
    first = model(**inputs, tau=0.3, engine="graph", backend="torch")
    model.double()
    second = model(**{**inputs}, tau=0.3, engine="graph", backend="torch")
    assert second.logits.dtype == torch.float64 and model.graph_engine.stats()["plans"] == 1
    torch.testing.assert_close(second.logits.float(), first.logits, atol=1e-5, rtol=1e-5)


def test_a_model_used_under_inference_mode_can_be_trained_and_used_again() -> None:
    """The engine's cached state (plans, fused Q/K/V) made under ``torch.inference_mode`` must not be updated in
    place outside it: a user evaluates, fine-tunes a step, then evaluates under ``no_grad`` (which raised
    "Inplace update to inference tensor outside InferenceMode")."""
    model = tiny_model(THRESHOLDS).float().to(DEVICE)
    inputs = {n: t.to(DEVICE) for n, t in random_batch([4, 7], TINY["vocab_size"]).items()}
    with torch.inference_mode():
        model(**inputs, tau=0.3, engine="graph", backend="torch")
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(0.5)
    with torch.no_grad():
        out = model(**inputs, tau=0.3, engine="graph", backend="torch")
    expected = model(**inputs, tau=0.3, engine="packed", backend="torch")
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=1e-4)
    assert not out.logits.is_inference()


def test_engine_choice_is_checked(model, batch) -> None:
    with pytest.raises(ValueError, match="engine"):
        model(**batch, engine="fast")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and sync debug mode need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_equals_the_eager_static_forward(batch, dtype: torch.dtype) -> None:
    model = tiny_model(THRESHOLDS).to(DEVICE, dtype)
    knobs = dict(tau=0.2, threshold_scale=1.0, prune=True, early_exit=True)
    eager = model.graph_engine
    eager.use_graphs = False
    expected = model(**batch, **knobs, engine="graph")
    eager.use_graphs = True
    eager.reset()
    replayed = [model(**batch, **knobs, engine="graph") for _ in range(2)]
    assert eager.stats()["graphs"] == 1 and eager.stats()["graph_memory_bytes"] > 0
    for out in replayed:
        for name in ("logits", "exit_layer", "kept_tokens", "flops"):
            assert torch.equal(getattr(out, name), getattr(expected, name)), name


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs and sync debug mode need a GPU")
def test_sync_debug_mode_passes_on_the_hot_path(model, batch) -> None:
    knobs = dict(tau=0.2, threshold_scale=1.0, prune=True, early_exit=True, engine="graph", validate=False)
    model(**batch, **knobs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for tau in (0.0, 0.5):
            model(**batch, **{**knobs, "tau": tau})
    finally:
        torch.cuda.set_sync_debug_mode("default")
