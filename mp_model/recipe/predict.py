"""``mp predict``'s labelling: the packed path over a user's texts, one row per record, in order.

``predict`` labels a sequence of texts (``mp predict`` gives it one window of the file at a time,
``mp_model.recipe.stream``; the Ray engine one block, ``mp_model.recipe.bulk``). Its batches are formed from the
texts sorted by length, longest first, either ``batch_size`` at a time or, with ``batch_tokens``, as many as fit a
token budget (``token_budget_batches``). A text's label and exit layer do not depend on the batch it ran in; its
confidence agrees to float32 rounding (about 1e-6), so every engine and batching gives the same labels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.recipe.checks import check_device, check_float, check_int
from mp_model.recipe.data import TextExample, check_max_length, encode
from mp_model.recipe.evaluation import run_batch
from mp_model.recipe.files import InputText
from mp_model.recipe.records import lone_surrogate

LABEL_FIELDS = ("label", "label_id", "confidence", "exit_layer", "gflops")


def row_fields(pairs: bool) -> list[str]:
    """The fields of ``predict``'s rows, in order (``text_pair`` only when the texts hold pairs)."""
    return ["index", "line", "text", *(["text_pair"] if pairs else []), *LABEL_FIELDS]


def blank_row(text: InputText, pairs: bool) -> dict[str, Any]:
    """``text``'s row before labelling: its place, its text (and pair, if ``pairs``) and label fields of ``None``."""
    row: dict[str, Any] = {"index": text.index, "line": text.line, "text": text.text}
    if pairs:
        row["text_pair"] = text.text_pair
    return row | dict.fromkeys(LABEL_FIELDS)


def window_labeller(
    model: MagicPyramidForSequenceClassification, tokenizer: Any, **options: Any
) -> Callable[[list[InputText], dict[str, float]], list[dict[str, Any]]]:
    """``predict`` with ``model``, ``tokenizer`` and ``options`` as a labeller of windows for
    ``mp_model.recipe.stream.stream_predict``: ``label(texts, stats)``."""
    return lambda texts, stats: predict(model, tokenizer, texts, stats=stats, **options)


def token_budget_batches(lengths: Sequence[int], batch_tokens: int | None, batch_size: int) -> list[list[int]]:
    """Positions of ``lengths`` grouped into batches: sorted longest first (ties in order), then cut so that each
    batch holds at most ``batch_size`` texts and, with ``batch_tokens``, its padded size (texts x longest length)
    is at most ``batch_tokens`` (a text longer than the budget runs alone). Every position appears exactly once."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    start = 0
    while start < len(order):
        fit = batch_size if batch_tokens is None else max(1, min(batch_size, batch_tokens // lengths[order[start]]))
        chunks.append(order[start : start + fit])
        start += fit
    return chunks


def _padded(input_ids: list[list[int]], token_type_ids: list[list[int]], chunk: list[int]) -> dict[str, torch.Tensor]:
    width = max(len(input_ids[i]) for i in chunk)
    batch = {key: torch.zeros(len(chunk), width, dtype=torch.int64) for key in ("input_ids", "token_type_ids")}
    batch["attention_mask"] = torch.zeros(len(chunk), width, dtype=torch.int64)
    for row, i in enumerate(chunk):
        n = len(input_ids[i])
        batch["input_ids"][row, :n] = torch.tensor(input_ids[i], dtype=torch.int64)
        batch["token_type_ids"][row, :n] = torch.tensor(token_type_ids[i], dtype=torch.int64)
        batch["attention_mask"][row, :n] = 1
    return batch


@torch.inference_mode()
def predict(
    model: MagicPyramidForSequenceClassification,
    tokenizer: Any,
    texts: Sequence[InputText],
    *,
    max_length: int | None = None,
    batch_size: int = 32,
    batch_tokens: int | None = None,
    tau: float | None = None,
    threshold_scale: float = 1.0,
    prune: bool = True,
    early_exit: bool = True,
    device: torch.device | str = "cpu",
    pairs: bool | None = None,
    stats: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Label ``texts`` (from ``mp_model.recipe.files.read_texts``) with the packed path: one row per text, in order.

    Each row holds ``index`` and ``line`` (the record's place in its file), ``text`` (and ``text_pair`` if
    ``pairs``, by default if any text has one), ``label`` (the model's name for it), ``label_id``, ``confidence``
    (its softmax probability, rounded to 6 decimals), ``exit_layer`` and ``gflops``. ``tau`` defaults to the model's
    own ``config.exit_tau`` (as calling the model does). ``max_length`` (tokens after
    truncation) defaults to the model's ``max_position_embeddings``. An empty text (``InputText.empty``) is not
    classified: its label fields are ``None``. Pairs are encoded as BERT pairs (segment ids 0 and 1), which needs
    ``type_vocab_size >= 2``. Batches hold at most ``batch_size`` texts and, with ``batch_tokens``, at most that
    many padded tokens (see ``token_budget_batches``). ``stats``, if given, is increased by the texts labelled
    (``texts``), their exit layers (``layers``), their tokens times the layers they ran (``tokens``) and the tokens
    they kept over those layers (``kept``).

    Raises:
        ValueError: before computing, for a knob out of range (``tau`` in [0, 1], ``threshold_scale`` >= 0,
            ``batch_size`` and ``batch_tokens`` >= 1, ``max_length`` between the special tokens and the model's
            position embeddings), a missing device, a text with a lone surrogate, or pairs for a model without a
            second segment; after, if the model gives a non-finite logit (naming the records), rather than a label
            that means nothing.
    """
    tau = check_float("tau", model.config.exit_tau if tau is None else tau, 0.0, 1.0)
    threshold_scale = check_float("threshold_scale", threshold_scale, 0.0)
    check_int("batch_size", batch_size)
    if batch_tokens is not None:
        check_int("batch_tokens", batch_tokens)
    device = check_device(device)
    has_pairs = any(text.text_pair is not None for text in texts)
    pairs = has_pairs if pairs is None else pairs or has_pairs
    limit = model.config.max_position_embeddings
    max_length = check_max_length(limit if max_length is None else max_length, tokenizer, pairs=pairs, limit=limit)
    if pairs and getattr(model.config, "type_vocab_size", 2) < 2:
        raise ValueError("the texts hold pairs but the model has a single segment type (type_vocab_size 1)")
    for position, text in enumerate(texts):
        for part in (text.text, text.text_pair):
            if part is not None and (found := lone_surrogate(part)) is not None:
                raise ValueError(f"texts[{position}] holds a lone surrogate ({found}), which is not valid Unicode text")
    model.eval().to(device)
    rows = [blank_row(text, pairs) for text in texts]
    todo = [position for position, text in enumerate(texts) if not text.empty]
    if not todo:
        return rows
    encoded = encode(tokenizer, [TextExample(texts[p].text, 0, texts[p].text_pair) for p in todo], max_length)
    input_ids, token_type_ids = encoded["input_ids"], encoded["token_type_ids"]
    broken: list[str] = []
    knobs = {"tau": tau, "threshold_scale": threshold_scale, "prune": prune, "early_exit": early_exit}
    for chunk in token_budget_batches([len(ids) for ids in input_ids], batch_tokens, batch_size):
        out = run_batch(model, _padded(input_ids, token_type_ids, chunk), device, **knobs)
        logits = out.logits.float().cpu()
        probabilities = logits.softmax(dim=-1)
        exit_layers, flops = out.exit_layer.cpu(), out.flops.cpu()
        if stats is not None:
            lengths = torch.tensor([len(input_ids[i]) for i in chunk])
            stats["texts"] = stats.get("texts", 0) + len(chunk)
            stats["layers"] = stats.get("layers", 0) + int(exit_layers.sum())
            stats["tokens"] = stats.get("tokens", 0) + int((lengths * exit_layers).sum())
            stats["kept"] = stats.get("kept", 0) + int(out.kept_tokens.sum())
        for row, index in enumerate(chunk):
            text = texts[todo[index]]
            if not bool(torch.isfinite(logits[row]).all()):
                broken.append(f"line {text.line}" if text.line is not None else f"record {text.index + 1}")
                continue
            label_id = int(probabilities[row].argmax())
            rows[todo[index]] |= {
                "label": model.config.id2label.get(label_id, str(label_id)),
                "label_id": label_id,
                "confidence": round(float(probabilities[row, label_id]), 6),
                "exit_layer": int(exit_layers[row]),
                "gflops": float(flops[row]) / 1e9,
            }
    if broken:
        raise ValueError(f"the model gave non-finite logits for {len(broken)} text(s) ({', '.join(broken[:5])})")
    return rows
