"""Specification of the reference forward (``mp_model.reference``) and of every engine against it.

The reference is the model stated plainly: one example at a time on its real tokens. It is held to HF's
``BertForSequenceClassification`` where both compute the dense model (float64, the HF twin of ``mp_model.hf_twin``),
to itself across padding sides, and to the rules of its docstring where it prunes and exits (on knob settings shown
to prune and exit, so that no equality below holds vacuously). Every engine then computes the same function on
whole batches: the same exit layers, kept tokens and FLOPs exactly, and logits within 1e-9 in float64 or the float32
row of the tolerance table (``tests.utils``) in float32. The float64 engines and ONNX Runtime run on the CPU; the
graph engine's Triton kernels run on DEVICE (a GPU, or the CPU under the interpreter, where only two settings run).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import pytest
import torch

from mp_model import MagicPyramidForSequenceClassification
from mp_model import ort_layers as ort_module
from mp_model.flops import dense_flops, sequence_flops
from mp_model.hf_twin import hf_twin
from mp_model.outputs import MagicPyramidOutput
from mp_model.reference import reference_forward, uncertainty
from tests.test_inputs import repad
from tests.test_model import KNOB_SETTINGS, LENGTHS, TINY, random_batch, tiny_model
from tests.utils import DEVICE, ON_GPU, assert_close

THRESHOLDS = [0.97, 1.01, 1.03, 1.05]
LAYERS = TINY["num_hidden_layers"]
# Rows exit after layers 1, 2 and 3, or never (4 is the last layer, 9 lies beyond it, 0 never exits).
SCHEDULE = torch.tensor([1, 2, 3, 4, 9, 1, 2, 3, 0, 1])
SETTINGS: dict[str, dict[str, Any]] = {f"knobs{i}": knobs for i, knobs in enumerate(KNOB_SETTINGS)} | {
    "schedule": dict(tau=0.0, threshold_scale=1.0, prune=True, early_exit=True, exit_schedule=SCHEDULE)
}
# The setting where tokens are pruned part-way (not down to the first token alone) and some rows exit by the entropy
# test while others run every layer (test_the_knobs_used_prune_and_exit).
MIXED = "knobs3"
# Under the Triton interpreter (seconds per forward) the graph engine's kernels run on these settings only.
CHEAP_ON_CPU = (MIXED, "schedule")
# (engine, backend, dtype) of every engine; the Triton graph engine runs on DEVICE, the others on the CPU.
ENGINES = [
    ("packed", "torch", torch.float64),
    ("graph", "torch", torch.float64),
    ("graph", "triton", torch.float32),
    ("ort", "torch", torch.float32),
]
DECISIONS = ("logits", "exit_layer", "kept_tokens", "flops")
OUTPUTS = (*DECISIONS, "exit_logits")


@functools.cache
def exact_model() -> MagicPyramidForSequenceClassification:
    """The tiny model in float64 on the CPU: the reference's model and the float64 engines'."""
    return tiny_model(THRESHOLDS)


@functools.cache
def float32_model(device: torch.device) -> MagicPyramidForSequenceClassification:
    """A float32 copy of ``exact_model`` on ``device`` (its weights are the float64 ones rounded)."""
    return copy.deepcopy(exact_model()).float().to(device)


@functools.cache
def inputs() -> dict[str, torch.Tensor]:
    """The right-padded batch of ``LENGTHS`` every test runs."""
    return random_batch(LENGTHS, TINY["vocab_size"])


def reference(batch: dict[str, torch.Tensor], knobs: dict[str, Any], exit_logits: bool) -> MagicPyramidOutput:
    """``reference_forward`` of ``exact_model`` on ``batch`` with ``knobs`` as ``forward`` takes them."""
    model = exact_model()
    return reference_forward(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        model.resolve_knobs(**knobs),
        return_exit_logits=exit_logits,
    )


@functools.cache
def expected(setting: str) -> MagicPyramidOutput:
    """The reference on ``inputs()`` for ``SETTINGS[setting]``, with every sub-classifier's logits."""
    return reference(inputs(), SETTINGS[setting], exit_logits=True)


def assert_identical(actual: MagicPyramidOutput, wanted: MagicPyramidOutput, names: tuple[str, ...] = OUTPUTS) -> None:
    """Each output ``names`` of ``actual`` equals ``wanted``'s bit for bit (NaN where ``wanted`` has NaN)."""
    for name in names:
        torch.testing.assert_close(getattr(actual, name), getattr(wanted, name), atol=0, rtol=0, equal_nan=True)


def assert_matches(actual: MagicPyramidOutput, wanted: MagicPyramidOutput, dtype: torch.dtype, msg: str) -> None:
    """The same decisions and FLOPs as the float64 ``wanted``, logits within 1e-9 (float64) or the table's float32
    tolerance (of PyTorch on the device ``actual`` ran on, which allows for TF32 matmuls on a GPU)."""
    assert actual.exit_layer.tolist() == wanted.exit_layer.tolist(), msg
    assert actual.kept_tokens.tolist() == wanted.kept_tokens.tolist(), msg
    assert actual.flops.tolist() == wanted.flops.tolist(), msg
    assert actual.logits.dtype == dtype, msg
    if dtype == torch.float64:
        torch.testing.assert_close(actual.logits, wanted.logits, atol=1e-9, rtol=1e-9, msg=msg)
    else:
        assert_close(actual.logits, wanted.logits, dtype, device=actual.logits.device)


# --------------------------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_dense_reference_is_hf_bert_with_the_same_weights(attention: str) -> None:
    model, batch = exact_model(), inputs()
    twin = hf_twin(model, attention=attention)
    assert next(twin.parameters()).dtype == torch.float64
    with torch.no_grad():
        hf_logits = twin(**batch).logits
    out = reference(batch, dict(prune=False, early_exit=False), exit_logits=False)
    torch.testing.assert_close(out.logits, hf_logits, atol=1e-12, rtol=0)
    assert out.exit_layer.tolist() == [LAYERS] * len(LENGTHS)
    assert out.kept_tokens.tolist() == [[n] * LAYERS for n in LENGTHS]
    assert out.flops.tolist() == [dense_flops(model.config, n) for n in LENGTHS]
    assert out.exit_logits is None


@pytest.mark.parametrize("side", ["left", "both"])
@pytest.mark.parametrize("setting", [MIXED, "schedule"])
def test_padding_side_never_changes_the_reference(setting: str, side: str) -> None:
    padded = repad(inputs(), side)
    assert not torch.equal(padded["attention_mask"], inputs()["attention_mask"]), "the padding moved"
    assert_identical(reference(padded, SETTINGS[setting], exit_logits=True), expected(setting))


def test_the_knobs_used_prune_and_exit() -> None:
    """The equality tests below compare outputs where tokens really are pruned and examples really exit."""
    lengths = torch.tensor(LENGTHS)
    mixed = expected(MIXED)
    entering = torch.cat([lengths[:, None], mixed.kept_tokens[:, :-1]], dim=1)
    assert ((mixed.kept_tokens > 1) & (mixed.kept_tokens < entering)).any(), "pruning leaves more than one token"
    assert (mixed.exit_layer < LAYERS).any() and (mixed.exit_layer == LAYERS).any()
    assert set(expected("schedule").exit_layer.tolist()) == {1, 2, 3, LAYERS}
    dense = expected("knobs0")
    assert dense.kept_tokens.tolist() == [[n] * LAYERS for n in LENGTHS] and (dense.exit_layer == LAYERS).all()


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_examples_leave_by_the_entropy_test_or_the_schedule(setting: str) -> None:
    """An example leaves after the first layer whose sub-classifier is at most ``tau`` uncertain (or the layer its
    schedule names), with that sub-classifier's logits; the later sub-classifiers' logits are NaN; it keeps at least
    its first token and never regains one."""
    knobs, out = SETTINGS[setting], expected(setting)
    assert out.exit_logits is not None and out.exit_logits.shape == (len(LENGTHS), LAYERS - 1, TINY["num_labels"])
    for row in range(len(LENGTHS)):
        layer, every = int(out.exit_layer[row]), out.exit_logits[row]
        ran = min(layer, LAYERS - 1)
        assert torch.isfinite(every[:ran]).all() and torch.isnan(every[ran:]).all(), f"row {row}"
        kept = out.kept_tokens[row].tolist()
        assert min(kept[:layer]) >= 1 and kept[layer:] == [0] * (LAYERS - layer), f"row {row}"
        assert kept[:layer] == sorted(kept[:layer], reverse=True) and kept[0] <= LENGTHS[row], f"row {row}"
        if not knobs["early_exit"]:
            assert layer == LAYERS, f"row {row}"
            continue
        if layer < LAYERS:
            assert torch.equal(out.logits[row], every[layer - 1]), f"row {row}"
        if "exit_schedule" in knobs:
            named = int(SCHEDULE[row])
            assert layer == (named if 0 < named < LAYERS else LAYERS), f"row {row}"
            continue
        uncertain = [uncertainty(logits) for logits in every[:ran]]
        assert all(u > knobs["tau"] for u in uncertain[: layer - 1]), f"row {row}"
        assert layer == LAYERS or uncertain[layer - 1] <= knobs["tau"], f"row {row}"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_reference_counts_flops_as_mp_model_flops_defines_them(setting: str) -> None:
    """Sub-classifiers run only to return their logits add no FLOPs, nor change any other output."""
    knobs, out = SETTINGS[setting], expected(setting)
    for row, n in enumerate(LENGTHS):
        flops = sequence_flops(
            exact_model().config,
            n,
            out.kept_tokens[row].tolist(),
            int(out.exit_layer[row]),
            early_exit=knobs["early_exit"],
        )
        assert int(out.flops[row]) == flops, f"row {row}"
    plain = reference(inputs(), knobs, exit_logits=False)
    assert_identical(plain, out, DECISIONS)
    assert plain.exit_logits is None


# ------------------------------------------------------------------------------------------------ the engines
ENGINE_CASES = [
    pytest.param(engine, backend, dtype, setting, id=f"{engine}-{backend}-{setting}")
    for engine, backend, dtype in ENGINES
    for setting in SETTINGS
    if backend != "triton" or ON_GPU or setting in CHEAP_ON_CPU
]


@pytest.mark.parametrize(("engine", "backend", "dtype", "setting"), ENGINE_CASES)
def test_every_engine_computes_the_reference(engine: str, backend: str, dtype: torch.dtype, setting: str) -> None:
    if engine == "ort" and not ort_module.available():
        pytest.skip("onnx and onnxruntime are not installed")
    device = DEVICE if backend == "triton" else torch.device("cpu")
    model = exact_model() if dtype == torch.float64 else float32_model(device)
    batch = {name: tensor.to(device) for name, tensor in inputs().items()}
    knobs = dict(SETTINGS[setting])
    if "exit_schedule" in knobs:
        knobs["exit_schedule"] = knobs["exit_schedule"].to(device)
    out = model(**batch, **knobs, engine=engine, backend=backend)
    assert_matches(out, expected(setting), dtype, f"{engine}/{backend} on the batch")


@pytest.mark.skipif(not ort_module.available(), reason="onnx and onnxruntime are not installed")
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_ort_engine_computes_the_reference_on_lone_sequences(setting: str) -> None:
    """At batch size 1 a sequence's layers all run in ONNX Runtime (on the batch, only a survivor's do)."""
    model, batch, wanted = float32_model(torch.device("cpu")), inputs(), expected(setting)
    ort_module.ort_layers(model).sessions.clear()
    for row, n in enumerate(LENGTHS):
        ids, types = batch["input_ids"][row : row + 1, :n], batch["token_type_ids"][row : row + 1, :n]
        knobs = dict(SETTINGS[setting])
        if "exit_schedule" in knobs:
            knobs["exit_schedule"] = knobs["exit_schedule"][row : row + 1]
        out = model(ids, torch.ones_like(ids), types, **knobs, engine="ort", backend="torch")
        one = MagicPyramidOutput(**{name: getattr(wanted, name)[row : row + 1] for name in DECISIONS})
        assert_matches(out, one, torch.float32, f"row {row} alone")
    assert ort_module.ort_layers(model).sessions, "the lone sequences ran through ONNX Runtime"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_the_packed_engine_returns_the_reference_exit_logits(setting: str) -> None:
    wanted = expected(setting)
    out = exact_model()(**inputs(), **SETTINGS[setting], engine="packed", backend="torch", return_exit_logits=True)
    assert_matches(out, wanted, torch.float64, "packed with exit logits")
    torch.testing.assert_close(out.exit_logits, wanted.exit_logits, atol=1e-9, rtol=1e-9, equal_nan=True)
