"""Reading a user's files record by record: CSV/TSV (strict quoting), JSON lines (or one JSON array) and Parquet.

``iter_records`` gives a file's header and a lazy iterator of its records (``Record``), blank lines included, in
bounded memory; ``lines_of`` the lines of any text file. Lines end only at ``\\n`` or ``\\r\\n`` (never at the other
Unicode line breaks). Every error is a ``ValueError`` naming the file and the line or record. ``lone_surrogate``
finds what JSON can hold in a string but is not Unicode text (``mp predict`` and ``mp serve`` refuse it).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILE_FORMATS = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
_SURROGATE = re.compile("[\ud800-\udfff]")


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


def lone_surrogate(text: str) -> str | None:
    """The first lone surrogate in ``text``, written ``"U+D800"``, or ``None`` if there is none.

    JSON can write one (``"\\ud800"``), and Python strings hold it, but it is not valid Unicode text: no tokenizer
    takes it. (A surrogate pair, ``"\\ud83d\\ude00"``, is decoded by JSON into one character and is fine.)
    """
    found = None if text.isascii() else _SURROGATE.search(text)
    return f"U+{ord(found.group()):04X}" if found else None


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


def lines_of(path: Path) -> Iterator[str]:
    """The lines of ``path``, read lazily and decoded as UTF-8 (a byte-order mark dropped), each without its ``\\n``
    (a ``\\r`` before it is kept); a ``ValueError`` naming the line of a bad byte."""
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
    start = _after_blank_lines(lines_of(path))
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
