"""``mp quickstart``: train and evaluate Magic Pyramid end to end in a few minutes, with a table, JSON and figures.

Steps, on the embedded all-MiniLM-L6-v2 and rotten_tomatoes unless told otherwise:

1. Train (``mp_model.recipe.training``): the four stages (fine-tune, soft pruning, hard pruning, sub-classifiers)
   on a subset, with a single pruning candidate (``delta_L``, ``lambda``) instead of a search. The run directory is
   ``<out>/run-<dataset>-<hash of the training settings>``; a rerun with the same settings finds it finished and
   skips training (an interrupted one resumes).
2. Evaluate (``mp_model.recipe.selection.select_and_report``, as ``mp eval``): a small sweep of ``tau`` and
   threshold scales; per method (dense, LTP only, FastBERT only, MP) the setting with the fewest GFLOPs within 1
   point of dense accuracy is selected on dev and reported on test, with its latency measured in rounds that
   alternate HF BERT (sdpa) with each setting, on padded batches sorted by length.
3. Plot (``mp_model.recipe.plots``) and write ``eval.json``, ``quickstart.json`` and the PNG figures to ``--out``
   (default ``mp_results/``), and print the summary table.

The end-to-end benchmark over length buckets and batch sizes is not part of it: ``python -m bench.e2e --model
RUN_DIR`` runs it on the trained model (the summary says so).

Sizes (``SIZES``): ``--size small`` (default; under 10 minutes on 2 CPU cores) or ``full`` (the whole training
split after a 2 x 2 pruning search, the whole test split and ``mp eval``'s default sweep: hours on a CPU);
``--train-examples``, ``--epochs`` and ``--eval-examples`` override parts of a size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

from mp_model.recipe import plots
from mp_model.recipe.datasets import load_dataset
from mp_model.recipe.evaluation import DEFAULT_SCALES, DEFAULT_TAUS, METHODS
from mp_model.recipe.provenance import provenance, write_results
from mp_model.recipe.runs import finished_run_problem, load_run
from mp_model.recipe.selection import fallback_note, select_and_report
from mp_model.recipe.train_config import TrainConfig, default_model_path
from mp_model.recipe.training import train


@dataclass(frozen=True)
class Size:
    """The knobs of one quickstart size."""

    train_examples: int | None
    exit_examples: int | None
    dev_examples: int
    eval_examples: int | None
    epochs: tuple[float, float, float, float]
    exit_scales: tuple[float | None, ...]
    final_thresholds: tuple[float, ...]
    lambdas: tuple[float, ...]
    search_epochs: float
    taus: tuple[float, ...]
    scales: tuple[float, ...]
    latency_examples: int


SIZES = {
    "small": Size(
        train_examples=2000,
        exit_examples=4000,
        dev_examples=300,
        eval_examples=400,
        epochs=(3.0, 1.0, 1.0, 20.0),
        exit_scales=(1.0,),  # one cached pass: the default's three add two passes over 4,000 examples
        final_thresholds=(0.6,),
        lambdas=(0.1,),
        search_epochs=0.1,
        taus=(0.3, 0.6, 0.9),
        scales=(0.75, 1.0, 1.5),
        latency_examples=128,
    ),
    "full": Size(
        train_examples=None,
        exit_examples=None,
        dev_examples=500,
        eval_examples=None,
        epochs=(3.0, 1.0, 1.0, 20.0),
        exit_scales=TrainConfig.exit_scales,
        final_thresholds=(0.6, 1.2),
        lambdas=(0.02, 0.1),
        search_epochs=0.25,
        taus=DEFAULT_TAUS,
        scales=DEFAULT_SCALES,
        latency_examples=256,
    ),
}
MAX_DROP = 0.01
LEARNING_RATE = 4e-5
BATCH_SIZE = 32
LATENCY_REPEATS = 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="mp quickstart",
        description="Train and evaluate Magic Pyramid end to end: a short run on the embedded MiniLM and "
        "rotten_tomatoes by default; results and figures go to --out.",
        epilog="Steps and sizes: see mp_model/recipe/quickstart.py and bench/README.md.",
    )
    parser.add_argument("--model", default=None, help="BERT-architecture folder (default: embedded all-MiniLM-L6-v2)")
    parser.add_argument("--dataset", default="rotten_tomatoes", help="rotten_tomatoes, bbc_news or a CSV/TSV/JSONL")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=tuple(SIZES), default="small", help="preset of every size knob")
    parser.add_argument("--train-examples", type=int, default=None, help="training examples (first N)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs of each training stage")
    parser.add_argument("--eval-examples", type=int, default=None, help="test (and dev selection) examples")
    parser.add_argument("--max-length", type=int, default=128, help="training and evaluation truncation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="mp_results", help="results folder (run directory inside)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: inside --out, named by settings)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a busy machine several threads mostly wait for each other, which "
        "can make training ten times slower; 0: torch's choice)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def train_config(args: argparse.Namespace, size: Size) -> TrainConfig:
    """The ``TrainConfig`` of the chosen size and overrides; the run directory is named by its settings.

    ``--eval-examples`` also caps the dev examples that training evaluates on.
    """
    eval_examples = args.eval_examples
    epochs = (args.epochs,) * 4 if args.epochs is not None else size.epochs
    config = TrainConfig(
        model=args.model or default_model_path(),
        dataset=args.dataset,
        seed=args.seed,
        device=args.device,
        max_length=args.max_length,
        train_size=args.train_examples if args.train_examples is not None else size.train_examples,
        exit_train_size=size.exit_examples,
        dev_size=size.dev_examples if eval_examples is None else min(size.dev_examples, eval_examples),
        lr=LEARNING_RATE,
        epochs_finetune=epochs[0],
        epochs_soft=epochs[1],
        epochs_hard=epochs[2],
        epochs_exits=epochs[3],
        exit_scales=size.exit_scales,
        final_thresholds=size.final_thresholds,
        lambdas=size.lambdas,
        search_epochs_soft=size.search_epochs,
        search_epochs_hard=size.search_epochs,
    )
    if args.run_dir:
        config.run_dir = args.run_dir
    else:
        settings = {k: v for k, v in config.to_dict().items() if k not in ("device", "run_dir")}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        config.run_dir = str(Path(args.out) / f"run-{Path(args.dataset).stem}-{digest}")
    return config


def run_evaluation(config: TrainConfig, size: Size, eval_examples: int | None, out: Path) -> list[dict[str, Any]]:
    """Select each method's setting on dev, report every setting on test (``select_and_report``); writes
    ``eval.json``."""
    dense, final, tokenizer, _saved = load_run(config.directory, config.device)
    records, selection = select_and_report(
        dense,
        final,
        tokenizer,
        load_dataset(config.dataset, seed=config.seed, dev_from_train=config.dev_from_train),
        max_length=config.max_length,
        size=eval_examples,
        max_drop=MAX_DROP,
        taus=size.taus,
        scales=size.scales,
        batch_size=BATCH_SIZE,
        device=config.device,
        latency="selected",
        latency_examples=size.latency_examples,
        latency_repeats=LATENCY_REPEATS,
    )
    meta = provenance(config.device) | {
        "benchmark": "quickstart-eval",
        "run_dir": str(config.directory),
        "train_config": config.to_dict(),
        "selection": f"per method, fewest GFLOPs within {MAX_DROP} accuracy of dense on dev, {selection['rule']} "
        f"{selection['confidence']}",
        "selection_details": selection,
        "latency": f"ms per padded batch of {BATCH_SIZE} (sorted by length) vs HF BertForSequenceClassification (sdpa)",
        "latency_examples": size.latency_examples,
        "batch_size": BATCH_SIZE,
        "max_length": config.max_length,
    }
    write_results(out / "eval.json", records, meta)
    return records


SUMMARY_KEYS = (
    "method",
    "tau",
    "threshold_scale",
    "accuracy",
    "dev_accuracy",
    "gflops",
    "dense_gflops",
    "flops_speedup",
    "latency_ms",
    "hf_latency_ms",
    "latency_speedup",
    "mean_exit_layer",
    "kept_ratio",
    "met_rule",
    "buckets",
)


def summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: its selected setting's test numbers."""
    rows = []
    for method in METHODS:
        record = next(r for r in records if r["method"] == method and r["selected"])
        rows.append({key: record.get(key) for key in SUMMARY_KEYS})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The printed summary: accuracy, GFLOPs and speedups of each method's selected setting."""
    lines = [f"{'method':9} {'tau':>5} {'scale':>5} {'accuracy':>8} {'GFLOPs':>8} {'x FLOPs':>7} {'x latency':>9}"]
    for row in rows:
        tau = "-" if row["tau"] is None else f"{row['tau']:g}"
        scale = "-" if row["threshold_scale"] is None else f"{row['threshold_scale']:g}"
        latency = "-" if row["latency_speedup"] is None else f"{row['latency_speedup']:.2f}"
        lines.append(
            f"{row['method']:9} {tau:>5} {scale:>5} {100 * row['accuracy']:8.2f} {row['gflops']:8.3f} "
            f"{row['flops_speedup']:7.2f} {latency:>9}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the quickstart (see the module docstring); returns the exit code."""
    args = parse_args(argv)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = train_config(args, size)
    eval_examples = args.eval_examples if args.eval_examples is not None else size.eval_examples
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    print(f"[1/3] training {Path(config.model).name} on {config.dataset} in {config.directory}")
    if finished_run_problem(config.directory) is None:
        print("      the run is complete: reusing it")
    else:
        train(config, progress=not args.no_progress)
    seconds["train"] = time.perf_counter() - start

    print(f"[2/3] evaluating on the test split (up to {eval_examples or 'all'} examples)")
    records = run_evaluation(config, size, eval_examples, out)
    seconds["evaluate"] = time.perf_counter() - start - sum(seconds.values())

    print("[3/3] plots")
    figures = plots.make_plots([out / "eval.json"], out)
    seconds["plots"] = time.perf_counter() - start - sum(seconds.values())

    rows = summary(records)
    meta = provenance(config.device) | {
        "benchmark": "quickstart",
        "size": args.size,
        "run_dir": str(config.directory),
        "train_config": config.to_dict(),
        "seconds": seconds,
        "files": [str(p) for p in (out / "eval.json", *figures)],
    }
    path = write_results(out / "quickstart.json", rows, meta)
    test_examples = records[0]["examples"]
    print(f"\n{config.dataset} test ({test_examples} examples), settings selected on dev within {MAX_DROP:g} of dense:")
    print(f"x latency: HF sdpa time / ours, padded batches of {BATCH_SIZE} sorted by length")
    print(format_table(rows))
    note = fallback_note(rows, "dev")
    if note is not None:
        print(note)
    print(f"\nwrote {path}, {out / 'eval.json'} and {', '.join(p.name for p in figures)} in {out}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f", total {sum(seconds.values()):.0f} s")
    print(
        f"end-to-end benchmark over length buckets and batch sizes (not run here): "
        f"python -m bench.e2e --model {config.directory} --out {out / 'e2e.json'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
