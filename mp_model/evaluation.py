"""Accuracy, GFLOPs and latency of dense BERT, LTP, FastBERT and Magic Pyramid over sweeps of tau and scale.

Methods (one set of trained weights from ``mp_model.training``, plus its stage-1 model):

- ``dense``: the stage-1 (fine-tuned, never pruned) model, pruning and exit off.
- ``ltp``: the final model, pruning on at each ``threshold_scale``, exit off.
- ``fastbert``: the final model, pruning off, exit on at each ``tau``.
- ``mp``: the final model, both, over the grid.

Accuracy and FLOPs. For each model and threshold scale the packed path runs once with early exit off while
forward hooks capture every layer's hidden states; the sub-classifiers are applied to the mean of each example's
remaining tokens and ``mp_kernels.entropy_exit`` gives their uncertainty. Whether an example exits at a layer
depends only on its own uncertainty, and pruning never depends on exiting, so the exit layer, logits and FLOPs
of every ``tau`` follow exactly (``simulate``; ``mp_model.flops``'s count of what the packed path executes:
attention at the length before pruning, feed-forward after, one sub-classifier per layer passed, the main
classifier if reached).
The test suite checks this equals running the packed path with exits.

Latency is measured on the real packed path (``model(..., tau, threshold_scale, prune, early_exit)``) against
HF ``BertForSequenceClassification`` with ``attn_implementation="sdpa"`` on the stage-1 weights, on the first
``latency_examples`` examples of the split in padded batches of the same size, sorted by length (longest first,
which spares the padded baseline most of its padding). Each is warmed up with one pass over those batches, then
timed over ``latency_repeats`` rounds, each of which runs the baseline and every setting once in turn, so that
a change of machine load hits them alike (``interleaved_timings``). ``latency_ms`` is the median pass time per
batch, ``latency_speedup`` the median over rounds of the baseline's pass time over the setting's.

Selection (``select``): per method, the setting with the fewest GFLOPs whose accuracy is at most ``max_drop``
(absolute) below dense on the same split; the CLI selects on dev and reports those settings on test.

Checks. ``check_device`` refuses an unknown device or CUDA on a machine without it; ``collect`` refuses labels the
model does not have and sequences longer than its position embeddings; ``evaluate``, ``select`` and ``predict``
refuse knobs out of range (a NaN included) before computing anything. ``predict`` labels ``mp_model.data.read_texts``
records: one row per record, in order, empty ones unlabelled.

Length buckets (``short`` 1-35, ``middle`` 36-70, ``long`` > 70 tokens, special tokens included, as
``mp_model.data.length_bucket``) report accuracy, GFLOPs and FLOPs speedup over dense per bucket.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mp_kernels import entropy_exit
from mp_model.data import (
    LENGTH_BUCKETS,
    Encoded,
    InputText,
    TextExample,
    batches,
    check_max_length,
    encode,
    length_bucket,
)
from mp_model.flops import dense_flops, flops_from_outputs
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.packed_inference import segment_mean

METHODS = ("dense", "ltp", "fastbert", "mp")
DEFAULT_TAUS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)

SettingKey = tuple[str, float | None, float | None]


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) >= ``minimum``; a ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(
    name: str, value: object, minimum: float | None = None, maximum: float | None = None, *, positive: bool = False
) -> float:
    """``float(value)`` if it is a finite number within ``[minimum, maximum]`` (and > 0 with ``positive``); a
    ``ValueError`` naming ``name`` otherwise (NaN and infinities included)."""
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    limits = ["> 0"] if positive else []
    limits += [f">= {minimum}"] if minimum is not None else []
    limits += [f"<= {maximum}"] if maximum is not None else []
    inside = (minimum is None or number >= minimum) and (maximum is None or number <= maximum)
    if not math.isfinite(number) or not inside or (positive and number <= 0):
        raise ValueError(f"{name} must be a finite number {', '.join(limits)}".rstrip() + f", got {value!r}")
    return number


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` if this machine has it: ``cpu``, or ``cuda``/``cuda:N`` with CUDA present.

    Raises:
        ValueError: naming the device, for a string torch does not parse, another device type, or CUDA (or a CUDA
            index) that this machine lacks.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {str(device)!r} is not a torch device: use cpu, cuda or cuda:N") from error
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use cpu")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def check_encoded(model: MagicPyramidForSequenceClassification, encoded: Encoded) -> None:
    """A ``ValueError`` if ``encoded`` holds a label outside the model's ``0 .. num_labels - 1`` or a sequence
    longer than its ``max_position_embeddings``."""
    config = model.config
    bad = [label for label in encoded["labels"] if not 0 <= label < config.num_labels]
    if bad:
        raise ValueError(
            f"label {bad[0]} is outside the model's {config.num_labels} labels {list(config.id2label.values())}"
        )
    longest = max((len(ids) for ids in encoded["input_ids"]), default=0)
    if longest > config.max_position_embeddings:
        raise ValueError(
            f"a sequence of {longest} tokens exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings}): lower max_length"
        )


def backend_for(device: torch.device | str) -> str | None:
    """Kernel backend for ``device``: PyTorch on CPU (never the Triton interpreter), the default on CUDA."""
    return "torch" if torch.device(device).type == "cpu" else None


@dataclass
class Collected:
    """One model's packed pass over a split with early exit off, in the split's order.

    Attributes:
        lengths: ``(N,)`` int64 real token counts.
        labels: ``(N,)`` int64 gold labels.
        logits: ``(N, C)`` main-classifier logits.
        exit_logits: ``(N, L - 1, C)`` each sub-classifier's logits.
        uncertainty: ``(N, L - 1)`` float32 normalised entropy of ``exit_logits``.
        kept_tokens: ``(N, L)`` int64 tokens after each layer's pruning.
        config: the model's config (for the FLOPs count).
        prune: whether pruning was on; ``threshold_scale``: its scale.
    """

    lengths: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    exit_logits: torch.Tensor
    uncertainty: torch.Tensor
    kept_tokens: torch.Tensor
    config: Any
    prune: bool
    threshold_scale: float


@torch.inference_mode()
def collect(
    model: MagicPyramidForSequenceClassification,
    encoded: Encoded,
    *,
    batch_size: int,
    device: torch.device | str,
    prune: bool,
    threshold_scale: float = 1.0,
) -> Collected:
    """Run ``encoded`` through the packed path (exit off) and capture every sub-classifier's logits."""
    device = check_device(device)
    model.eval().to(device)
    config = model.config
    layers = config.num_hidden_layers
    count = len(encoded["labels"])
    if count == 0:
        raise ValueError("nothing to evaluate: the split is empty")
    check_int("batch_size", batch_size)
    check_encoded(model, encoded)
    logits = torch.zeros(count, config.num_labels)
    exit_logits = torch.zeros(count, max(layers - 1, 0), config.num_labels)
    kept = torch.zeros(count, layers, dtype=torch.int64)
    lengths = torch.tensor([len(ids) for ids in encoded["input_ids"]], dtype=torch.int64)
    captured: list[torch.Tensor | None] = [None] * layers

    def hook(index: int) -> Callable[..., None]:
        def store(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
            captured[index] = output

        return store

    handles = [layer.output.register_forward_hook(hook(i)) for i, layer in enumerate(model.bert.encoder.layer)]
    try:
        for batch in batches(encoded, batch_size, sort_by_length=True):
            out = model(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["token_type_ids"].to(device),
                threshold_scale=threshold_scale,
                prune=prune,
                early_exit=False,
                backend=backend_for(device),
            )
            rows = batch["index"]
            logits[rows] = out.logits.float().cpu()
            kept[rows] = out.kept_tokens.cpu()
            for layer in range(layers - 1):
                cu = torch.nn.functional.pad(torch.cumsum(out.kept_tokens[:, layer], 0), (1, 0)).to(device)
                exit_logits[rows, layer] = model.exits[layer](segment_mean(captured[layer], cu)).float().cpu()
    finally:
        for handle in handles:
            handle.remove()
    uncertainty = (
        torch.stack(
            [entropy_exit(exit_logits[:, layer].contiguous(), 0.0, backend="torch")[1] for layer in range(layers - 1)],
            dim=1,
        )
        if layers > 1
        else torch.zeros(count, 0)
    )
    return Collected(
        lengths=lengths,
        labels=torch.tensor(encoded["labels"], dtype=torch.int64),
        logits=logits,
        exit_logits=exit_logits,
        uncertainty=uncertainty,
        kept_tokens=kept,
        config=config,
        prune=prune,
        threshold_scale=threshold_scale,
    )


def simulate(collected: Collected, tau: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predictions, exit layers (1..L) and FLOPs per example of the packed path at ``tau`` (None: exit off)."""
    config = collected.config
    layers = config.num_hidden_layers
    count = collected.lengths.numel()
    if tau is None or layers == 1:
        exit_layer = torch.full((count,), layers, dtype=torch.int64)
    else:
        exits = collected.uncertainty <= tau
        exits = torch.cat([exits, torch.ones(count, 1, dtype=torch.bool)], dim=1)
        exit_layer = exits.int().argmax(dim=1).to(torch.int64) + 1
    flops = flops_from_outputs(
        config, collected.lengths, collected.kept_tokens, exit_layer, early_exit=tau is not None and layers > 1
    )
    predictions = collected.logits.argmax(dim=1)
    if tau is not None and layers > 1:
        exited = exit_layer < layers
        early = collected.exit_logits.argmax(dim=2).gather(1, (exit_layer.clamp(max=layers - 1) - 1)[:, None])[:, 0]
        predictions = torch.where(exited, early, predictions)
    return predictions, exit_layer, flops


def summarize(collected: Collected, *, tau: float | None, early_exit: bool) -> dict[str, Any]:
    """Accuracy, mean GFLOPs, mean exit layer, kept-token ratio and per-bucket numbers of one setting.

    ``kept_ratio`` is the feed-forward token-layers executed over the dense model's (``L * n`` per example),
    averaged over examples: it falls with both pruning and exiting.
    """
    predictions, exit_layer, flops = simulate(collected, tau if early_exit else None)
    config = collected.config
    layers = config.num_hidden_layers
    correct = (predictions == collected.labels).double()
    ran = torch.arange(1, layers + 1)[None, :] <= exit_layer[:, None]
    token_layers = (collected.kept_tokens * ran).sum(dim=1).double() / (layers * collected.lengths.double())
    dense = dense_flops(config, collected.lengths).double()
    buckets = {}
    names = [length_bucket(int(n)) for n in collected.lengths]
    for bucket in LENGTH_BUCKETS:
        rows = torch.tensor([name == bucket for name in names], dtype=torch.bool)
        if not rows.any():
            continue
        gflops = float(flops[rows].double().mean()) / 1e9
        buckets[bucket] = {
            "examples": int(rows.sum()),
            "accuracy": float(correct[rows].mean()),
            "gflops": gflops,
            "dense_gflops": float(dense[rows].mean()) / 1e9,
            "flops_speedup": float(dense[rows].mean()) / 1e9 / gflops,
        }
    return {
        "examples": int(collected.lengths.numel()),
        "accuracy": float(correct.mean()),
        "gflops": float(flops.double().mean()) / 1e9,
        "dense_gflops": float(dense.mean()) / 1e9,
        "mean_exit_layer": float(exit_layer.double().mean()),
        "kept_ratio": float(token_layers.mean()),
        "buckets": buckets,
    }


def settings(
    methods: Sequence[str], taus: Sequence[float], scales: Sequence[float]
) -> list[tuple[str, float | None, float | None]]:
    """The ``(method, tau, threshold_scale)`` of a sweep; ``None`` marks a mechanism that is off."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}: choose from {METHODS}")
    result: list[tuple[str, float | None, float | None]] = []
    for method in methods:
        if method == "dense":
            result.append(("dense", None, None))
        elif method == "ltp":
            result += [("ltp", None, float(s)) for s in scales]
        elif method == "fastbert":
            result += [("fastbert", float(t), None) for t in taus]
        else:
            result += [("mp", float(t), float(s)) for s in scales for t in taus]
    return result


def _pass_ms(
    run: Callable[[dict[str, torch.Tensor]], object], inputs: list[dict[str, torch.Tensor]], device: torch.device
) -> float:
    """Wall time of running every batch of ``inputs`` once, in milliseconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for batch in inputs:
        run(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1e3


def interleaved_timings(
    runners: Sequence[Callable[[dict[str, torch.Tensor]], object]],
    inputs: list[dict[str, torch.Tensor]],
    device: torch.device,
    repeats: int,
) -> list[list[float]]:
    """Pass times of every runner, in ms per batch, ``repeats`` rounds after one warm-up round.

    Each round runs every runner once, one after the other, so a change of machine load between rounds hits the
    baseline and the settings alike; ratios are taken within a round. Returns ``times[runner][round]``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for run in runners:
        _pass_ms(run, inputs, device)
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for run, row in zip(runners, times, strict=True):
            row.append(_pass_ms(run, inputs, device) / len(inputs))
    return times


def hf_baseline(model: MagicPyramidForSequenceClassification) -> torch.nn.Module:
    """HF ``BertForSequenceClassification`` (SDPA attention) holding ``model``'s backbone and main classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    values = model.config.to_dict()
    values.pop("model_type", None)
    config = BertConfig(**values)
    config._attn_implementation = "sdpa"
    baseline = BertForSequenceClassification(config)
    missing, _unexpected = baseline.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise ValueError(f"the HF baseline lacks weights for {missing}")
    return baseline.to(next(model.parameters()).device).eval()


@torch.inference_mode()
def measure_latency(
    dense_model: MagicPyramidForSequenceClassification,
    model: MagicPyramidForSequenceClassification,
    encoded: Encoded,
    keys: Iterable[SettingKey],
    *,
    batch_size: int,
    device: torch.device | str,
    examples: int,
    repeats: int,
) -> tuple[float, dict[SettingKey, tuple[float, float]]]:
    """Milliseconds per batch of the HF SDPA baseline, and per setting ``(method, tau, scale)`` its milliseconds
    per batch and its speedup over the baseline (median over rounds of the within-round ratio)."""
    device = torch.device(device)
    subset: Encoded = {key: value[:examples] for key, value in encoded.items()}
    inputs = [
        {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")}
        for batch in batches(subset, batch_size, sort_by_length=True)
    ]
    baseline = hf_baseline(dense_model)
    runners: list[Callable[[dict[str, torch.Tensor]], object]] = [lambda b: baseline(**b)]
    keys = list(keys)
    for method, tau, scale in keys:
        runner = dense_model if method == "dense" else model
        knobs = {
            "tau": 0.0 if tau is None else tau,
            "threshold_scale": 1.0 if scale is None else scale,
            "prune": scale is not None,
            "early_exit": tau is not None,
            "backend": backend_for(device),
        }
        runners.append(lambda b, r=runner, k=knobs: r(**b, **k))
    times = interleaved_timings(runners, inputs, device, repeats)
    hf_times = times[0]
    timings = {
        key: (statistics.median(row), statistics.median(h / t for h, t in zip(hf_times, row, strict=True)))
        for key, row in zip(keys, times[1:], strict=True)
    }
    return statistics.median(hf_times), timings


def evaluate(
    dense_model: MagicPyramidForSequenceClassification,
    model: MagicPyramidForSequenceClassification,
    encoded: Encoded,
    *,
    dataset: str,
    split: str,
    methods: Sequence[str] = METHODS,
    taus: Sequence[float] = DEFAULT_TAUS,
    scales: Sequence[float] = DEFAULT_SCALES,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    latency: Iterable[SettingKey] | str | None = None,
    latency_examples: int = 256,
    latency_repeats: int = 3,
) -> list[dict[str, Any]]:
    """One record per ``(method, tau, threshold_scale)`` of the sweep over ``encoded`` (see the module docstring).

    ``dense_model`` is the stage-1 model, ``model`` the final one. ``latency`` names the settings to time
    (``"all"``, an iterable of ``(method, tau, scale)`` keys, or None for none); untimed records carry None.
    Record keys: ``dataset, split, method, tau, threshold_scale, accuracy, gflops, dense_gflops,
    flops_speedup, latency_ms, hf_latency_ms, latency_speedup, device, examples, mean_exit_layer, kept_ratio,
    buckets`` (``{bucket: {examples, accuracy, gflops, dense_gflops, flops_speedup}}``).
    """
    device = check_device(device)
    for tau in taus:
        check_float("tau", tau, 0.0, 1.0)
    for scale in scales:
        check_float("threshold_scale", scale, 0.0)
    check_int("batch_size", batch_size)
    check_int("latency_examples", latency_examples)
    check_int("latency_repeats", latency_repeats)
    sweep = settings(methods, taus, scales)
    passes: dict[tuple[str, float | None], Collected] = {}

    def pass_for(method: str, scale: float | None) -> Collected:
        key = ("dense" if method == "dense" else "final", scale)
        if key not in passes:
            runner = dense_model if method == "dense" else model
            passes[key] = collect(
                runner,
                encoded,
                batch_size=batch_size,
                device=device,
                prune=scale is not None,
                threshold_scale=1.0 if scale is None else scale,
            )
        return passes[key]

    records = []
    for method, tau, scale in sweep:
        summary = summarize(pass_for(method, scale), tau=tau, early_exit=tau is not None)
        records.append(
            {
                "dataset": dataset,
                "split": split,
                "method": method,
                "tau": tau,
                "threshold_scale": scale,
                **summary,
                "flops_speedup": summary["dense_gflops"] / summary["gflops"],
                "latency_ms": None,
                "hf_latency_ms": None,
                "latency_speedup": None,
                "device": str(device),
            }
        )
    if latency is not None:
        keys = [(r["method"], r["tau"], r["threshold_scale"]) for r in records]
        wanted = keys if latency == "all" else [k for k in keys if k in set(latency)]
        if wanted:
            hf_ms, timings = measure_latency(
                dense_model,
                model,
                encoded,
                wanted,
                batch_size=batch_size,
                device=device,
                examples=latency_examples,
                repeats=latency_repeats,
            )
            for record, key in zip(records, keys, strict=True):
                if key in timings:
                    record["latency_ms"], record["latency_speedup"] = timings[key]
                    record["hf_latency_ms"] = hf_ms
    return records


def setting_key(record: dict[str, Any]) -> SettingKey:
    """``(method, tau, threshold_scale)`` of a record."""
    return record["method"], record["tau"], record["threshold_scale"]


def table_settings(chosen: Sequence[dict[str, Any]], taus: Sequence[float]) -> list[SettingKey]:
    """The settings the README tables show: the ``chosen`` (selected) ones, FastBERT-only at every tau, and MP at
    every tau at its chosen threshold scale (the paper's Table 3), without repeats."""
    keys = [setting_key(r) for r in chosen]
    keys += [("fastbert", float(t), None) for t in taus]
    keys += [("mp", float(t), r["threshold_scale"]) for r in chosen if r["method"] == "mp" for t in taus]
    return list(dict.fromkeys(keys))


def select(records: Sequence[dict[str, Any]], max_drop: float = 0.01) -> list[dict[str, Any]]:
    """Per dataset and method, the record with the fewest GFLOPs within ``max_drop`` accuracy of dense.

    ``records`` come from one split; each dataset needs its ``dense`` record. Ties go to the more accurate
    setting. A method with no setting within the limit contributes its most accurate record (check
    ``accuracy`` against dense's). Returned in the order of ``METHODS``.
    """
    check_float("max_drop", max_drop, 0.0)
    chosen = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        dense = [r for r in rows if r["method"] == "dense"]
        if not dense:
            raise ValueError(f"{dataset}: select needs the dense record")
        floor = dense[0]["accuracy"] - max_drop - 1e-12
        for method in METHODS:
            candidates = [r for r in rows if r["method"] == method]
            if not candidates:
                continue
            eligible = [r for r in candidates if r["accuracy"] >= floor]
            if eligible:
                chosen.append(min(eligible, key=lambda r: (r["gflops"], -r["accuracy"])))
            else:
                chosen.append(max(candidates, key=lambda r: (r["accuracy"], -r["gflops"])))
    return chosen


@torch.inference_mode()
def predict(
    model: MagicPyramidForSequenceClassification,
    tokenizer: Any,
    texts: Sequence[InputText],
    *,
    max_length: int | None = None,
    batch_size: int = 32,
    tau: float = 0.3,
    threshold_scale: float = 1.0,
    prune: bool = True,
    early_exit: bool = True,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """Label ``texts`` (from ``mp_model.data.read_texts``) with the packed path: one row per text, in order.

    Each row holds ``index`` and ``line`` (the record's place in its file), ``text`` (and ``text_pair`` if any
    text has one), ``label`` (the model's name for it), ``label_id``, ``confidence`` (its softmax probability),
    ``exit_layer`` and ``gflops``. ``max_length`` (tokens after truncation) defaults to the model's
    ``max_position_embeddings``. An empty text (``InputText.empty``) is not classified: its label fields are
    ``None``. Pairs are encoded as BERT pairs (segment ids 0 and 1), which needs ``type_vocab_size >= 2``.

    Raises:
        ValueError: before computing, for a knob out of range (``tau`` in [0, 1], ``threshold_scale`` >= 0,
            ``batch_size`` >= 1, ``max_length`` between the special tokens and the model's position embeddings),
            a missing device, or pairs for a model without a second segment; after, if the model gives a
            non-finite logit (naming the records), rather than a label that means nothing.
    """
    tau = check_float("tau", tau, 0.0, 1.0)
    threshold_scale = check_float("threshold_scale", threshold_scale, 0.0)
    check_int("batch_size", batch_size)
    device = check_device(device)
    pairs = any(text.text_pair is not None for text in texts)
    limit = model.config.max_position_embeddings
    max_length = check_max_length(limit if max_length is None else max_length, tokenizer, pairs=pairs, limit=limit)
    if pairs and getattr(model.config, "type_vocab_size", 2) < 2:
        raise ValueError("the texts hold pairs but the model has a single segment type (type_vocab_size 1)")
    model.eval().to(device)
    rows: list[dict[str, Any]] = []
    for text in texts:
        row: dict[str, Any] = {"index": text.index, "line": text.line, "text": text.text}
        if pairs:
            row["text_pair"] = text.text_pair
        rows.append(row | dict.fromkeys(("label", "label_id", "confidence", "exit_layer", "gflops")))
    todo = [position for position, text in enumerate(texts) if not text.empty]
    examples = [TextExample(texts[p].text, 0, texts[p].text_pair) for p in todo]
    encoded = encode(tokenizer, examples, max_length)
    broken: list[str] = []
    for batch in batches(encoded, batch_size, sort_by_length=True):
        out = model(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["token_type_ids"].to(device),
            tau=tau,
            threshold_scale=threshold_scale,
            prune=prune,
            early_exit=early_exit,
            backend=backend_for(device),
        )
        logits = out.logits.float().cpu()
        probabilities = logits.softmax(dim=-1)
        for row, index in enumerate(batch["index"].tolist()):
            text = texts[todo[index]]
            if not bool(torch.isfinite(logits[row]).all()):
                broken.append(f"line {text.line}" if text.line is not None else f"record {text.index + 1}")
                continue
            label_id = int(probabilities[row].argmax())
            rows[todo[index]] |= {
                "label": model.config.id2label.get(label_id, str(label_id)),
                "label_id": label_id,
                "confidence": round(float(probabilities[row, label_id]), 6),
                "exit_layer": int(out.exit_layer[row]),
                "gflops": float(out.flops[row]) / 1e9,
            }
    if broken:
        raise ValueError(f"the model gave non-finite logits for {len(broken)} text(s) ({', '.join(broken[:5])})")
    return rows
