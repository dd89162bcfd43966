"""Inputs of ``bench.e2e``: pools of real encoded texts per length bucket and the padded batches of each cell.

Buckets: ``short`` (at most 35 tokens) and ``middle`` (36 to 70) rotten_tomatoes reviews, ``long`` bbc_news
articles (more than 70 tokens, truncated to the maximum length), and ``mixed``, a seeded sample of the union of
both test splits. HF pads each batch to its longest row; ``pad_to_buckets`` widens batches further to fixed
widths (``WIDTH_BUCKETS``) for compiled models, which build one graph per shape.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import torch

from mp_model.recipe.data import Encoded, TextExample, batches, encode, length_bucket
from mp_model.recipe.datasets import load_dataset

BUCKETS = ("short", "middle", "long", "mixed")
# Padded widths of the compiled HF baseline (one compiled graph per batch size and width).
WIDTH_BUCKETS = (32, 64, 128, 256, 512)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def build_pools(tokenizer: Any, count: int, max_length: int, seed: int) -> dict[str, Encoded]:
    """``count`` encoded examples for every bucket (see the module docstring), unpadded, in a fixed order.

    rotten_tomatoes examples come from the test split first, then dev, then train, until the short and middle
    pools are full; bbc_news articles likewise. ``mixed`` samples ``count`` examples (with ``random.Random(seed)``)
    from the union of both test splits.
    """
    reviews = load_dataset("rotten_tomatoes")
    articles = load_dataset("bbc_news")
    pools: dict[str, list[tuple[list[int], list[int]]]] = {name: [] for name in ("short", "middle", "long")}

    def fill(examples: list[TextExample], wanted: Sequence[str]) -> None:
        for start in range(0, len(examples), 1000):
            if all(len(pools[name]) >= count for name in wanted):
                return
            encoded = encode(tokenizer, examples[start : start + 1000], max_length)
            for ids, types in zip(encoded["input_ids"], encoded["token_type_ids"], strict=True):
                pool = pools[length_bucket(len(ids))]
                if length_bucket(len(ids)) in wanted and len(pool) < count:
                    pool.append((ids, types))

    fill(reviews.test + reviews.dev + reviews.train, ("short", "middle"))
    fill(articles.test + articles.dev + articles.train, ("long",))
    for name in ("short", "middle", "long"):
        if len(pools[name]) < count:
            raise ValueError(f"only {len(pools[name])} {name} examples, {count} needed: lower --rotate-examples")
    union = reviews.test + articles.test
    sample = random.Random(seed).sample(union, min(count, len(union)))
    mixed = encode(tokenizer, sample, max_length)
    result = {"mixed": mixed}
    for name in ("short", "middle", "long"):
        result[name] = {
            "input_ids": [ids for ids, _ in pools[name]],
            "attention_mask": [[1] * len(ids) for ids, _ in pools[name]],
            "token_type_ids": [types for _, types in pools[name]],
            "labels": [0] * len(pools[name]),
        }
    return result


def take(encoded: Encoded, count: int) -> Encoded:
    """The first ``count`` examples of ``encoded``."""
    return {key: values[:count] for key, values in encoded.items()}  # type: ignore[return-value]


def cell_batches(
    encoded: Encoded,
    batch_size: int,
    batch_count: int,
    device: torch.device,
    exit_distribution: Sequence[float] | None,
    seed: int,
) -> list[dict[str, torch.Tensor]]:
    """``batch_count`` padded batches of ``batch_size`` from the start of ``encoded``, on ``device``.

    Each batch holds ``input_ids``, ``attention_mask``, ``token_type_ids`` and, with ``exit_distribution``,
    ``exit_schedule`` ``(batch,)`` int64: exit layers drawn from it (``torch.Generator`` seeded with ``seed``).
    """
    generator = torch.Generator().manual_seed(seed)
    result = []
    for batch in batches(take(encoded, batch_size * batch_count), batch_size):
        item = {key: batch[key].to(device) for key in MODEL_INPUTS}
        if exit_distribution is not None:
            weights = torch.tensor(exit_distribution, dtype=torch.float64)
            draws = torch.multinomial(weights, batch["input_ids"].shape[0], replacement=True, generator=generator)
            item["exit_schedule"] = (draws + 1).to(device)
        result.append(item)
    return result


def calibration_batch(pools: dict[str, Encoded], examples: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The threshold calibration batch: the first ``examples / 2`` short and middle examples, padded."""
    half = max(1, examples // 2)
    merged = {key: pools["short"][key][:half] + pools["middle"][key][:half] for key in pools["short"]}
    batch = next(batches(merged, 2 * half))  # type: ignore[arg-type]
    return {key: batch[key].to(device) for key in MODEL_INPUTS}


def batch_count(batch_size: int, rotate_examples: int) -> int:
    """Distinct batches a cell rotates through: enough for ``rotate_examples`` examples, at least two."""
    return max(2, math.ceil(rotate_examples / batch_size))


def bucket_width(width: int, limit: int, buckets: Sequence[int] = WIDTH_BUCKETS) -> int:
    """The smallest of ``buckets`` holding ``width`` tokens, at most ``limit`` (``width`` beyond the last)."""
    wider = [b for b in buckets if b >= width]
    return max(width, min(min(wider), limit)) if wider else width


def pad_to_buckets(
    inputs: list[dict[str, torch.Tensor]], limit: int, pad_token_id: int, buckets: Sequence[int] = WIDTH_BUCKETS
) -> list[dict[str, torch.Tensor]]:
    """Copies of the padded batches ``inputs`` right-padded further to ``bucket_width`` of their width.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` and ``token_type_ids`` with 0; other keys
    (``exit_schedule``) are kept as they are.
    """
    result = []
    for batch in inputs:
        extra = bucket_width(batch["input_ids"].shape[1], limit, buckets) - batch["input_ids"].shape[1]
        item = dict(batch)
        for key in MODEL_INPUTS:
            value = pad_token_id if key == "input_ids" else 0
            item[key] = torch.nn.functional.pad(batch[key], (0, extra), value=value)
        result.append(item)
    return result
