"""A user's files: labelled examples (``load_file``) and texts to label (``read_texts``, for ``mp predict``).

``load_file`` reads a CSV, TSV or JSON-lines file of labelled examples; given a model's labels it matches the
file's labels to them by name (or by id). ``open_texts`` (lazily) and ``read_texts`` give one text per input record,
in order, blank ones included. All read records through ``mp_model.recipe.records.iter_records``, lazily.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mp_model.recipe.data import DEV_FRACTION, SPLITS, TEST_FRACTION, TextDataset, TextExample, random_split
from mp_model.recipe.records import FILE_FORMATS, check_input_file, iter_records, lines_of, lone_surrogate, read_records

# Values accepted in a file's ``split`` column, mapped to the split they name.
SPLIT_COLUMN = "split"
SPLIT_VALUES = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}

_INTEGER = re.compile(r"[+-]?\d+")
# The second segment of a sentence pair is read from this column when a file has it (``load_file``, ``read_texts``).
PAIR_COLUMN = "text_pair"


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
            missing column, a malformed line, an empty text or one holding a lone surrogate, a bad label or split
            value, a label the model does not know, fewer than two labels, or too few rows to fill every split that
            the fractions ask for.
    """
    path = Path(path)
    header, records = read_records(path)
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
        for column, value in ((text_column, row[text_column]), (pair_column, pair or "")):
            if surrogate := lone_surrogate(value):
                raise ValueError(f"{place}: {column!r} holds a lone surrogate ({surrogate}), which is not Unicode text")
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

    train, dev, test = random_split(examples, seed, dev_fraction, test_fraction, stratify=True)
    asked = {"train": True, "dev": dev_fraction > 0, "test": test_fraction > 0}
    for name, part in (("train", train), ("dev", dev), ("test", test)):
        if asked[name] and not part:
            raise ValueError(
                f"{path}: {len(examples)} examples leave {name} empty (dev_fraction={dev_fraction}, "
                f"test_fraction={test_fraction}); add examples, change the fractions or give a {SPLIT_COLUMN!r} column"
            )
    return TextDataset(path.stem, names, train, dev, test)


@dataclass(frozen=True)
class TextFile:
    """A file of texts to label, checked (``open_texts``) and read lazily: each iteration reads it again.

    ``column`` and ``pair_column`` (``None`` for a ``.txt`` file) name where the text and the second segment of a
    pair are read; ``pairs``: whether the file has pairs (``pair_column`` given, or the file has that column or key);
    ``pair_required``: whether every record must have ``pair_column`` (it was asked for by name), as it must have
    ``column``.
    """

    path: Path
    column: str
    pair_column: str | None
    pairs: bool
    pair_required: bool = False

    def __iter__(self) -> Iterator[InputText]:
        """The file's texts, one per record, in order (see ``read_texts``), in bounded memory.

        Leading empty texts are held back until a text is found, so that a file holding no text raises its
        ``ValueError`` before anything is given.
        """
        held: list[InputText] = []
        for text in self._texts():
            if held is None:
                yield text
            elif text.empty:
                held.append(text)
            else:
                yield from held
                yield text
                held = None
        if held is not None:
            raise ValueError(f"{self.path} holds no text")

    def _texts(self) -> Iterator[InputText]:
        if self.path.suffix.lower() not in FILE_FORMATS:
            for index, line in enumerate(lines_of(self.path)):
                line = line[:-1] if line.endswith("\r") else line
                yield InputText(index, index + 1, line if line.strip() else "")
            return
        _, records = iter_records(self.path)
        for index, record in enumerate(records):
            values = record.values or {}
            for name in (self.column, self.pair_column if self.pair_required else None):
                if record.values is not None and name is not None and name not in values:
                    raise ValueError(f"{self.path}, {record.where}: expected an object with key {name!r}")
            segments = []
            for name in (self.column, self.pair_column):
                value = values.get(name, "") if name is not None else ""
                surrogate = lone_surrogate(value) if isinstance(value, str) else None
                if not isinstance(value, str) or surrogate:
                    shown = f"a lone surrogate ({surrogate}: not text)" if surrogate else type(value).__name__
                    raise ValueError(f"{self.path}, {record.where}: {name!r} must be a string, got {shown} {value!r}")
                segments.append(value if value.strip() else "")
            text, pair = segments
            yield InputText(index, record.line, text, pair if text and pair else None)


def _has_key(path: Path, key: str) -> bool:
    """Whether a record of the JSON file ``path`` has ``key`` (a byte search first, then a lazy parse)."""
    needle, tail = key.encode(), b""
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            if needle in tail + chunk:
                break
            tail = chunk[-len(needle) :]
        else:
            return False
    return any(key in (record.values or {}) for record in iter_records(path)[1])


def open_texts(path: str | os.PathLike[str], column: str = "text", pair_column: str | None = None) -> TextFile:
    """A ``TextFile`` of the texts to label in ``path``, checked before any is read: the file exists, has a
    supported type, is not empty, and has the columns asked for (a CSV/TSV or Parquet file). Whether it holds pairs
    is found here (a JSON file is scanned for a ``text_pair`` key, in bounded memory). See ``read_texts``."""
    path = check_input_file(path)
    if path.suffix.lower() not in FILE_FORMATS:
        if pair_column is not None:
            raise ValueError(f"{path}: a text file holds single texts; pairs ({pair_column!r}) need CSV/TSV/JSON")
        return TextFile(path, column, None, False)
    header, _ = iter_records(path)
    if header is not None:
        for name in (column, pair_column):
            if name is not None and name not in header:
                raise ValueError(f"{path}: no column {name!r}; the columns are {header}")
    if pair_column is not None:
        return TextFile(path, column, pair_column, True, pair_required=True)
    if PAIR_COLUMN == column:
        return TextFile(path, column, None, False)
    pairs = PAIR_COLUMN in header if header is not None else _has_key(path, PAIR_COLUMN)
    return TextFile(path, column, PAIR_COLUMN, pairs)


def read_texts(path: str | os.PathLike[str], column: str = "text", pair_column: str | None = None) -> list[InputText]:
    """The texts to label in a ``.txt``, ``.csv``/``.tsv``, ``.jsonl``/``.json`` or ``.parquet`` file: one per
    input record (``list(open_texts(...))``; ``mp predict`` streams ``open_texts`` instead).

    A ``.txt`` file (any other extension too) holds one text per line; lines end at ``\\n`` or ``\\r\\n`` only. A
    CSV/TSV file has a header and the text in column ``column``; a JSON-lines file one object per line with the
    text under key ``column`` (a ``.json`` file may hold one array of objects); a Parquet file (read with pyarrow)
    a column ``column``. Every record gives exactly one ``InputText``, in file order, with its position and line:
    a blank line, or an empty or whitespace-only text, gives an empty one (``InputText.empty``), so
    ``result[i].index == i`` and, in a text or JSON-lines file, ``result[i].line == i + 1``. The second segment of
    a pair comes from ``pair_column``, which every record must then have, like ``column`` (a key missing from a
    JSON record is an error at its line, as a missing column is in a CSV file); without ``pair_column`` it comes
    from a ``text_pair`` column or key where the file has one, and a record without that key is a single text. An
    empty second segment makes a single text.

    Raises:
        ValueError: naming the file and line for a missing or unreadable file, a missing column or key (either the
            text's or a ``pair_column`` asked for), a JSON
            value that is not a string (``null``, a number, a list...), malformed CSV or JSON, or a file that holds
            no text at all.
    """
    return list(open_texts(path, column, pair_column))
