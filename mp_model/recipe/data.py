"""Classification examples, their splits, tokenisation and padded batching.

``TextExample`` and ``TextDataset`` hold labelled examples in train/dev/test splits (``mp_model.recipe.datasets``
loads the built-in ones and a user's file by name, ``mp_model.recipe.files`` reads files). Splits are made by
``random_split``, a ``random.Random(seed)`` shuffle, which gives the same split on every machine and Python version.

``encode`` tokenises examples into unpadded lists; ``batches`` pads them into ``int64`` tensors for the model.
``length_bucket`` names the short/middle/long token-count groups of the paper's Figure 1.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypedDict

import torch

from mp_model.recipe.long_texts import cap_long_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "dev", "test")
DEV_FRACTION = 0.1
TEST_FRACTION = 0.1

# Token-count groups of the paper's Figure 1: short is 1..35 tokens, middle 36..70, long more than 70.
SHORT_MAX_TOKENS = 35
MIDDLE_MAX_TOKENS = 70
LENGTH_BUCKETS = ("short", "middle", "long")


class DataWarning(UserWarning):
    """A dataset problem that does not stop a run (dev or test examples repeating training ones)."""


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

    def with_dev_from_train(self, count: int) -> TextDataset:
        """A copy whose last ``count`` training examples join the end of dev (test untouched; 0: the same splits).

        A larger dev split makes epoch choice, the pruning search and ``mp eval``'s selection less noisy; the
        training examples left stay a prefix of the train split.
        """
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count < len(self.train):
            raise ValueError(
                f"dev_from_train must be an integer from 0 to {len(self.train) - 1} (the train split holds "
                f"{len(self.train)} examples), got {count!r}"
            )
        if count == 0:
            return self
        return replace(self, train=self.train[:-count], dev=[*self.dev, *self.train[-count:]])

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


def normalise_whitespace(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) turned into one space, and stripped."""
    return " ".join(text.split())


def drop_duplicates(examples: list[TextExample]) -> list[TextExample]:
    """The examples whose ``(text, text_pair)`` has not occurred before, in order."""
    seen: set[tuple[str, str | None]] = set()
    kept = []
    for example in examples:
        key = (example.text, example.text_pair)
        if key not in seen:
            seen.add(key)
            kept.append(example)
    return kept


def random_split(
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


def encode(tokenizer: PreTrainedTokenizerBase, examples: Sequence[TextExample], max_length: int = 512) -> Encoded:
    """Tokenise ``examples`` (special tokens added, truncated to ``max_length`` tokens, not padded).

    Pairs are truncated longest segment first. Single texts and pairs may be mixed. Returns an ``Encoded`` whose
    entry ``i`` belongs to ``examples[i]``. ``max_length`` must hold the special tokens (2 for a single text with
    BERT's ``[CLS] ... [SEP]``, 3 for a pair): below that the tokenizer would silently not truncate at all.

    A very long text is tokenised as a prefix that gives the same ids (``mp_model.recipe.long_texts``), so that
    memory stays bounded however long the input.
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
        texts, text_pairs = cap_long_texts(
            tokenizer,
            [examples[i].text for i in positions],
            [examples[i].text_pair for i in positions] if paired else None,
            max_length,
        )
        output = tokenizer(
            texts,
            text_pairs,
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
