"""Specification of the packed path's low-overhead CPU pieces: the weights it derives from the model follow the
model's parameters, the equal-length and single-sequence shortcuts compute what the varlen path computes, and the
float32 pre-packed projections agree with float64 arithmetic.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mp_model.fused_weights import packed_path_weights
from mp_model.packed_inference import uniform_attention
from tests.model_reference import run_single
from tests.test_model import random_batch, tiny_model

KNOBS = dict(tau=0.2, threshold_scale=1.0, prune=True, early_exit=True, backend="torch")


def test_weights_follow_in_place_updates_and_loaded_state() -> None:
    model = tiny_model([0.0, 0.5, 0.5, 0.5])
    batch = random_batch([9, 5, 9], model.config.vocab_size)
    before = model(**batch, **KNOBS)
    cached = packed_path_weights(model)
    assert packed_path_weights(model) is cached, "unchanged weights reuse the cache"

    other = tiny_model([0.0, 0.5, 0.5, 0.5], seed=3)
    model.load_state_dict(other.state_dict())
    assert packed_path_weights(model) is not cached
    torch.testing.assert_close(model(**batch, **KNOBS).logits, other(**batch, **KNOBS).logits, rtol=0, atol=0)

    with torch.no_grad():
        model.bert.encoder.layer[1].attention.self.value.weight.mul_(2.0)
        other.bert.encoder.layer[1].attention.self.value.weight.mul_(2.0)
    changed = model(**batch, **KNOBS)
    torch.testing.assert_close(changed.logits, other(**batch, **KNOBS).logits, rtol=0, atol=0)
    assert not torch.allclose(changed.logits, before.logits)


def test_a_lone_sequence_runs_the_shortcuts_and_matches_the_oracle() -> None:
    model = tiny_model([0.0, 1.01, 1.03, 1.05])
    batch = random_batch([1, 2, 17, 31, 64], model.config.vocab_size, seed=4)
    pruned = False
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        ids, types = batch["input_ids"][row : row + 1, :n], batch["token_type_ids"][row : row + 1, :n]
        out = model(ids, torch.ones_like(ids), types, **KNOBS)
        single = run_single(model, ids[0], types[0], **{k: v for k, v in KNOBS.items() if k != "backend"})
        assert int(out.exit_layer[0]) == single.exit_layer and out.kept_tokens[0].tolist() == single.kept_tokens
        torch.testing.assert_close(out.logits[0], single.logits, atol=1e-9, rtol=1e-9)
        pruned |= any(0 < kept < n for kept in single.kept_tokens)
    assert pruned, "some layer pruned a token"


def test_equal_lengths_give_the_results_of_unequal_batches() -> None:
    model = tiny_model([0.0, 1.01, 1.03, 1.05])
    equal = random_batch([12, 12, 12, 12], model.config.vocab_size, seed=5)
    padded = {key: torch.nn.functional.pad(value, (0, 3)) for key, value in equal.items()}
    padded["attention_mask"][0, 12:] = 1  # one longer row makes the batch unequal: the varlen path
    out_equal = model(**equal, **KNOBS)
    out_varlen = model(**padded, **KNOBS)
    rows = slice(1, 4)
    torch.testing.assert_close(out_equal.logits[rows], out_varlen.logits[rows], atol=1e-12, rtol=0)
    assert torch.equal(out_equal.kept_tokens[rows], out_varlen.kept_tokens[rows])
    kept = out_equal.kept_tokens[:, 1]
    assert ((kept > 0) & (kept < 12)).any(), "some row pruned"


def test_uniform_attention_equals_the_varlen_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    sequences, length, heads, head_dim = 3, 7, 2, 16
    qkv = torch.randn(sequences * length, 3 * heads * head_dim, generator=generator, dtype=torch.float64)
    from mp_kernels import varlen_attention

    q, k, v = qkv.view(-1, 3, heads, head_dim).unbind(1)
    cu = torch.arange(0, sequences * length + 1, length, dtype=torch.int32)
    expected, importance = varlen_attention(q, k, v, cu, length, return_importance=True, backend="torch")
    context, got = uniform_attention(qkv, sequences, heads, head_dim**-0.5, True)
    torch.testing.assert_close(context, expected.reshape(sequences * length, -1), atol=1e-12, rtol=0)
    torch.testing.assert_close(got, importance, atol=1e-12, rtol=0)


@pytest.mark.parametrize("batch_lengths", [[23], [40, 3, 17]])
def test_float32_projections_agree_with_float64(batch_lengths: list[int]) -> None:
    model = tiny_model([0.0, 0.0, 0.0, 0.0])
    batch = random_batch(batch_lengths, model.config.vocab_size, seed=6)
    dense = dict(prune=False, early_exit=False, backend="torch")
    expected = model(**batch, **dense).logits
    single = copy.deepcopy(model).float()
    got = single(**batch, **dense).logits
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_every_exit_logit_is_what_an_exit_at_that_layer_returns() -> None:
    """``return_exit_logits`` (used by ``mp eval`` to simulate every ``tau`` offline) gives, for each layer, the
    logits an example exiting there gets; NaN after an example's own exit; no extra FLOPs are counted."""
    model = tiny_model([0.97, 1.01, 1.03, 1.05])
    layers = model.config.num_hidden_layers
    batch = random_batch([1, 2, 3, 7, 13, 31, 64, 40], model.config.vocab_size)
    every = model(**batch, prune=True, early_exit=False, return_exit_logits=True, backend="torch")
    plain = model(**batch, prune=True, early_exit=False, backend="torch")
    assert every.exit_logits.shape == (8, layers - 1, model.config.num_labels)
    assert torch.equal(every.flops, plain.flops) and torch.equal(every.logits, plain.logits)
    for layer in range(1, layers):
        schedule = torch.full((8,), layer)
        exited = model(**batch, prune=True, early_exit=True, exit_schedule=schedule, backend="torch")
        assert torch.equal(exited.logits, every.exit_logits[:, layer - 1])
    with_exits = model(**batch, tau=0.3, prune=True, early_exit=True, return_exit_logits=True, backend="torch")
    for row, exit_layer in enumerate(with_exits.exit_layer.tolist()):
        assert with_exits.exit_logits[row, exit_layer:].isnan().all()
        assert not with_exits.exit_logits[row, :exit_layer].isnan().any()
