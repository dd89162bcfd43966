"""``finish_slots`` against the engine's previous tail: the main classifier in float64 from the same rounded inputs,
the kept counts the layers really kept, and ``flops_from_outputs`` exactly, on both backends.

Each case simulates a batch after its last layer: padding slots (length 0), slots that exited at a random layer
(their logits and exit layer already written) and slots still running, through a random mix of pruning and
non-pruning layers. The outputs the kernel must write start poisoned; the ones it must leave start at known values.
"""

from __future__ import annotations

import importlib
import math
import random

import pytest
import torch

from mp_kernels.finish_slots import finish_slots
from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification
from mp_model.flops import flops_coefficients, flops_from_outputs
from tests.utils import (
    DEVICE,
    KERNEL_DTYPES,
    ON_GPU,
    assert_close,
    assert_no_host_synchronisation,
    assert_within_twice_torch_error,
    capture_cuda_graph,
    kernel_must_not_run,
    poison_,
)

finish_slots_module = importlib.import_module("mp_kernels.finish_slots")
triton_finish_slots = importlib.import_module("mp_kernels._triton.finish_slots")

BACKENDS = ["triton", "torch"]
# Logits pass through two products rounded to the dtype and a rounded tanh: a few roundings of values near 1.
SCALE = 4.0
POISON = torch.iinfo(torch.int64).min


def make_config(d: int, layers: int, classes: int) -> MagicPyramidConfig:
    return MagicPyramidConfig(
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=3 * d,
        num_labels=classes,
        exit_hidden_size=16,
    )


def make_case(
    seed: int,
    lengths: list[int],
    prunes: tuple[bool, ...],
    d: int,
    classes: int,
    dtype: torch.dtype,
    exit_chance: float = 0.5,
) -> dict[str, object]:
    """A batch after its last layer, as the engine leaves it, with the outputs ``finish_slots`` must produce;
    each non-padding slot has exited at a random earlier layer with probability ``exit_chance``."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    batch, layers = len(lengths), len(prunes)
    exits, kept, alive = [], torch.zeros(layers, batch, dtype=torch.int64), []
    for slot, length in enumerate(lengths):
        running = length > 0 and (layers == 1 or rng.random() >= exit_chance)
        ran = layers if length == 0 or running else rng.randint(1, layers - 1)
        tokens = length
        for i in range(ran):
            tokens = rng.randint(min(tokens, 1), tokens) if prunes[i] else tokens
            kept[i, slot] = tokens
        exits.append(ran)
        alive.append(running)
    sizes = [int(kept[-1, slot]) if alive[slot] else 0 for slot in range(batch)]
    cu = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32)
    to = dict(device=DEVICE, dtype=dtype)
    weights = (
        torch.randn(d, d, generator=generator) / d**0.5,
        torch.randn(d, generator=generator) * 0.5,
        torch.randn(classes, d, generator=generator) / d**0.5,
        torch.randn(classes, generator=generator) * 0.5,
    )
    return {
        "hidden": torch.randn(int(cu[-1]) + 3, d, generator=generator).to(**to),
        "cu": cu.to(DEVICE),
        "weights": [w.to(**to) for w in weights],
        "alive": torch.tensor(alive, device=DEVICE),
        "lengths": torch.tensor(lengths, dtype=torch.int64, device=DEVICE),
        "exit_layer": torch.tensor(exits, dtype=torch.int64),
        "kept": kept,
        "earlier_logits": torch.randn(batch, classes, generator=generator).to(**to),
        "config": make_config(d, layers, classes),
        "prunes": prunes,
    }


def prepared_outputs(case: dict[str, object]) -> tuple[torch.Tensor, ...]:
    """``logits, exit_layer, kept, flops`` on the device as ``finish_slots`` finds them: what the exit steps and
    compactions wrote (exited slots' logits and exit layers, pruning layers' kept rows), poison elsewhere."""
    settled = (case["alive"] | (case["lengths"] == 0)).cpu()
    logits = case["earlier_logits"].cpu().masked_fill(settled[:, None], math.nan).to(DEVICE)
    exit_layer = case["exit_layer"].masked_fill(settled, POISON).to(DEVICE)
    kept = case["kept"].clone()
    kept[[i for i, p in enumerate(case["prunes"]) if not p]] = POISON
    flops = poison_(torch.empty(settled.shape[0], dtype=torch.int64))
    return logits, exit_layer, kept.to(DEVICE), flops.to(DEVICE)


def call(case: dict[str, object], outputs: tuple[torch.Tensor, ...], backend: str | None, early_exit: bool) -> None:
    """``finish_slots`` on the case's inputs, writing ``outputs``."""
    coefficients = flops_coefficients(case["config"])
    inputs = (case["hidden"], case["cu"], *case["weights"], case["alive"], case["lengths"])
    finish_slots(*inputs, *outputs, case["prunes"], coefficients, early_exit=early_exit, backend=backend)


def run(case: dict[str, object], backend: str, early_exit: bool) -> tuple[torch.Tensor, ...]:
    """``finish_slots`` on prepared outputs; returns them on the CPU."""
    outputs = prepared_outputs(case)
    call(case, outputs, backend, early_exit)
    return tuple(t.cpu() for t in outputs)


def expected_logits(case: dict[str, object]) -> torch.Tensor:
    """The main classifier of every slot's first row in float64 (exited and padding slots: as they must end)."""
    pooler_weight, pooler_bias, classifier_weight, classifier_bias = (w.cpu().double() for w in case["weights"])
    first = case["hidden"].cpu().double()[case["cu"].cpu().long()[:-1].clamp(max=case["hidden"].shape[0] - 1)]
    head = torch.tanh(first @ pooler_weight.T + pooler_bias) @ classifier_weight.T + classifier_bias
    head = torch.where(case["alive"].cpu()[:, None], head, case["earlier_logits"].cpu().double())
    return head.masked_fill((case["lengths"].cpu() == 0)[:, None], 0.0)


def check(case: dict[str, object], backend: str, early_exit: bool, dtype: torch.dtype) -> None:
    logits, exit_layer, kept, flops = run(case, backend, early_exit)
    assert_close(logits, expected_logits(case), dtype, scale=SCALE, device=None if backend == "triton" else DEVICE)
    exited = ~(case["alive"].cpu() | (case["lengths"].cpu() == 0))
    assert torch.equal(logits[exited], case["earlier_logits"].cpu()[exited]), "an exited slot's logits changed"
    assert torch.equal(exit_layer, case["exit_layer"])
    assert torch.equal(kept, case["kept"])
    want = flops_from_outputs(case["config"], case["lengths"].cpu(), kept.T, exit_layer, early_exit=early_exit)
    assert torch.equal(flops, want)


LENGTHS = [5, 0, 1, 17, 3, 40, 2, 9, 0, 31]
PRUNE_PATTERNS = [
    (False, True, False, True),
    (True, True, True, True),
    (False, False, False),
    (True,),
    (False,),
    (True, False, False, True, False, True, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("early_exit", [False, True])
@pytest.mark.parametrize("prunes", PRUNE_PATTERNS, ids=lambda p: "".join("P" if x else "-" for x in p))
def test_matches_the_engine_tail(backend: str, dtype: torch.dtype, early_exit: bool, prunes: tuple[bool, ...]) -> None:
    case = make_case(len(prunes), LENGTHS, prunes, d=48, classes=3, dtype=dtype)
    check(case, backend, early_exit, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", range(6))
def test_random_batches(backend: str, seed: int) -> None:
    """Random widths (uneven, past several blocks), classes, batch sizes, lengths and prune patterns."""
    rng = random.Random(seed)
    layers = rng.randint(1, 6)
    prunes = tuple(rng.random() < 0.5 for _ in range(layers))
    lengths = [rng.choice([0, 1, 2, 7, 13, 64]) for _ in range(rng.randint(1, 9))]
    d, classes = rng.choice([16, 37, 160, 257]), rng.randint(1, 20)
    dtype = rng.choice(KERNEL_DTYPES)
    check(make_case(seed, lengths, prunes, d, classes, dtype), backend, rng.random() < 0.5, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bert_base_width_and_flops(backend: str) -> None:
    """d = 768 over 12 layers, lengths up to 512: FLOPs near 10^11, exact in int64."""
    prunes = tuple(i % 3 != 2 for i in range(12))
    check(make_case(7, [512, 1, 0, 509], prunes, d=768, classes=2, dtype=torch.float32), backend, True, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_model_pooler_and_classifier(backend: str, dtype: torch.dtype) -> None:
    """The logits are the model's own ``bert.pooler`` and ``classifier`` on each running slot's first token, as
    the engine computed them before, to within twice PyTorch's error in the same dtype."""
    torch.manual_seed(3)
    config = make_config(64, 2, 4)
    model = MagicPyramidForSequenceClassification(config).eval().to(DEVICE, dtype)
    pooler, classifier = model.bert.pooler, model.classifier
    case = make_case(11, [6, 3, 1, 11, 4], (True, False), d=64, classes=4, dtype=dtype, exit_chance=0.0)
    case["weights"] = [pooler.dense.weight, pooler.dense.bias, classifier.weight, classifier.bias]
    logits = run(case, backend, True)[0]
    first = case["hidden"].index_select(0, case["cu"][:-1].long())
    with torch.no_grad():
        same_dtype = classifier(pooler.activation(pooler.dense(first)))
    assert_within_twice_torch_error(logits, same_dtype, expected_logits(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_wins_over_alive_and_an_empty_running_slot_is_left(backend: str) -> None:
    """A slot of length 0 is padding even if marked alive; a running slot with no tokens left is not classified."""
    case = make_case(5, [0, 4, 3], (False, False), d=16, classes=2, dtype=torch.float32)
    case["alive"] = torch.tensor([True, True, False], device=DEVICE)
    case["exit_layer"] = torch.tensor([2, 1, 1])
    case["kept"] = torch.tensor([[0, 4, 3], [0, 0, 0]])
    case["cu"] = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    logits = case["earlier_logits"].clone()
    exit_layer = torch.tensor([0, 1, 1], device=DEVICE)
    kept, flops = torch.zeros(2, 3, dtype=torch.int64, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE)
    args = (case["hidden"], case["cu"], *case["weights"], case["alive"], case["lengths"], logits, exit_layer, kept)
    finish_slots(*args, flops, (False, False), (1, 1, 1, 1, 1), early_exit=False, backend=backend)
    assert torch.equal(logits[0].cpu(), torch.zeros(2)) and torch.equal(logits[1:], case["earlier_logits"][1:])
    assert exit_layer.tolist() == [2, 1, 1] and kept.tolist() == [[0, 4, 3], [0, 0, 0]]
    assert flops.tolist() == [1, 4 + 16 + 4, 3 + 9 + 3]


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


def _i(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=DEVICE)


H, CU, PW, PB, CW, CB = _t(8, 16), _i(4, dtype=torch.int32), _t(16, 16), _t(16), _t(2, 16), _t(2)
ALIVE, LEN, LOGITS, EXIT, KEPT, FLOPS = _i(3, dtype=torch.bool), _i(3), _t(3, 2), _i(3), _i(2, 3), _i(3)
PRUNES, COEFFICIENTS = (True, False), (1, 2, 3, 4, 5)
GOOD = [H, CU, PW, PB, CW, CB, ALIVE, LEN, LOGITS, EXIT, KEPT, FLOPS, PRUNES, COEFFICIENTS]
NAMES = "hidden cu_seqlens pooler_weight pooler_bias classifier_weight classifier_bias alive lengths".split()
NAMES += "logits exit_layer kept flops prunes coefficients".split()


def _with(name: str, value: object) -> tuple[object, ...]:
    return tuple(value if n == name else g for n, g in zip(NAMES, GOOD, strict=True))


BAD_INPUTS: list[tuple[str, tuple[object, ...], dict[str, object], type[Exception], str]] = [
    ("hidden not a tensor", _with("hidden", [[0.0] * 16]), {}, TypeError, "hidden"),
    ("hidden dtype", _with("hidden", _t(8, 16, dtype=torch.int32)), {}, TypeError, "hidden"),
    ("hidden no features", _with("hidden", _t(8, 0)), {}, ValueError, "hidden"),
    ("hidden strided", _with("hidden", _t(16, 8).t()), {}, ValueError, "hidden"),
    ("cu_seqlens int64", _with("cu_seqlens", _i(4)), {}, TypeError, "cu_seqlens"),
    ("cu_seqlens too short", _with("cu_seqlens", _i(1, dtype=torch.int32)), {}, ValueError, "cu_seqlens"),
    ("pooler_weight shape", _with("pooler_weight", _t(16, 15)), {}, ValueError, "pooler_weight"),
    ("pooler_weight dtype", _with("pooler_weight", _t(16, 16, dtype=torch.float16)), {}, TypeError, "pooler_weight"),
    ("pooler_bias shape", _with("pooler_bias", _t(15)), {}, ValueError, "pooler_bias"),
    ("classifier_weight width", _with("classifier_weight", _t(2, 15)), {}, ValueError, "classifier_weight"),
    ("classifier_weight no classes", _with("classifier_weight", _t(0, 16)), {}, ValueError, "classifier_weight"),
    ("classifier_bias shape", _with("classifier_bias", _t(3)), {}, ValueError, "classifier_bias"),
    ("alive dtype", _with("alive", _i(3)), {}, TypeError, "alive"),
    ("alive size", _with("alive", _i(2, dtype=torch.bool)), {}, ValueError, "alive"),
    ("lengths int32", _with("lengths", _i(3, dtype=torch.int32)), {}, TypeError, "lengths"),
    ("logits shape", _with("logits", _t(3, 3)), {}, ValueError, "logits"),
    ("logits dtype", _with("logits", _t(3, 2, dtype=torch.float64)), {}, TypeError, "logits"),
    ("exit_layer size", _with("exit_layer", _i(4)), {}, ValueError, "exit_layer"),
    ("flops int32", _with("flops", _i(3, dtype=torch.int32)), {}, TypeError, "flops"),
    ("kept batch", _with("kept", _i(2, 4)), {}, ValueError, "kept"),
    ("kept no layers", _with("kept", _i(0, 3)), {}, ValueError, "kept"),
    ("kept ndim", _with("kept", _i(3)), {}, ValueError, "kept"),
    ("prunes length", _with("prunes", (True,)), {}, ValueError, "prunes"),
    ("prunes not bools", _with("prunes", (1, 0)), {}, TypeError, "prunes"),
    ("prunes a tensor", _with("prunes", _i(2, dtype=torch.bool)), {}, TypeError, "prunes"),
    ("coefficients count", _with("coefficients", (1, 2, 3, 4)), {}, ValueError, "coefficients"),
    ("coefficients negative", _with("coefficients", (1, 2, -3, 4, 5)), {}, ValueError, "coefficients"),
    ("coefficients floats", _with("coefficients", (1.0, 2, 3, 4, 5)), {}, TypeError, "coefficients"),
    ("early_exit not a bool", GOOD, {"early_exit": 1}, TypeError, "early_exit"),
    (
        "float64 on triton",
        tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in GOOD),
        {"backend": "triton"},
        TypeError,
        "hidden",
    ),
    ("unknown backend", GOOD, {"backend": "cuda"}, ValueError, "backend"),
]
if ON_GPU:
    BAD_INPUTS += [
        ("pooler_weight on cpu", _with("pooler_weight", PW.cpu()), {}, ValueError, "pooler_weight"),
        ("kept on cpu", _with("kept", KEPT.cpu()), {}, ValueError, "kept"),
    ]


@pytest.mark.parametrize(("label", "args", "kwargs", "error", "match"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_before_any_kernel(
    label: str, args: tuple[object, ...], kwargs: dict[str, object], error: type[Exception], match: str, monkeypatch
) -> None:
    monkeypatch.setattr(finish_slots_module, "finish_slots_torch", kernel_must_not_run)
    monkeypatch.setattr(triton_finish_slots, "finish_slots_triton", kernel_must_not_run)
    with pytest.raises(error, match=match):
        finish_slots(*args, **{"early_exit": True, **kwargs})


@pytest.mark.skipif(not ON_GPU, reason="host synchronisations are only observable on a GPU")
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_synchronisation(backend: str) -> None:
    case = make_case(2, LENGTHS, PRUNE_PATTERNS[0], d=64, classes=3, dtype=torch.float16)
    outputs = prepared_outputs(case)
    assert_no_host_synchronisation(lambda: call(case, outputs, backend, True))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_replays_with_new_slots() -> None:
    """Captured once, replayed after new slots, lengths, tokens and earlier outputs are written into its tensors."""
    first, second = (
        make_case(seed, LENGTHS, PRUNE_PATTERNS[0], d=64, classes=3, dtype=torch.float16) for seed in (1, 2)
    )
    rows = max(first["hidden"].shape[0], second["hidden"].shape[0])
    static = {**first, "hidden": torch.zeros(rows, 64, dtype=torch.float16, device=DEVICE)}
    static["cu"], static["alive"], static["lengths"] = (first[key].clone() for key in ("cu", "alive", "lengths"))
    outputs = prepared_outputs(first)

    def launch() -> torch.Tensor:
        call(static, outputs, None, True)
        return outputs[3]

    graph, _ = capture_cuda_graph(launch)
    for case in (second, first):
        static["hidden"][: case["hidden"].shape[0]].copy_(case["hidden"])
        for key in ("cu", "alive", "lengths"):
            static[key].copy_(case[key])
        for target, source in zip(outputs, prepared_outputs(case), strict=True):
            target.copy_(source)
        graph.replay()
        torch.cuda.synchronize()
        logits, exit_layer, kept, flops = (t.cpu() for t in outputs)
        assert_close(
            logits,
            expected_logits({**case, "hidden": static["hidden"], "weights": first["weights"]}),
            torch.float16,
            scale=SCALE,
        )
        assert torch.equal(exit_layer, case["exit_layer"]) and torch.equal(kept, case["kept"])
        assert torch.equal(
            flops, flops_from_outputs(case["config"], case["lengths"].cpu(), kept.T, exit_layer, early_exit=True)
        )
