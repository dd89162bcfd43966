"""Specification of ``mp_model.recipe.data``: ``TextDataset``, tokenisation, batching and length buckets (the
built-in datasets are in ``test_datasets.py``, users' files in ``test_files.py``)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from mp_model.recipe.data import (
    LENGTH_BUCKETS,
    MIDDLE_MAX_TOKENS,
    SHORT_MAX_TOKENS,
    TextDataset,
    TextExample,
    batches,
    encode,
    length_bucket,
)
from tests.utils import builtin_dataset, minilm_tokenizer, split_sizes


@pytest.fixture(scope="module")
def rotten_tomatoes() -> TextDataset:
    return builtin_dataset("rotten_tomatoes")


@pytest.fixture(scope="module")
def bbc_news() -> TextDataset:
    return builtin_dataset("bbc_news")


@pytest.fixture(scope="module")
def tokenizer():
    return minilm_tokenizer()


# TextDataset


def test_subset_takes_the_first_examples_of_each_split(bbc_news: TextDataset) -> None:
    small = bbc_news.subset(train=50, dev=10, test=0)
    assert small.train == bbc_news.train[:50]
    assert small.dev == bbc_news.dev[:10]
    assert small.test == []
    assert small.labels == bbc_news.labels and small.name == bbc_news.name
    assert split_sizes(bbc_news) == (1701, 212, 212)


def test_subset_keeps_a_split_whole_when_its_size_is_not_given_or_too_large(bbc_news: TextDataset) -> None:
    assert bbc_news.subset(train=10**6) == bbc_news
    assert bbc_news.subset(dev=5).train == bbc_news.train


def test_a_stratified_split_interleaves_labels_so_a_small_subset_is_mixed(bbc_news: TextDataset) -> None:
    assert {example.label for example in bbc_news.subset(train=30).train} == set(range(5))


def test_subset_refuses_a_negative_size(bbc_news: TextDataset) -> None:
    with pytest.raises(ValueError, match="subset size for dev must be >= 0"):
        bbc_news.subset(dev=-1)


def test_dev_from_train_moves_the_last_training_examples_to_the_end_of_dev(bbc_news: TextDataset) -> None:
    moved = bbc_news.with_dev_from_train(50)
    assert moved.train == bbc_news.train[:-50]
    assert moved.dev == [*bbc_news.dev, *bbc_news.train[-50:]]
    assert moved.test == bbc_news.test
    assert bbc_news.with_dev_from_train(0) is bbc_news


@pytest.mark.parametrize("count", [-1, 10**6, 2.0, True])
def test_dev_from_train_refuses_a_count_that_would_empty_train_or_is_not_an_integer(
    bbc_news: TextDataset, count: object
) -> None:
    with pytest.raises(ValueError, match="dev_from_train must be an integer"):
        bbc_news.with_dev_from_train(count)


def test_split_names_a_split_or_refuses(bbc_news: TextDataset) -> None:
    assert bbc_news.split("dev") is bbc_news.dev
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        bbc_news.split("validation")


def test_dataset_refuses_a_label_outside_its_labels() -> None:
    with pytest.raises(ValueError, match=r"train\[1\] has label 2, outside 0..1"):
        TextDataset("x", ["a", "b"], [TextExample("a", 0), TextExample("b", 2)], [], [])


# encode and batches


def test_encode_gives_unpadded_bert_inputs_in_example_order(tokenizer) -> None:
    examples = [TextExample("a fine film", 1), TextExample("dull", 0), TextExample("not bad at all, really", 1)]
    encoded = encode(tokenizer, examples)
    assert encoded["labels"] == [1, 0, 1]
    for example, ids, mask, types in zip(
        examples, encoded["input_ids"], encoded["attention_mask"], encoded["token_type_ids"], strict=True
    ):
        assert ids == tokenizer(example.text)["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert mask == [1] * len(ids) and types == [0] * len(ids)


def test_encode_marks_the_second_segment_of_a_pair_and_allows_a_mix(tokenizer) -> None:
    examples = [TextExample("a man sleeps", 0, "a person rests"), TextExample("single", 1)]
    encoded = encode(tokenizer, examples)
    first_segment = len(tokenizer("a man sleeps")["input_ids"])
    ids, types = encoded["input_ids"][0], encoded["token_type_ids"][0]
    assert ids.count(tokenizer.sep_token_id) == 2
    assert types == [0] * first_segment + [1] * (len(ids) - first_segment)
    assert encoded["input_ids"][1] == tokenizer("single")["input_ids"]


def test_encode_truncates_to_max_length(tokenizer, bbc_news: TextDataset) -> None:
    encoded = encode(tokenizer, bbc_news.test[:20], max_length=128)
    assert [len(ids) for ids in encoded["input_ids"]] == [128] * 20
    assert all(ids[-1] == tokenizer.sep_token_id for ids in encoded["input_ids"])
    pair = encode(tokenizer, [TextExample("word " * 50, 0, "other " * 50)], max_length=16)
    assert len(pair["input_ids"][0]) == 16 and pair["token_type_ids"][0].count(1) > 0


def test_encode_of_no_examples_is_empty(tokenizer) -> None:
    assert encode(tokenizer, []) == {"input_ids": [], "attention_mask": [], "token_type_ids": [], "labels": []}


def test_rotten_tomatoes_is_short_and_bbc_news_long_in_figure_1_terms(
    tokenizer, rotten_tomatoes: TextDataset, bbc_news: TextDataset
) -> None:
    # Dev split, seed 0: 987 short, 287 middle, 1 long snippet; every article is long.
    short = Counter(length_bucket(len(ids)) for ids in encode(tokenizer, rotten_tomatoes.dev)["input_ids"])
    assert short["short"] > 0.75 * len(rotten_tomatoes.dev) and short["long"] < 0.01 * len(rotten_tomatoes.dev)
    long = Counter(length_bucket(len(ids)) for ids in encode(tokenizer, bbc_news.dev)["input_ids"])
    assert long == {"long": len(bbc_news.dev)}


def toy_encoded(lengths: list[int]) -> dict[str, list]:
    return {
        "input_ids": [[100 + i] * n for i, n in enumerate(lengths)],
        "attention_mask": [[1] * n for n in lengths],
        "token_type_ids": [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths],
        "labels": [i % 3 for i in range(len(lengths))],
    }


def test_batches_pad_each_batch_to_its_longest_example() -> None:
    encoded = toy_encoded([3, 5, 2, 4, 1])
    out = list(batches(encoded, 2))
    assert [tuple(batch["input_ids"].shape) for batch in out] == [(2, 5), (2, 4), (1, 1)]
    for batch in out:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
        assert all(tensor.dtype == torch.int64 for tensor in batch.values())
    first = out[0]
    assert first["input_ids"].tolist() == [[100, 100, 100, 0, 0], [101] * 5]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert first["token_type_ids"].tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 1]]
    assert torch.cat([batch["index"] for batch in out]).tolist() == [0, 1, 2, 3, 4]
    assert torch.cat([batch["labels"] for batch in out]).tolist() == encoded["labels"]


def test_batches_pad_input_ids_with_the_given_pad_token_id() -> None:
    (batch,) = batches(toy_encoded([1, 2]), 2, pad_token_id=7)
    assert batch["input_ids"].tolist() == [[100, 7], [101, 101]]


def test_batches_shuffle_by_seed_and_keep_labels_with_their_examples() -> None:
    encoded = toy_encoded(list(range(1, 41)))

    def order(seed: int) -> list[int]:
        return [i for batch in batches(encoded, 8, shuffle=True, seed=seed) for i in batch["index"].tolist()]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(0)) == list(range(40)) and order(0) != list(range(40))
    for batch in batches(encoded, 8, shuffle=True):
        assert batch["labels"].tolist() == [encoded["labels"][i] for i in batch["index"].tolist()]
        assert batch["input_ids"][:, 0].tolist() == [100 + i for i in batch["index"].tolist()]


def test_batches_sorted_by_length_go_longest_first_and_pad_least() -> None:
    lengths = [5, 1, 9, 3, 9, 2, 7, 4]
    encoded = toy_encoded(lengths)
    out = list(batches(encoded, 3, sort_by_length=True))
    order = [i for batch in out for i in batch["index"].tolist()]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order[:2] == [2, 4]
    padded = sum(batch["input_ids"].numel() for batch in out)
    assert padded < sum(batch["input_ids"].numel() for batch in batches(encoded, 3))


def test_batches_sorted_and_shuffled_shuffle_whole_length_homogeneous_batches() -> None:
    encoded = toy_encoded([(i * 7) % 23 + 1 for i in range(40)])
    widths = [batch["input_ids"].shape[1] for batch in batches(encoded, 4, sort_by_length=True)]
    shuffled = [batch["input_ids"].shape[1] for batch in batches(encoded, 4, sort_by_length=True, shuffle=True)]
    assert sorted(shuffled) == sorted(widths) and shuffled != widths
    indices = [i for b in batches(encoded, 4, sort_by_length=True, shuffle=True) for i in b["index"].tolist()]
    assert sorted(indices) == list(range(40))


def test_batches_of_real_examples_match_their_encoding(tokenizer, rotten_tomatoes: TextDataset) -> None:
    encoded = encode(tokenizer, rotten_tomatoes.test[:50])
    for batch in batches(encoded, 16, shuffle=True, seed=5):
        for row, i in enumerate(batch["index"].tolist()):
            n = len(encoded["input_ids"][i])
            assert batch["input_ids"][row, :n].tolist() == encoded["input_ids"][i]
            assert batch["attention_mask"][row].sum().item() == n
            assert batch["labels"][row].item() == rotten_tomatoes.test[i].label


def test_batches_of_nothing_yield_nothing() -> None:
    assert list(batches(toy_encoded([]), 4)) == []


def test_batches_refuse_a_bad_batch_size_or_ragged_input() -> None:
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(batches(toy_encoded([1]), 0))
    ragged = toy_encoded([1, 2])
    ragged["labels"].append(0)
    with pytest.raises(ValueError, match="encoded lists differ in length"):
        next(batches(ragged, 1))


# Length buckets


def test_length_bucket_edges_are_the_papers_35_and_70_tokens() -> None:
    assert (SHORT_MAX_TOKENS, MIDDLE_MAX_TOKENS) == (35, 70)
    assert LENGTH_BUCKETS == ("short", "middle", "long")


@pytest.mark.parametrize(
    ("n_tokens", "bucket"),
    [(1, "short"), (35, "short"), (36, "middle"), (70, "middle"), (71, "long"), (512, "long")],
)
def test_length_bucket(n_tokens: int, bucket: str) -> None:
    assert length_bucket(n_tokens) == bucket


@pytest.mark.parametrize("n_tokens", [0, -3])
def test_length_bucket_refuses_an_empty_sequence(n_tokens: int) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        length_bucket(n_tokens)


@pytest.mark.parametrize("max_length", [0, 1, -5])
def test_max_length_below_the_special_tokens_is_refused(tokenizer, max_length: int) -> None:
    with pytest.raises(ValueError, match="max_length must be >= 2"):
        encode(tokenizer, [TextExample("a long enough text", 0)], max_length)
    with pytest.raises(ValueError, match="max_length must be >= 3 to hold a pair's"):
        encode(tokenizer, [TextExample("a", 0, "b")], 2)
