"""Figures from results JSON: speedup per length bucket, accuracy against GFLOPs, measured against FLOPs speedup.

Inputs are files written by ``bench.e2e`` (``provenance.benchmark == "e2e"``) and by ``mp eval --json``
(records with ``dataset``, ``method``, ``tau``, ``threshold_scale``, ``accuracy``, ``gflops``, ``flops_speedup``,
``latency_speedup`` and per-bucket ``buckets``). Figures (PNG, matplotlib's Agg backend):

* ``bucket_speedup.png``: the paper's Figure 1: speedup of LTP-only, FastBERT-only and MP per length bucket
  (short 1-35, middle 36-70, long > 70 tokens). One panel of FLOPs speedup over dense per evaluation file (its
  selected settings; without one, the e2e FLOPs), then one panel per e2e batch size of measured latency speedup
  over HF BERT (sdpa).
* ``pareto.png``: accuracy against GFLOPs per example of every evaluated setting, one panel per dataset, with
  each method's Pareto front (no other setting of the method is both cheaper and more accurate).
* ``measured_vs_flops.png``: measured latency speedup over HF sdpa against FLOPs speedup for every e2e cell of
  the packed methods; points under the diagonal lose time to overheads, points above gain from padding saved.

``mp quickstart`` draws the figures of its evaluation; ``python -m bench.plots FILE... --out DIR`` those of any
results files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BUCKETS = ("short", "middle", "long")
BUCKET_LABELS = {"short": "short\n(1-35)", "middle": "middle\n(36-70)", "long": "long\n(>70)"}
SPEEDUP_METHODS = ("ltp", "fastbert", "mp")
METHOD_LABELS = {"dense": "dense", "ltp": "LTP only", "fastbert": "FastBERT only", "mp": "Magic Pyramid"}
COLORS = {"dense": "#7f7f7f", "ltp": "#1f77b4", "fastbert": "#ff7f0e", "mp": "#2ca02c"}
# Pareto fronts: distinct markers and line styles, so that fronts that coincide stay visible.
FRONT_STYLES = {"ltp": ("s", "--", 7), "fastbert": ("^", ":", 7), "mp": ("o", "-", 4)}
BUCKET_LETTERS = {"short": "S", "middle": "M", "long": "L", "mixed": "X"}
MARKERS = {1: "o", 8: "s", 32: "^", 64: "D"}
OTHER_MARKER = "P"


def load(path: str | Path) -> dict[str, Any]:
    """A results file: ``{"provenance": {...}, "records": [...]}``."""
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, dict) or "records" not in payload:
        raise ValueError(f"{path} is not a results file (no 'records')")
    return payload


def is_e2e(payload: dict[str, Any]) -> bool:
    """Whether ``payload`` was written by ``bench.e2e``."""
    return payload.get("provenance", {}).get("benchmark") == "e2e"


def is_eval(payload: dict[str, Any]) -> bool:
    """Whether ``payload`` holds evaluation records (``mp eval --json``)."""
    records = payload["records"]
    return bool(records) and all("accuracy" in r and "dataset" in r for r in records)


def selected_records(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, the record marked ``selected`` or, without marks, the one with most FLOPs speedup."""
    chosen: dict[str, dict[str, Any]] = {}
    for record in records:
        method = record["method"]
        if record.get("selected"):
            chosen[method] = record
    if chosen:
        return chosen
    for record in records:
        method = record["method"]
        if method not in chosen or record["flops_speedup"] > chosen[method]["flops_speedup"]:
            chosen[method] = record
    return chosen


def _bars(axis: Any, values: dict[str, dict[str, float]], title: str, ylabel: str) -> None:
    """Grouped bars: one group per bucket, one bar per method of ``values[method][bucket]``."""
    methods = [m for m in SPEEDUP_METHODS if m in values]
    width = 0.8 / max(1, len(methods))
    for index, method in enumerate(methods):
        xs, ys = [], []
        for position, bucket in enumerate(BUCKETS):
            if bucket in values[method]:
                xs.append(position + (index - (len(methods) - 1) / 2) * width)
                ys.append(values[method][bucket])
        bars = axis.bar(xs, ys, width, label=METHOD_LABELS[method], color=COLORS[method])
        axis.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axis.set_xticks(range(len(BUCKETS)), [BUCKET_LABELS[b] for b in BUCKETS])
    axis.set_title(title, fontsize=10)
    axis.set_ylabel(ylabel)
    axis.margins(y=0.15)


def plot_bucket_speedup(
    e2e: dict[str, Any] | None,
    evaluations: Sequence[dict[str, Any]],
    path: Path,
    model: str | None = None,
) -> Path:
    """Figure 1: FLOPs and measured speedup per length bucket (see the module docstring); returns ``path``.

    One FLOPs panel per evaluation file (its selected settings), then the e2e panels.
    """
    panels: list[tuple[dict[str, dict[str, float]], str, str]] = []
    for evaluation in evaluations:
        chosen = selected_records(evaluation["records"])
        flops = {m: {b: v["flops_speedup"] for b, v in r["buckets"].items()} for m, r in chosen.items()}
        dataset = next(iter(chosen.values()))["dataset"]
        panels.append((flops, f"FLOPs speedup over dense\n{dataset}, selected settings", "speedup (x)"))
    records: list[dict[str, Any]] = []
    if e2e is not None:
        records = [r for r in e2e["records"] if r["bucket"] in BUCKETS]
        model = model or (records[0]["model"] if records else None)
        records = [r for r in records if r["model"] == model]
        if not evaluations and records:
            flops: dict[str, dict[str, float]] = {}
            largest: dict[tuple[str, str], int] = {}
            for r in records:
                key = (r["method"], r["bucket"])
                if r["batch_size"] >= largest.get(key, 0):
                    largest[key] = r["batch_size"]
                    flops.setdefault(r["method"], {})[r["bucket"]] = r["flops_speedup"]
            title = f"FLOPs speedup over dense\n{model}, e2e inputs of the largest batch"
            panels.append((flops, title, "speedup (x)"))
        device = e2e["provenance"].get("device_type", "")
        for batch_size in sorted({r["batch_size"] for r in records}):
            latency: dict[str, dict[str, float]] = {}
            for r in records:
                if r["batch_size"] == batch_size and r.get("latency_speedup") is not None:
                    latency.setdefault(r["method"], {})[r["bucket"]] = r["latency_speedup"]
            if latency:
                title = f"measured speedup over HF sdpa\n{model}, batch {batch_size}, {device}"
                panels.append((latency, title, "speedup (x)"))
    if not panels:
        raise ValueError("bucket speedups need an e2e or an evaluation results file")
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (values, title, ylabel) in zip(axes[0], panels, strict=True):
        _bars(axis, values, title, ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    figure.suptitle("Speedup per input length (paper's Figure 1)", fontsize=11)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(figure, path)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The ``(gflops, accuracy)`` points that no other point beats on both (fewer GFLOPs, higher accuracy)."""
    front: list[tuple[float, float]] = []
    for gflops, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or accuracy > front[-1][1]:
            front.append((gflops, accuracy))
    return front


def plot_pareto(evaluation: dict[str, Any], path: Path) -> Path:
    """Accuracy against GFLOPs per example, one panel per dataset; returns ``path``."""
    records = evaluation["records"]
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        rows = [r for r in records if r["dataset"] == dataset]
        for method in ("ltp", "fastbert", "mp"):
            points = [(r["gflops"], 100 * r["accuracy"]) for r in rows if r["method"] == method]
            if not points:
                continue
            axis.scatter(*zip(*points, strict=True), s=14, alpha=0.45, color=COLORS[method])
            marker, style, size = FRONT_STYLES[method]
            front = pareto_front(points)
            axis.plot(
                *zip(*front, strict=True),
                marker=marker,
                markersize=size,
                linestyle=style,
                color=COLORS[method],
                label=METHOD_LABELS[method],
            )
        for r in rows:
            if r["method"] == "dense":
                axis.scatter(
                    [r["gflops"]],
                    [100 * r["accuracy"]],
                    marker="*",
                    s=160,
                    color=COLORS["dense"],
                    label="dense",
                    zorder=3,
                )
        axis.set_xlabel("GFLOPs per example")
        axis.set_ylabel("accuracy (%)")
        split = rows[0].get("split", "")
        axis.set_title(f"{dataset} ({split}): accuracy against GFLOPs", fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def plot_measured_vs_flops(e2e: dict[str, Any], path: Path) -> Path:
    """Measured latency speedup against FLOPs speedup of every packed e2e cell; returns ``path``."""
    records = [r for r in e2e["records"] if r["method"] in COLORS and r.get("latency_speedup") is not None]
    if not records:
        raise ValueError("no e2e records with a latency speedup")
    models = list(dict.fromkeys(r["model"] for r in records))
    figure, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.4), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        rows = [r for r in records if r["model"] == model]
        for r in rows:
            axis.scatter(
                r["flops_speedup"],
                r["latency_speedup"],
                color=COLORS[r["method"]],
                marker=MARKERS.get(r["batch_size"], OTHER_MARKER),
                s=36,
                alpha=0.8,
                edgecolors="black",
                linewidths=0.4,
            )
            axis.annotate(
                BUCKET_LETTERS.get(r["bucket"], "?"),
                (r["flops_speedup"], r["latency_speedup"]),
                xytext=(3, 3),
                textcoords="offset points",
                fontsize=6,
            )
        top = max(max(r["flops_speedup"], r["latency_speedup"]) for r in rows) * 1.1
        axis.plot([0, top], [0, top], color="black", linewidth=0.8, linestyle="--", label="measured = FLOPs")
        axis.set_xlim(0, top)
        axis.set_ylim(0, top)
        axis.set_xlabel("FLOPs speedup (dense unpadded / ours)")
        axis.set_ylabel("measured speedup over HF sdpa")
        device = e2e["provenance"].get("device", "")
        axis.set_title(
            f"measured vs FLOPs speedup: {model}, {device}\nS, M, L, X: short, middle, long, mixed", fontsize=9
        )
        axis.grid(alpha=0.3)
        for method in dict.fromkeys(r["method"] for r in rows):
            axis.scatter([], [], color=COLORS[method], label=METHOD_LABELS[method])
        for batch_size in sorted({r["batch_size"] for r in rows}):
            axis.scatter(
                [],
                [],
                color="white",
                edgecolors="black",
                marker=MARKERS.get(batch_size, OTHER_MARKER),
                label=f"batch {batch_size}",
            )
        axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def make_plots(paths: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """Every figure the given results files allow, written to ``out_dir``; returns the PNG paths.

    Every evaluation file is used (one dataset each); of the e2e files, the first.
    """
    payloads = [load(path) for path in paths]
    e2e = next((p for p in payloads if is_e2e(p)), None)
    evaluations = [p for p in payloads if not is_e2e(p) and is_eval(p)]
    out_dir = Path(out_dir)
    written = []
    if e2e is not None or evaluations:
        written.append(plot_bucket_speedup(e2e, evaluations, out_dir / "bucket_speedup.png"))
    if evaluations:
        merged = {"records": [r for p in evaluations for r in p["records"]]}
        written.append(plot_pareto(merged, out_dir / "pareto.png"))
    if e2e is not None:
        written.append(plot_measured_vs_flops(e2e, out_dir / "measured_vs_flops.png"))
    return written
