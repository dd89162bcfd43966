"""Specification of ``mp_model.recipe.predict``: knobs are checked before anything is computed; batches by token
budget hold every text once; rows do not depend on the batching (labelling whole files through ``mp predict`` is in
``test_cli.py`` and ``test_stream.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mp_model.recipe.files import InputText
from mp_model.recipe.predict import predict, token_budget_batches
from tests.utils import HYPOTHESIS_SETTINGS, minilm_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


@pytest.mark.parametrize(
    ("knobs", "name"),
    [({"tau": math.nan}, "tau"), ({"tau": 1.5}, "tau"), ({"threshold_scale": -1}, "threshold_scale")]
    + [({"batch_size": 0}, "batch_size"), ({"max_length": 1}, "max_length"), ({"max_length": 10**6}, "max_length")],
)
def test_predict_refuses_bad_knobs_before_computing(tokenizer, knobs: dict, name: str) -> None:
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    config = MagicPyramidConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2
    )
    model = MagicPyramidForSequenceClassification(config)
    with pytest.raises(ValueError, match=name):
        predict(model, tokenizer, [InputText(0, 1, "text")], **knobs)


@pytest.mark.parametrize(("text", "pair"), [("bad \ud800", None), ("fine", "bad \udfff")])
def test_predict_names_a_lone_surrogate_before_computing(tokenizer, text: str, pair: str | None) -> None:
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    config = MagicPyramidConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2
    )
    model = MagicPyramidForSequenceClassification(config)
    texts = [InputText(0, 1, "a good text"), InputText(1, 2, text, pair)]
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate \(U\+D[8F]"):
        predict(model, tokenizer, texts)


@HYPOTHESIS_SETTINGS
@given(
    lengths=st.lists(st.integers(1, 64), max_size=60),
    budget=st.one_of(st.none(), st.integers(1, 512)),
    size=st.integers(1, 16),
)
def test_token_budget_batches_hold_every_text_once_within_the_budget(
    lengths: list[int], budget: int | None, size: int
) -> None:
    chunks = token_budget_batches(lengths, budget, size)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(lengths)))
    for chunk in chunks:
        padded = len(chunk) * max(lengths[i] for i in chunk)
        assert len(chunk) <= size and (budget is None or padded <= budget or len(chunk) == 1)
        assert [lengths[i] for i in chunk] == sorted((lengths[i] for i in chunk), reverse=True)


def test_rows_do_not_depend_on_the_batching(tokenizer) -> None:
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    torch.manual_seed(0)
    config = MagicPyramidConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2
    )
    model = MagicPyramidForSequenceClassification(config)
    words = "good bad film plot été 日本".split()
    texts = [InputText(i, i + 1, " ".join(words[: 1 + i % 6] * (1 + i % 9)) if i % 5 else "") for i in range(40)]
    rows = predict(model, tokenizer, texts, batch_size=40, tau=0.5)
    assert [row["index"] for row in rows] == list(range(40))
    for budget in (8, 50, 300):
        assert predict(model, tokenizer, texts, batch_size=7, batch_tokens=budget, tau=0.5) == rows
