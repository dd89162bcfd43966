"""A user's files: labelled examples (``load_file``) and texts to label (``read_texts``, for ``mp predict``).

``load_file`` reads a CSV, TSV or JSON-lines file of labelled examples; given a model's labels it matches the
file's labels to them by name (or by id). ``open_texts`` (lazily) and ``read_texts`` give one text per input record,
in order, blank ones included. All read records through ``iter_records``, lazily: lines end only at ``\\n`` or
``\\r\\n`` (never at the other Unicode line breaks), CSV quoting is strict.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mp_model.recipe.data import DEV_FRACTION, SPLITS, TEST_FRACTION, TextDataset, TextExample, random_split

# Values accepted in a file's ``split`` column, mapped to the split they name.
SPLIT_COLUMN = "split"
SPLIT_VALUES = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}
FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")

_INTEGER = re.compile(r"[+-]?\d+")
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate (JSON "\\ud800") is not text: no tokenizer takes it
# The second segment of a sentence pair is read from this column when a file has it (``load_file``, ``read_texts``).
PAIR_COLUMN = "text_pair"


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


def _lines(path: Path) -> Iterator[str]:
    """The lines of ``path``, read lazily and decoded as UTF-8 (a byte-order mark dropped), each without its ``\n``
    (a ``\r`` before it is kept); a ``ValueError`` naming the line of a bad byte."""
    with check_input_file(path).open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path} is not UTF-8 text: line {number}: {error}") from error
            yield line[:-1] if line.endswith("\n") else line


def _after_blank_lines(lines: Iterator[str]) -> tuple[list[str], Iterator[str]] | None:
    """The leading lines up to the first that is not blank (included) and the rest, or ``None`` if all are blank."""
    leading: list[str] = []
    for line in lines:
        leading.append(line)
        if line.strip():
            return leading, lines
    return None


def iter_records(path: Path) -> tuple[list[str] | None, Iterator[Record]]:
    """The header and a lazy iterator of the records of a CSV/TSV/JSON-lines (or Parquet) file: one per record of
    the file, blank lines included (as ``None``), read in bounded memory.

    The header (CSV header, Parquet columns, ``None`` for JSON) is read, and the file checked to hold something,
    before this returns. A ``.json`` file may hold one JSON array of objects (then read whole); its records, and a
    Parquet file's, are numbered from 1. CSV quoting is strict: a quote never closed, or closed inside a field, is
    an error at the line of the record it opened in; every CSV record has as many fields as the header. Errors in
    a record are raised when the iterator reaches it.
    """
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    if suffix == ".parquet":
        return _parquet_records(path)
    start = _after_blank_lines(_lines(path))
    if start is None:
        raise ValueError(f"{path} is empty")
    leading, rest = start
    lines = itertools.chain(leading, rest)
    if suffix in (".csv", ".tsv"):
        return _csv_records(path, lines)
    if suffix == ".json" and leading[-1].lstrip().startswith("["):
        try:
            values = json.loads(_read_text(path))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: invalid JSON: {error.msg}") from error
        if not isinstance(values, list):
            raise ValueError(f"{path}: expected a JSON array of objects")
        records = (Record(None, f"record {number}", value) for number, value in enumerate(values, start=1))
        return None, _objects(path, records)
    return None, _objects(path, _json_lines(path, lines))


def _csv_records(path: Path, lines: Iterator[str]) -> tuple[list[str], Iterator[Record]]:
    kind = path.suffix[1:].upper()
    reader = csv.reader((line + "\n" for line in lines), delimiter="\t" if kind == "TSV" else ",", strict=True)

    def malformed(error: csv.Error, start: int) -> ValueError:
        spans = f" (the record starting there runs to line {reader.line_num}: an unbalanced quote?)"
        return ValueError(
            f"{path}, line {start}: malformed {kind}: {error}" + (spans if reader.line_num > start else "")
        )

    try:
        header = next(reader)
    except csv.Error as error:  # the header's quote is never closed
        raise malformed(error, 1) from error
    repeated = sorted({name for name in header if header.count(name) > 1})
    if not header or repeated:
        raise ValueError(f"{path}, line 1: a header of distinct column names is needed, got {header}")

    def records() -> Iterator[Record]:
        start = reader.line_num + 1
        try:
            for fields in reader:
                if not fields:
                    yield Record(start, f"line {start}", None)
                elif len(fields) != len(header):
                    raise ValueError(f"{path}, line {start}: {len(fields)} fields where the header has {len(header)}")
                else:
                    yield Record(start, f"line {start}", dict(zip(header, fields, strict=True)))
                start = reader.line_num + 1
        except csv.Error as error:
            raise malformed(error, start) from error

    return header, records()


def _json_lines(path: Path, lines: Iterator[str]) -> Iterator[Record]:
    for number, line in enumerate(lines, start=1):
        line = line[:-1] if line.endswith("\r") else line
        value = None
        if line.strip():
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: invalid JSON: {error.msg}") from error
            if value is None:
                raise ValueError(f"{path}, line {number}: expected a JSON object, got null")
        yield Record(number, f"line {number}", value)


def _objects(path: Path, records: Iterable[Record]) -> Iterator[Record]:
    """``records``, each checked to hold a JSON object (or to be blank)."""
    for record in records:
        if record.values is not None and not isinstance(record.values, dict):
            raise ValueError(f"{path}, {record.where}: expected a JSON object, got {type(record.values).__name__}")
        yield record


def _parquet_records(path: Path) -> tuple[list[str], Iterator[Record]]:
    """A Parquet file's columns and its rows as records numbered from 1, read a row group at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from error
    try:
        file = pq.ParquetFile(check_input_file(path))
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{path} is not a readable Parquet file ({error})") from error
    header = list(file.schema_arrow.names)

    def records() -> Iterator[Record]:
        number = 0
        for batch in file.iter_batches(batch_size=4096):
            for values in batch.to_pylist():
                number += 1
                yield Record(None, f"record {number}", values)

    return header, records()


def read_records(path: Path) -> tuple[list[str] | None, list[Record]]:
    """``iter_records``'s header and records, as a list."""
    return (result := iter_records(path))[0], list(result[1])


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
    pair are read; ``pairs``: whether the file has pairs (``pair_column`` given, or the file has that column or key).
    """

    path: Path
    column: str
    pair_column: str | None
    pairs: bool

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
            for index, line in enumerate(_lines(self.path)):
                line = line[:-1] if line.endswith("\r") else line
                yield InputText(index, index + 1, line if line.strip() else "")
            return
        _, records = iter_records(self.path)
        for index, record in enumerate(records):
            values = record.values or {}
            if record.values is not None and self.column not in values:
                raise ValueError(f"{self.path}, {record.where}: expected an object with key {self.column!r}")
            segments = []
            for name in (self.column, self.pair_column):
                value = values.get(name, "") if name is not None else ""
                if not isinstance(value, str) or not (value.isascii() or not _SURROGATE.search(value)):
                    shown = "a lone surrogate (not text)" if isinstance(value, str) else type(value).__name__
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
    pairs = pair_column is not None
    if pair_column is None and PAIR_COLUMN != column:
        pair_column = PAIR_COLUMN
        pairs = PAIR_COLUMN in header if header is not None else _has_key(path, PAIR_COLUMN)
    return TextFile(path, column, pair_column, pairs)


def read_texts(path: str | os.PathLike[str], column: str = "text", pair_column: str | None = None) -> list[InputText]:
    """The texts to label in a ``.txt``, ``.csv``/``.tsv``, ``.jsonl``/``.json`` or ``.parquet`` file: one per
    input record (``list(open_texts(...))``; ``mp predict`` streams ``open_texts`` instead).

    A ``.txt`` file (any other extension too) holds one text per line; lines end at ``\\n`` or ``\\r\\n`` only. A
    CSV/TSV file has a header and the text in column ``column``; a JSON-lines file one object per line with the
    text under key ``column`` (a ``.json`` file may hold one array of objects); a Parquet file (read with pyarrow)
    a column ``column``. Every record gives exactly one ``InputText``, in file order, with its position and line:
    a blank line, or an empty or whitespace-only text, gives an empty one (``InputText.empty``), so
    ``result[i].index == i`` and, in a text or JSON-lines file, ``result[i].line == i + 1``. The second segment of
    a pair comes from ``pair_column`` (which must then exist), or from a ``text_pair`` column if the file has one;
    an empty or absent one makes a single text.

    Raises:
        ValueError: naming the file and line for a missing or unreadable file, a missing column or key, a JSON
            value that is not a string (``null``, a number, a list...), malformed CSV or JSON, or a file that holds
            no text at all.
    """
    return list(open_texts(path, column, pair_column))
