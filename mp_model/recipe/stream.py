"""Streaming ``mp predict``: a file labelled window by window in bounded memory, written in input order, resumable.

``stream_predict`` reads texts lazily (``mp_model.recipe.files.open_texts``), takes them ``window`` records at a
time, has a labeller turn each window into rows (``mp_model.recipe.predict.predict`` sorts a window by length,
batches it by a token budget and puts the rows back in input order; the Ray engine does the same on its workers),
and appends the window's rows to the output in one write, flushed and synced, so that the output always ends
at the end of a window, or in a torn last write that a resume repairs. A progress bar (tqdm, on stderr) shows
records/s, the mean exit layer and the share of tokens kept.

Provenance: beside a file output, ``OUTPUT.provenance.json`` records the model (the SHA-256 of its weights and
config), the knobs the rows depend on, the input (path, size, SHA-256 of the file) and the records written so far
(their count and a running SHA-256 of each record's line, text and pair), rewritten atomically after each window.

Resume (``resume=True``): the output's complete records are counted and checked to be records ``0 .. n - 1`` in
order (a torn last record, the mark of a kill mid-write, is cut off); the provenance must name the same model,
knobs and input (a one-line error names what differs); every one of the ``n`` records is checked against its input
record (same line, text and pair); the first ``n`` records of the input are then skipped, so that no record is
lost or written twice.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from mp_model.recipe.files import InputText

WINDOW = 4096
BATCH_TOKENS = 8192
# oneDNN primitives kept per process while labelling (its default, 1024, holds one per row count ever seen).
PRIMITIVE_CACHE = 16
# A labeller turns one window of texts into its rows, in the same order, and may add to the statistics it is given
# (``texts``, ``layers``, ``tokens``, ``kept``: see ``mp_model.recipe.predict.predict``).
Labeller = Callable[[list[InputText], dict[str, float]], list[dict[str, Any]]]


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` off glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim() if sys.platform.startswith("linux") else None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim(0)``; nothing elsewhere).

    Every token-budget batch has its own tensor sizes, so freed blocks rarely fit the next batch's and the heap
    grows in the number of records; trimming after each window keeps the resident set at the working set.
    """
    if _TRIM is not None:
        _TRIM(0)


def bound_native_caches() -> None:
    """Cap oneDNN's primitive cache at ``PRIMITIVE_CACHE`` for this process, unless the user set
    ``ONEDNN_PRIMITIVE_CACHE_CAPACITY``. oneDNN reads it when it makes its first primitive, so call this before the
    model first runs (``mp predict`` and each Ray actor do); later it changes nothing.

    Measured on the quick-start model, with ``release_free_memory``: peak RSS 1.00 GB at 12k records and 1.02 GB
    at 50k, against 1.05 and 1.35 GB before, at the same speed (``bench/NOTES.md``).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE))


def output_format(path: Path | None) -> str:
    """``"csv"`` for a ``.csv`` output, else ``"jsonl"`` (stdout included)."""
    return "csv" if path is not None and path.suffix.lower() == ".csv" else "jsonl"


def format_rows(rows: list[dict[str, Any]], fields: list[str], fmt: str, header: bool = False) -> str:
    """``rows`` as JSON lines (ASCII escapes keep U+2028 and the like out, so that no reader splits a row in two) or
    as CSV records under ``fields`` (after the header if ``header``)."""
    if fmt == "jsonl":
        return "".join(json.dumps(row) + "\n" for row in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def windows(texts: Iterable[InputText], size: int) -> Iterator[list[InputText]]:
    """``texts`` in consecutive lists of ``size`` (the last may be shorter)."""
    iterator = iter(texts)
    while window := list(itertools.islice(iterator, size)):
        yield window


def _records(path: Path, fmt: str) -> Iterator[tuple[Any, int, bool]]:
    """Each record written in ``path``: its value (a dict for JSON lines, a list of fields for CSV, ``None`` if it does
    not parse), the byte offset where it ends and whether it ends with a line break. CSV starts with its header."""
    with path.open("rb") as file:
        if fmt == "jsonl":
            end = 0
            for raw in file:
                end += len(raw)
                try:
                    value = json.loads(raw)
                except ValueError:
                    value = None
                yield value, end, raw.endswith(b"\n")
            return
        consumed = {"end": 0, "whole": True}

        def lines() -> Iterator[str]:
            for raw in file:
                consumed["end"] += len(raw)
                consumed["whole"] = raw.endswith(b"\n")
                yield raw.decode("utf-8", errors="replace")

        reader = csv.reader(lines(), strict=True)
        try:
            for fields in reader:
                yield fields, consumed["end"], consumed["whole"]
        except csv.Error:
            yield None, consumed["end"], False


def written_records(path: Path, fields: list[str], fmt: str) -> int:
    """How many records ``path`` (an earlier run's output) holds, checked to be records ``0 .. n - 1`` in order; a
    torn last record is cut off the file (it is written again). A ``ValueError`` if the file is
    not such an output (another header, a record out of order, a damaged record before the last)."""
    count, good_end, bad = 0, 0, None
    header = fmt == "csv"
    for value, end, whole in _records(path, fmt):
        if bad is not None:
            raise ValueError(f"--resume: {path}: record {bad} is damaged and is not the last; cannot resume")
        if header:
            if value != fields:
                raise ValueError(f"--resume: {path} has the columns {value}, expected {fields}; cannot resume")
            header, good_end = False, end
            continue
        row = dict(zip(fields, value, strict=False)) if isinstance(value, list) else value
        ok = whole and isinstance(row, dict) and str(row.get("index")) == str(count)
        ok = ok and (fmt == "jsonl" or len(value) == len(fields))
        if not ok:
            if whole and isinstance(row, dict) and "index" in row:
                raise ValueError(f"--resume: {path}: record {count} holds index {row['index']}; cannot resume")
            bad = count
            continue
        count, good_end = count + 1, end
    if header and path.stat().st_size:
        raise ValueError(f"--resume: {path} has no header line; cannot resume")
    if path.stat().st_size > good_end:
        with path.open("r+b") as file:
            file.truncate(good_end)
    return count


def provenance_path(output: Path) -> Path:
    """The provenance file beside ``output``: ``OUTPUT.provenance.json``."""
    return output.with_name(output.name + ".provenance.json")


def file_identity(path: Path) -> dict[str, Any]:
    """``path``, its size in bytes and the SHA-256 of its bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return {"path": str(path), "size": path.stat().st_size, "sha256": digest.hexdigest()}


def _record_key(line: Any, text: Any, pair: Any) -> str:
    """A record's place and texts as one string (``None`` and ``""`` alike: CSV cannot tell them apart)."""
    return json.dumps(["" if value is None else str(value) for value in (line, text, pair)])


def _check_provenance(output: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance an earlier run wrote beside ``output``, checked to name the same model, knobs and input as
    ``provenance``; a one-line ``ValueError`` naming what differs."""
    path = provenance_path(output)
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"--resume: {output} has no {path.name}, so the model, knobs and input that wrote it are unknown: "
            "start a new output"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--resume: {path} is unreadable ({error}): start a new output") from error
    if not isinstance(earlier, dict) or not all(isinstance(earlier.get(k), dict) for k in ("model", "knobs", "input")):
        raise ValueError(f"--resume: {path} is not a provenance file: start a new output")
    model, was = provenance["model"], earlier["model"]
    for key in ("weights_sha256", "config_sha256", "tokenizer_sha256"):
        if model.get(key) != was.get(key):
            raise ValueError(
                f"--resume: {output} was begun by another model ({was.get('folder')}, {key} "
                f"{str(was.get(key))[:12]}), not {model.get('folder')} ({str(model.get(key))[:12]}): use that model "
                "or start a new output"
            )
    knobs, was = provenance["knobs"], earlier["knobs"]
    differ = sorted(key for key in knobs.keys() | was.keys() if knobs.get(key) != was.get(key))
    if differ:
        shown = ", ".join(f"{key} {was.get(key)!r} then, {knobs.get(key)!r} now" for key in differ)
        raise ValueError(f"--resume: {output} was begun with other knobs ({shown}): use the same or a new output")
    source, was = provenance["input"], earlier["input"]
    if (source.get("size"), source.get("sha256")) != (was.get("size"), was.get("sha256")):
        raise ValueError(
            f"--resume: the input {source.get('path')} changed since {output} was begun ({was.get('size')} bytes "
            f"then, {source.get('size')} now, or other contents): start a new output"
        )
    return earlier


def _skipped(
    texts: Iterable[InputText], output: Path, fields: list[str], fmt: str, count: int, digest: Any, checked: Any
) -> Iterator[InputText]:
    """``texts`` after the first ``count``, each of those checked to match its record in ``output`` (same line,
    text and pair) and added to ``digest``; ``checked`` (the earlier run's records count and hash, or ``None``)
    must match the hash of that many records."""
    iterator = iter(texts)
    written = _records(path=output, fmt=fmt)
    if fmt == "csv":
        next(written)
    for index in range(count):
        text = next(iterator, None)
        if text is None:
            raise ValueError(f"--resume: the output holds {count} records but the input only {index}")
        value = next(written)[0]
        row = dict(zip(fields, value, strict=False)) if isinstance(value, list) else value
        key = _record_key(text.line, text.text, text.text_pair)
        if _record_key(row.get("line"), row.get("text"), row.get("text_pair")) != key:
            where = f"line {text.line}" if text.line is not None else f"record {index + 1}"
            raise ValueError(
                f"--resume: output record {index} does not match input record {index} ({where}): "
                "the input changed, start a new output"
            )
        digest.update(key.encode("utf-8") + b"\n")
        if checked is not None and index + 1 == checked[0] and digest.hexdigest() != checked[1]:
            raise ValueError(
                f"--resume: the input's first {index + 1} records differ from those the output was "
                "begun with: start a new output"
            )
    written.close()
    return iterator


def _write_provenance(output: Path, provenance: dict[str, Any], count: int, digest: Any) -> None:
    """Write ``provenance`` with the records so far (``count``, the hash ``digest``) beside ``output``, atomically."""
    path = provenance_path(output)
    payload = provenance | {"records": {"count": count, "sha256": digest.hexdigest()}}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def stream_predict(
    label: Labeller,
    texts: Iterable[InputText],
    output: Path | None,
    fields: list[str],
    *,
    window: int = WINDOW,
    resume: bool = False,
    progress: bool = True,
    provenance: dict[str, Any] | None = None,
) -> int:
    """Label ``texts`` window by window with ``label`` and write the rows, in input order, to ``output`` (JSON lines,
    or CSV for a ``.csv`` path; ``None``: JSON lines on stdout) under ``fields``. Each window's rows are one write,
    flushed (and synced, for a file). Returns the records labelled by this call.

    ``provenance`` (``model``: ``mp_model.recipe.runs.load_checked``'s identity, ``knobs``: the settings the rows
    depend on, ``input``: ``file_identity`` of the input) is written beside a file ``output``
    (``provenance_path``) with the count and SHA-256 of the records written so far, updated after every window.
    With ``resume`` (``output`` needed) an earlier run's output is continued after its last complete record: every
    record already written is checked against the input, and, with ``provenance``, the earlier run's model, knobs
    and input must be these (see the module's docstring). The caller holds the output's lock
    (``mp_model.recipe.locks.exclusive_lock``)."""
    fmt = output_format(output)
    skip, checked = 0, None
    if resume:
        if output is None:
            raise ValueError("--resume needs --output")
        if output.exists():
            skip = written_records(output, fields, fmt)
        if skip and provenance is not None:
            earlier = _check_provenance(output, provenance)
            records = earlier.get("records")
            checked = (records.get("count"), records.get("sha256")) if isinstance(records, dict) else None
    digest = hashlib.sha256()
    remaining = _skipped(texts, output, fields, fmt, skip, digest, checked) if skip else iter(texts)
    if provenance is not None and output is not None:
        _write_provenance(output, provenance, skip, digest)
    from tqdm.auto import tqdm

    stats: dict[str, float] = {}
    done = 0
    append = resume and output is not None and output.exists() and output.stat().st_size > 0
    sink: IO[bytes] = sys.stdout.buffer if output is None else output.open("ab" if append else "wb")
    header = fmt == "csv" and not append
    try:
        with tqdm(desc="mp predict", unit=" records", file=sys.stderr, disable=not progress, initial=skip) as bar:
            try:
                for batch in windows(remaining, window):
                    rows = label(batch, stats)
                    if [row["index"] for row in rows] != [text.index for text in batch]:
                        raise AssertionError("the labeller gave rows out of order")
                    sink.write(format_rows(rows, fields, fmt, header).encode("utf-8"))
                    sink.flush()
                    if output is not None:
                        os.fsync(sink.fileno())
                    header = False
                    for text in batch:
                        digest.update(_record_key(text.line, text.text, text.text_pair).encode("utf-8") + b"\n")
                    if provenance is not None and output is not None:
                        _write_provenance(output, provenance, skip + done + len(batch), digest)
                    release_free_memory()
                    done += len(batch)
                    exits = [row["exit_layer"] for row in rows if row["exit_layer"] is not None]
                    stats["exits"] = stats.get("exits", 0) + sum(exits)
                    stats["exited"] = stats.get("exited", 0) + len(exits)
                    shown = {"exit": f"{stats['exits'] / max(stats['exited'], 1):.2f}"}
                    if stats.get("tokens"):
                        shown["kept"] = f"{stats['kept'] / stats['tokens']:.0%}"
                    bar.set_postfix(shown, refresh=False)
                    bar.update(len(batch))
            except BaseException:  # an error is one line on stderr: the bar clears itself
                bar.leave = False
                raise
        if header:  # nothing was left to label: the CSV still gets its header
            sink.write(format_rows([], fields, fmt, True).encode("utf-8"))
    finally:
        if output is not None:
            sink.close()
        else:
            sink.flush()
    return done
