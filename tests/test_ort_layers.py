"""Specification of the ONNX Runtime runner of lone sequences (``mp_model.ort_layers``, ``mp_model.lone_sequence``,
``engine="ort"``): the same decisions (kept tokens, exit layers, FLOPs) as the float64 oracle and logits within the
float32 tolerance of the table in ``tests.utils``, at batch size 1 and after the other sequences of a batch exited;
sessions follow the model's parameters; the engine is chosen where it runs and refused where it cannot.

ORT's float32 kernels (fused LayerNorms, MLAS GEMMs) land within 1e-5 of float64 but not always within twice
PyTorch's own float32 error, so the table's float32 row is the bound here. The PyTorch kernels are named
(``backend="torch"``) because CI sets ``TRITON_INTERPRET=1``, under which the default backend is Triton's.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification, lone_sequence, packed_inference
from mp_model import ort_layers as ort_module
from mp_model.ort_layers import ort_layers
from tests.model_reference import run_single
from tests.test_model import KNOB_SETTINGS, LENGTHS, TINY, random_batch, tiny_model
from tests.utils import assert_close

pytestmark = pytest.mark.skipif(not ort_module.available(), reason="onnx and onnxruntime are not installed")

THRESHOLDS = [0.97, 1.01, 1.03, 1.05]
# On these inputs, some lone sequences exit after layer 3 and the others run all four layers.
MIXED_EXITS = dict(tau=0.2, threshold_scale=1.0, prune=True, early_exit=True)


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The tiny model in float64 (the oracle's) and a float32 copy (the one ORT runs)."""
    exact = tiny_model(THRESHOLDS)
    return exact, copy.deepcopy(exact).float()


@pytest.mark.parametrize("knobs", [*KNOB_SETTINGS, MIXED_EXITS])
def test_a_lone_sequence_matches_the_oracle(knobs) -> None:
    exact, model = models()
    batch = random_batch(LENGTHS, TINY["vocab_size"], seed=2)
    exit_layers = set()
    for row, n in enumerate(LENGTHS):
        ids, types = batch["input_ids"][row : row + 1, :n], batch["token_type_ids"][row : row + 1, :n]
        ours = model(ids, torch.ones_like(ids), types, **knobs, engine="ort", backend="torch")
        single = run_single(exact, ids[0], types[0], **knobs)
        assert int(ours.exit_layer[0]) == single.exit_layer, f"length {n}"
        assert ours.kept_tokens[0].tolist() == single.kept_tokens, f"length {n}"
        assert int(ours.flops[0]) == single.flops, f"length {n}"
        assert_close(ours.logits[0], single.logits, torch.float32)
        exit_layers.add(single.exit_layer)
    if knobs == MIXED_EXITS:
        assert len(exit_layers) > 1, "some lone sequences exit early, others run every layer"


def test_nan_uncertainty_never_exits_on_either_engine() -> None:
    _, model = models()
    with torch.no_grad():
        model.exits[0].classifier.bias[0] = float("nan")
    batch = random_batch([12], TINY["vocab_size"], seed=8)
    outs = [model(**batch, tau=1.0, early_exit=True, engine=e, backend="torch") for e in ("ort", "packed")]
    assert [int(out.exit_layer[0]) for out in outs] == [2, 2], "NaN at layer 1 stays; tau 1 exits at layer 2"


@pytest.mark.parametrize("survivor_exit", [0, 3])
def test_the_sequence_left_after_the_others_exit_matches_the_oracle(survivor_exit: int) -> None:
    exact, model = models()
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    schedule = torch.tensor([1, 2] * (len(LENGTHS) // 2))
    schedule[6] = survivor_exit  # the 64-token row is left alone after layer 2 (0: it never exits)
    knobs = dict(prune=True, early_exit=True, exit_schedule=schedule, return_exit_logits=True)
    ours = model(**batch, **knobs, engine="ort", backend="torch")
    reference = exact(**batch, **knobs, engine="packed", backend="torch")
    assert ort_layers(model).sessions, "the survivor ran through ONNX Runtime"
    assert ours.exit_layer.tolist() == reference.exit_layer.tolist()
    assert ours.kept_tokens.tolist() == reference.kept_tokens.tolist()
    assert ours.flops.tolist() == reference.flops.tolist()
    assert_close(ours.logits, reference.logits, torch.float32)
    ran = ~reference.exit_logits.isnan()
    assert torch.equal(~ours.exit_logits.isnan(), ran)
    assert_close(ours.exit_logits[ran], reference.exit_logits[ran], torch.float32)


def test_a_long_sequence_is_handed_over_once_pruning_shortens_it(monkeypatch) -> None:
    exact, model = models()
    monkeypatch.setattr(packed_inference, "ORT_MAX_TOKENS", 20)
    batch = random_batch([64], TINY["vocab_size"], seed=9)
    knobs = dict(tau=0.2, threshold_scale=1.0, prune=True, early_exit=True, return_exit_logits=True)
    ours = model(**batch, **knobs, engine="ort", backend="torch")
    reference = exact(**batch, **knobs, engine="packed", backend="torch")
    kept = reference.kept_tokens[0].tolist()
    assert kept[0] > 20 >= min(kept[1:]), "the first layer runs in PyTorch, a later one in ONNX Runtime"
    assert ort_layers(model).sessions
    assert ours.kept_tokens.tolist() == reference.kept_tokens.tolist()
    assert ours.exit_layer.tolist() == reference.exit_layer.tolist()
    assert_close(ours.logits, reference.logits, torch.float32)


def test_every_exit_logit_and_a_replayed_schedule_at_batch_size_one() -> None:
    exact, model = models()
    batch = random_batch([23], TINY["vocab_size"], seed=3)
    never = dict(prune=True, early_exit=False, return_exit_logits=True)  # every sub-classifier, no exit
    for schedule in (0, 2, 3, 7, None):
        knobs = never if schedule is None else dict(never, early_exit=True, exit_schedule=torch.tensor([schedule]))
        ours = model(**batch, **knobs, engine="ort", backend="torch")
        reference = exact(**batch, **knobs, engine="packed", backend="torch")
        assert ours.exit_layer.tolist() == reference.exit_layer.tolist(), f"schedule {schedule}"
        assert ours.kept_tokens.tolist() == reference.kept_tokens.tolist()
        torch.testing.assert_close(
            ours.exit_logits.double(), reference.exit_logits, atol=1e-5, rtol=1e-5, equal_nan=True
        )


def test_padding_int32_ids_and_absent_token_types_give_the_same_result() -> None:
    _, model = models()
    ids = random_batch([9], TINY["vocab_size"], seed=4)["input_ids"]
    expected = model(ids, engine="packed", backend="torch", prune=True, early_exit=True, tau=0.2)
    padded = torch.nn.functional.pad(ids, (3, 0)).int()
    mask = torch.nn.functional.pad(torch.ones_like(ids), (3, 0))
    right = torch.nn.functional.pad(ids, (0, 3))
    right_mask = torch.nn.functional.pad(torch.ones_like(ids), (0, 3))
    knobs = dict(engine="ort", backend="torch", prune=True, early_exit=True, tau=0.2)
    for ours in (model(padded, mask, **knobs), model(right, right_mask, **knobs, validate=False)):
        assert ours.kept_tokens.tolist() == expected.kept_tokens.tolist()
        assert_close(ours.logits, expected.logits, torch.float32)


def test_sessions_follow_the_parameters_and_the_thread_count() -> None:
    _, model = models()
    batch = random_batch([11], TINY["vocab_size"], seed=5)
    before = model(**batch, engine="ort", backend="torch", prune=False, early_exit=False)
    runner = ort_layers(model)
    assert ort_layers(model) is runner, "unchanged parameters reuse the sessions"
    for parameter in (model.bert.embeddings.word_embeddings.weight, model.bert.encoder.layer[1].output.LayerNorm.bias):
        with torch.no_grad():
            parameter.add_(torch.randn_like(parameter), alpha=0.5)
        changed = model(**batch, engine="ort", backend="torch", prune=False, early_exit=False)
        torch.testing.assert_close(
            changed.logits, model(**batch, engine="packed", backend="torch", prune=False, early_exit=False).logits
        )
        assert not torch.allclose(changed.logits, before.logits)
        assert ort_layers(model) is not runner
        runner = ort_layers(model)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model(**batch, engine="ort", backend="torch", prune=False, early_exit=False)
        assert any(key.threads == 1 for key in runner.sessions), "a session per intra-op thread count"
    finally:
        torch.set_num_threads(threads)


def test_the_default_engine_with_pytorch_kernels_is_ort_in_float32_only() -> None:
    exact, model = models()
    batch = random_batch([6], TINY["vocab_size"], seed=6)
    model(**batch, backend="torch")
    assert ort_layers(model).sessions, "float32 on a CPU runs through ONNX Runtime by default"
    assert not ort_module.supports(exact, torch.device("cpu"))
    with pytest.raises(ValueError, match="engine='ort'"):
        exact(**batch, engine="ort", backend="torch")
    with pytest.raises(ValueError, match="engine must be"):
        model(**batch, engine="onnx")


def test_float32_batches_keep_the_pytorch_path_until_one_sequence_is_left() -> None:
    _, model = models()
    batch = random_batch([5, 9], TINY["vocab_size"], seed=7)
    model(**batch, prune=True, early_exit=False)
    assert not ort_layers(model).sessions, "two sequences without exits never hand over"


@pytest.mark.parametrize("activation", sorted(ort_module.BIAS_ACTIVATIONS))
def test_every_fused_activation_computes_the_models_own(activation: str) -> None:
    torch.manual_seed(0)
    config = MagicPyramidConfig(hidden_act=activation, **TINY)
    model = MagicPyramidForSequenceClassification(config).eval()
    exact = copy.deepcopy(model).double()
    batch = random_batch([17], TINY["vocab_size"], seed=10)
    knobs = dict(prune=False, early_exit=False, backend="torch")
    ours = model(**batch, **knobs, engine="ort")
    assert_close(ours.logits, exact(**batch, **knobs, engine="packed").logits, torch.float32)


def test_a_lone_sequence_runs_to_its_exit_in_one_session_call(monkeypatch) -> None:
    import onnxruntime

    _, model = models()
    batch = random_batch(LENGTHS, TINY["vocab_size"], seed=2)
    calls = []
    run = onnxruntime.InferenceSession.run
    monkeypatch.setattr(
        onnxruntime.InferenceSession, "run", lambda self, *a, **k: calls.append(1) or run(self, *a, **k)
    )
    exit_layers = set()
    for row, n in enumerate(LENGTHS):
        ids, types = batch["input_ids"][row : row + 1, :n], batch["token_type_ids"][row : row + 1, :n]
        calls.clear()
        out = model(ids, torch.ones_like(ids), types, **MIXED_EXITS, engine="ort", backend="torch")
        assert len(calls) == 1, f"length {n}: the exit test runs inside the session, no call per layer"
        exit_layers.add(int(out.exit_layer[0]))
    assert len(exit_layers) > 1, "some sequences exit early, others run every layer"


@pytest.mark.parametrize("layers", [1, 2])
def test_models_of_one_and_two_layers_run_to_their_exit_as_the_packed_path_does(layers: int) -> None:
    torch.manual_seed(0)
    config = MagicPyramidConfig(**dict(TINY, num_hidden_layers=layers), prune_thresholds=THRESHOLDS[:layers])
    model = MagicPyramidForSequenceClassification(config).eval()
    for head in model.exits:
        torch.nn.init.normal_(head.classifier.weight, std=2.0)
    batch = random_batch(LENGTHS, TINY["vocab_size"], seed=2)
    knobs = dict(tau=0.3, threshold_scale=1.0, prune=True, early_exit=True, return_exit_logits=True)
    for row, n in enumerate(LENGTHS):
        ids, types = batch["input_ids"][row : row + 1, :n], batch["token_type_ids"][row : row + 1, :n]
        ours, packed = (model(ids, None, types, **knobs, engine=e, backend="torch") for e in ("ort", "packed"))
        assert ours.exit_layer.tolist() == packed.exit_layer.tolist(), f"length {n}"
        assert ours.kept_tokens.tolist() == packed.kept_tokens.tolist(), f"length {n}"
        assert ours.exit_logits.shape == packed.exit_logits.shape == (1, layers - 1, TINY["num_labels"])
        torch.testing.assert_close(ours.exit_logits, packed.exit_logits, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert_close(ours.logits, packed.logits, torch.float32)


def test_thresholds_set_between_calls_are_followed() -> None:
    exact, model = models()
    batch = random_batch([29], TINY["vocab_size"], seed=11)
    for thresholds in ([0.0, 1.2, 0.0, 1.4], [2.0, 0.0, 0.0, 0.0], THRESHOLDS):
        for m in (exact, model):
            m.set_thresholds(thresholds)
        ours = model(**batch, **MIXED_EXITS, engine="ort", backend="torch")
        single = run_single(exact, batch["input_ids"][0], batch["token_type_ids"][0], **MIXED_EXITS)
        assert ours.kept_tokens[0].tolist() == single.kept_tokens, f"thresholds {thresholds}"
        assert int(ours.exit_layer[0]) == single.exit_layer
    pruning = {key.prunes for key in ort_layers(model).sessions}
    assert len(pruning) == 3, "a session per set of pruning layers"


def test_an_exit_heads_change_rebuilds_the_run_to_the_exit() -> None:
    _, model = models()
    batch = random_batch([23], TINY["vocab_size"], seed=12)
    knobs = dict(MIXED_EXITS, return_exit_logits=True)
    before = model(**batch, **knobs, engine="ort", backend="torch")
    with torch.no_grad():
        model.exits[0].dense.weight.mul_(-1.0)
    ours, packed = (model(**batch, **knobs, engine=e, backend="torch") for e in ("ort", "packed"))
    assert not torch.allclose(ours.exit_logits[0, 0], before.exit_logits[0, 0])
    torch.testing.assert_close(ours.exit_logits, packed.exit_logits, atol=1e-5, rtol=1e-5, equal_nan=True)
    assert ours.exit_layer.tolist() == packed.exit_layer.tolist()


def test_a_handed_over_sequence_compares_tau_in_float32() -> None:
    _, model = models()
    runner = ort_layers(model)
    hidden = torch.randn(9, TINY["hidden_size"])
    unpruned = model.resolve_knobs(prune=False, early_exit=True)
    uncertainty = runner.run(1, 2, hidden, unpruned, exit_head=True).uncertainty
    assert isinstance(uncertainty, np.float32) and 0.0 < uncertainty < 1.0
    below_in_float64 = float(np.nextafter(float(uncertainty), -1.0))  # rounds to the uncertainty in float32
    below_in_float32 = float(np.nextafter(uncertainty, np.float32(-1.0)))
    exits = [
        lone_sequence.run_lone_sequence(runner, 1, hidden, replace(unpruned, tau=tau), None, False).exit_layer
        for tau in (below_in_float64, below_in_float32)
    ]
    assert exits[0] == 2, "uncertainty <= tau in float32: exits after layer 2"
    assert exits[1] != 2
