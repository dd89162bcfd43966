"""Schedules of ``bench.e2e``: per-layer kept-token shares and exit-layer distributions, replayed on models not
trained to produce them, and the calibration of pruning thresholds that replays them.

A schedule is defined on relative depth and resampled to a model's layer count (``Schedule.resampled``). It comes
from ``--schedule`` (a JSON file or a run directory, see ``read_schedule``), from the trained ``--model``
(``measure_schedule``), else ``DEFAULT_SCHEDULE``. To replay it, ``calibrate_thresholds`` sets each layer's
pruning threshold on one small calibration batch, once per model, so that the layer keeps the target share of
the batch's tokens; exits are drawn per example from the distribution and passed as ``exit_schedule``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from bench.e2e_inputs import build_pools, cell_batches
from bench.e2e_models import engine_knobs, load_model, resolve_model_dir
from mp_model.modeling import MagicPyramidForSequenceClassification


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
    packed = engine_knobs(model, "packed")

    for layer, ratio in enumerate(kept_ratio):
        if ratio >= 1.0:
            continue
        stop_after = torch.full((rows,), layer + 1, dtype=torch.int64, device=mask.device)

        def kept(threshold: float, layer: int = layer, stop_after: torch.Tensor = stop_after) -> int:
            nonlocal trials
            trials += 1
            model.set_thresholds(thresholds[:layer] + [threshold] + [0.0] * (layers - layer - 1))
            out = model(**batch, prune=True, early_exit=True, exit_schedule=stop_after, backend=backend, **packed)
            return int(out.kept_tokens[:, layer].sum())

        thresholds[layer] = guess = find_threshold(kept, max(ratio * total, rows), slack, guess, steps)

    model.set_thresholds(thresholds)
    out = model(**batch, prune=True, early_exit=False, backend=backend, **packed)
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
        knobs |= {"tau": tau, "threshold_scale": threshold_scale, "backend": backend, **engine_knobs(model, "packed")}
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
