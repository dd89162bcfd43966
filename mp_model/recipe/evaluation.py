"""Accuracy, GFLOPs and latency of dense BERT, LTP, FastBERT and Magic Pyramid over sweeps of tau and scale.

Methods (one set of trained weights from ``mp_model.recipe.training``, plus its stage-1 model):

- ``dense``: the stage-1 (fine-tuned, never pruned) model, pruning and exit off.
- ``ltp``: the final model, pruning on at each ``threshold_scale``, exit off.
- ``fastbert``: the final model, pruning off, exit on at each ``tau``.
- ``mp``: the final model, both, over the grid.

Accuracy and FLOPs. For each model and threshold scale the packed path runs once with early exit off, returning
every sub-classifier's logits on the mean of each example's remaining tokens (``return_exit_logits``), and
``mp_kernels.entropy_exit`` gives their uncertainty. Whether an example exits at a layer
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

Selecting a setting per method on one split and reporting it on another belongs to ``mp_model.recipe.selection``;
``evaluate(keep_outcomes=True)`` gives it every example's correctness and FLOPs.

Checks. ``check_device`` refuses an unknown device or CUDA on a machine without it; ``collect`` refuses labels the
model does not have and sequences longer than its position embeddings; ``evaluate``
refuses knobs out of range (a NaN included) before computing anything.

Length buckets (``short`` 1-35, ``middle`` 36-70, ``long`` > 70 tokens, special tokens included, as
``mp_model.recipe.data.length_bucket``) report accuracy, GFLOPs and FLOPs speedup over dense per bucket.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mp_kernels import entropy_exit
from mp_model.flops import dense_flops, flops_from_outputs
from mp_model.hf_twin import hf_twin
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.outputs import MagicPyramidOutput
from mp_model.recipe.checks import check_device, check_float, check_int
from mp_model.recipe.data import LENGTH_BUCKETS, Encoded, batches, length_bucket
from mp_model.recipe.timing import interleaved_timings

METHODS = ("dense", "ltp", "fastbert", "mp")
DEFAULT_TAUS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)

SettingKey = tuple[str, float | None, float | None]


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


def run_batch(
    model: MagicPyramidForSequenceClassification, batch: dict[str, Any], device: torch.device, **knobs: Any
) -> MagicPyramidOutput:
    """``model``'s packed pass over one padded batch of ``batches`` on ``device``, with ``backend_for(device)``."""
    inputs = (batch[key].to(device) for key in ("input_ids", "attention_mask", "token_type_ids"))
    return model(*inputs, backend=backend_for(device), **knobs)


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
    for batch in batches(encoded, batch_size, sort_by_length=True):
        out = run_batch(
            model,
            batch,
            device,
            threshold_scale=threshold_scale,
            prune=prune,
            early_exit=False,
            return_exit_logits=True,
        )
        rows = batch["index"]
        logits[rows] = out.logits.float().cpu()
        kept[rows] = out.kept_tokens.cpu()
        exit_logits[rows] = out.exit_logits.float().cpu()
    return Collected(
        lengths=lengths,
        labels=torch.tensor(encoded["labels"], dtype=torch.int64),
        logits=logits,
        exit_logits=exit_logits,
        uncertainty=exit_uncertainty(exit_logits),
        kept_tokens=kept,
        config=config,
        prune=prune,
        threshold_scale=threshold_scale,
    )


def exit_uncertainty(exit_logits: torch.Tensor) -> torch.Tensor:
    """``(N, L - 1)`` float32 normalised entropy (``mp_kernels.entropy_exit``) of ``(N, L - 1, C)`` logits."""
    count, heads = exit_logits.shape[:2]
    if not heads:
        return torch.zeros(count, 0)
    return torch.stack(
        [entropy_exit(exit_logits[:, layer].contiguous(), 0.0, backend="torch")[1] for layer in range(heads)], dim=1
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


def summarize(collected: Collected, *, tau: float | None, early_exit: bool, outcome: bool = False) -> dict[str, Any]:
    """Accuracy, mean GFLOPs, mean exit layer, kept-token ratio and per-bucket numbers of one setting.

    ``kept_ratio`` is the feed-forward token-layers executed over the dense model's (``L * n`` per example),
    averaged over examples: it falls with both pruning and exiting. With ``outcome``, also ``outcome``:
    ``{"correct": (N,) bool, "flops": (N,) float64}`` per example.
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
    summary = {
        "examples": int(collected.lengths.numel()),
        "accuracy": float(correct.mean()),
        "gflops": float(flops.double().mean()) / 1e9,
        "dense_gflops": float(dense.mean()) / 1e9,
        "mean_exit_layer": float(exit_layer.double().mean()),
        "kept_ratio": float(token_layers.mean()),
        "buckets": buckets,
    }
    if outcome:
        summary["outcome"] = {"correct": correct.bool(), "flops": flops.double()}
    return summary


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
    baseline = hf_twin(dense_model, "sdpa")
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


def setting_record(
    collected: Collected, key: SettingKey, dataset: str, split: str, device: str, outcome: bool = False
) -> dict[str, Any]:
    """``evaluate``'s record of the setting ``key`` = ``(method, tau, threshold_scale)`` from its pass (untimed)."""
    method, tau, scale = key
    summary = summarize(collected, tau=tau, early_exit=tau is not None, outcome=outcome)
    return {
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
        "device": device,
    }


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
    keep_outcomes: bool = False,
) -> list[dict[str, Any]]:
    """One record per ``(method, tau, threshold_scale)`` of the sweep over ``encoded`` (see the module docstring).

    ``dense_model`` is the stage-1 model, ``model`` the final one. ``latency`` names the settings to time
    (``"all"``, an iterable of ``(method, tau, scale)`` keys, or None for none); untimed records carry None.
    Record keys: ``dataset, split, method, tau, threshold_scale, accuracy, gflops, dense_gflops,
    flops_speedup, latency_ms, hf_latency_ms, latency_speedup, device, examples, mean_exit_layer, kept_ratio,
    buckets`` (``{bucket: {examples, accuracy, gflops, dense_gflops, flops_speedup}}``); with ``keep_outcomes``
    also ``outcome`` (``{"correct": (N,) bool, "flops": (N,) float64}`` tensors, in ``encoded``'s order).
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

    records = [
        setting_record(pass_for(method, scale), (method, tau, scale), dataset, split, str(device), keep_outcomes)
        for method, tau, scale in sweep
    ]
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
