"""``mp quickstart``: train, evaluate and benchmark Magic Pyramid end to end in a few minutes.

Steps, on the embedded all-MiniLM-L6-v2 and rotten_tomatoes unless told otherwise:

1. Train (``mp_model.training``): the four stages (fine-tune, soft pruning, hard pruning, sub-classifiers) on a
   subset, with a single pruning candidate (``delta_L``, ``lambda``) instead of a search. The run directory is
   ``<out>/run-<dataset>-<hash of the training settings>``; a rerun with the same settings finds it complete and
   skips training (an interrupted one resumes).
2. Evaluate (``mp_model.evaluation``): a small sweep of ``tau`` and threshold scales; per method (dense, LTP
   only, FastBERT only, MP) the setting with the fewest GFLOPs within 1 point of dense accuracy is selected on
   dev and reported on test, with its latency against HF BERT (sdpa) on padded batches sorted by length.
3. Benchmark (``bench.e2e``) the trained model at a small size (MP's selected ``tau`` and scale), with per-stage
   time splits, on real short, middle, long and mixed inputs.
4. Plot (``bench.plots``) and write ``eval.json``, ``e2e.json``, ``quickstart.json`` and the PNG figures to
   ``--out`` (default ``mp_results/``), and print the summary table.

Sizes (``SIZES``): ``--size small`` (default; under 15 minutes on 2 CPU cores) or ``full`` (the whole training
split after a 2 x 2 pruning search, the whole test split, ``mp eval``'s default sweep and larger ``tau``,
BERT-base and batches of 8 in the benchmark: hours on a CPU);
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
from transformers import AutoTokenizer
from transformers.utils import logging as transformers_logging

from bench import e2e, plots
from bench.provenance import provenance, write_results
from mp_model.data import encode, load_dataset
from mp_model.evaluation import DEFAULT_SCALES, DEFAULT_TAUS, METHODS, evaluate, select, setting_key
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.training import DENSE_DIR, FINAL_DIR, STAGES, STATE_FILE, TrainConfig, default_model_path, train


@dataclass(frozen=True)
class Size:
    """The knobs of one quickstart size."""

    train_examples: int | None
    exit_examples: int | None
    dev_examples: int
    eval_examples: int | None
    epochs: tuple[float, float, float, float]
    final_thresholds: tuple[float, ...]
    lambdas: tuple[float, ...]
    search_epochs: float
    taus: tuple[float, ...]
    scales: tuple[float, ...]
    latency_examples: int
    e2e_models: tuple[str, ...]
    e2e_batch_sizes: tuple[int, ...]
    e2e_max_gflop: float


SIZES = {
    "small": Size(
        train_examples=2000,
        exit_examples=4000,
        dev_examples=300,
        eval_examples=400,
        epochs=(3.0, 1.0, 1.0, 20.0),
        final_thresholds=(0.6,),
        lambdas=(0.1,),
        search_epochs=0.1,
        taus=(0.3, 0.6, 0.9),
        scales=(0.75, 1.0, 1.5),
        latency_examples=128,
        e2e_models=("minilm",),
        e2e_batch_sizes=(1, 32),
        e2e_max_gflop=e2e.CPU_MAX_GFLOP,
    ),
    "full": Size(
        train_examples=None,
        exit_examples=None,
        dev_examples=500,
        eval_examples=None,
        epochs=(3.0, 1.0, 1.0, 20.0),
        final_thresholds=(0.6, 1.2),
        lambdas=(0.02, 0.1),
        search_epochs=0.25,
        taus=DEFAULT_TAUS,
        scales=DEFAULT_SCALES,
        latency_examples=256,
        e2e_models=("minilm", "bert-base"),
        e2e_batch_sizes=(1, 8, 32),
        e2e_max_gflop=4 * e2e.CPU_MAX_GFLOP,
    ),
}
MAX_DROP = 0.01
LEARNING_RATE = 4e-5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="mp quickstart",
        description="Train, evaluate and benchmark Magic Pyramid end to end: a short run on the embedded MiniLM "
        "and rotten_tomatoes by default; results and figures go to --out.",
        epilog="Steps and sizes: see bench/quickstart.py and bench/README.md.",
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


def run_complete(directory: Path) -> bool:
    """Whether ``directory`` holds a finished training run (every stage done, final model saved)."""
    state = directory / STATE_FILE
    if not state.is_file() or not (directory / FINAL_DIR / "config.json").is_file():
        return False
    return sorted(json.loads(state.read_text()).get("stages_done", [])) == sorted(STAGES)


def run_evaluation(config: TrainConfig, size: Size, eval_examples: int | None, out: Path) -> list[dict[str, Any]]:
    """Select each method's setting on dev, report every setting on test; writes ``eval.json``."""
    directory = config.directory
    device = torch.device(config.device)
    dense = MagicPyramidForSequenceClassification.from_pretrained(str(directory / DENSE_DIR)).to(device).eval()
    final = MagicPyramidForSequenceClassification.from_pretrained(str(directory / FINAL_DIR)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory / FINAL_DIR))
    dataset = load_dataset(config.dataset, seed=config.seed)
    common = dict(dataset=dataset.name, taus=size.taus, scales=size.scales, batch_size=32, device=device)
    dev = encode(tokenizer, dataset.dev[:eval_examples], config.max_length)
    chosen = select(evaluate(dense, final, dev, split="dev", **common), MAX_DROP)
    by_key = {setting_key(r): r for r in chosen}
    test = encode(tokenizer, dataset.test[:eval_examples], config.max_length)
    records = evaluate(
        dense,
        final,
        test,
        split="test",
        latency=list(by_key),
        latency_examples=size.latency_examples,
        latency_repeats=3,
        **common,
    )
    for record in records:
        picked = by_key.get(setting_key(record))
        record["selected"] = picked is not None
        record["selected_on"] = "dev"
        if picked is not None:
            record["dev_accuracy"] = picked["accuracy"]
    meta = provenance(device) | {
        "benchmark": "quickstart-eval",
        "run_dir": str(directory),
        "train_config": config.to_dict(),
        "selection": f"per method, fewest GFLOPs within {MAX_DROP} accuracy of dense on dev",
        "latency": "ms per padded batch of 32 (sorted by length) vs HF BertForSequenceClassification (sdpa)",
        "latency_examples": size.latency_examples,
        "batch_size": 32,
        "max_length": config.max_length,
    }
    write_results(out / "eval.json", records, meta)
    return records


def run_benchmark(
    config: TrainConfig, size: Size, mp_record: dict[str, Any], out: Path, quiet: bool, threads: int
) -> Path:
    """``bench.e2e`` on the trained model at MP's selected ``tau`` and threshold scale; returns the JSON path."""
    path = out / "e2e.json"
    argv = [
        "--model",
        str(config.directory),
        "--device",
        config.device,
        "--models",
        ",".join(size.e2e_models),
        "--batch-sizes",
        ",".join(map(str, size.e2e_batch_sizes)),
        "--repeats",
        "5",
        "--max-gflop",
        "0" if config.device == "cuda" else str(size.e2e_max_gflop),
        "--tau",
        str(mp_record["tau"]),
        "--threshold-scale",
        str(mp_record["threshold_scale"]),
        "--out",
        str(path),
    ]
    if config.device == "cuda":
        argv += ["--dtype", "float16"]
    argv += ["--threads", str(threads)]
    if quiet:
        argv.append("--quiet")
    e2e.main(argv)
    return path


def summary(records: list[dict[str, Any]], benchmark: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: its selected setting's test numbers and its e2e latency speedups per cell."""
    rows = []
    for method in METHODS:
        record = next(r for r in records if r["method"] == method and r["selected"])
        cells = {
            f"{r['bucket']}@{r['batch_size']}": {
                "latency_speedup": r["latency_speedup"],
                "flops_speedup": r["flops_speedup"],
                "median_ms": r["median_ms"],
            }
            for r in benchmark
            if r["method"] == method and r["model"] == "minilm"
        }
        rows.append(
            {
                key: record.get(key)
                for key in (
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
                    "buckets",
                )
            }
            | {"e2e": cells}
        )
    return rows


def format_table(rows: list[dict[str, Any]], cells: list[str]) -> str:
    """The printed summary: accuracy, GFLOPs and speedups of each method's selected setting."""
    head = f"{'method':9} {'tau':>5} {'scale':>5} {'accuracy':>8} {'GFLOPs':>8} {'x FLOPs':>7} {'x latency':>9}"
    lines = [head + "".join(f" {'x ' + cell:>12}" for cell in cells)]
    for row in rows:
        tau = "-" if row["tau"] is None else f"{row['tau']:g}"
        scale = "-" if row["threshold_scale"] is None else f"{row['threshold_scale']:g}"
        latency = "-" if row["latency_speedup"] is None else f"{row['latency_speedup']:.2f}"
        line = (
            f"{row['method']:9} {tau:>5} {scale:>5} {100 * row['accuracy']:8.2f} {row['gflops']:8.3f} "
            f"{row['flops_speedup']:7.2f} {latency:>9}"
        )
        for cell in cells:
            value = row["e2e"].get(cell, {}).get("latency_speedup")
            line += f" {'-' if value is None else format(value, '.2f'):>12}"
        lines.append(line)
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

    print(f"[1/4] training {Path(config.model).name} on {config.dataset} in {config.directory}")
    if run_complete(config.directory):
        print("      the run is complete: reusing it")
    else:
        train(config, progress=not args.no_progress)
    seconds["train"] = time.perf_counter() - start

    print(f"[2/4] evaluating on the test split (up to {eval_examples or 'all'} examples)")
    records = run_evaluation(config, size, eval_examples, out)
    seconds["evaluate"] = time.perf_counter() - start - sum(seconds.values())

    mp_record = next(r for r in records if r["method"] == "mp" and r["selected"])
    print(f"[3/4] end-to-end benchmark (MP at tau={mp_record['tau']:g}, scale={mp_record['threshold_scale']:g})")
    e2e_path = run_benchmark(config, size, mp_record, out, quiet=args.no_progress, threads=args.threads)
    benchmark = plots.load(e2e_path)["records"]
    seconds["benchmark"] = time.perf_counter() - start - sum(seconds.values())

    print("[4/4] plots")
    figures = plots.make_plots([out / "eval.json", e2e_path], out)
    seconds["plots"] = time.perf_counter() - start - sum(seconds.values())

    rows = summary(records, benchmark)
    cells = [f"{b}@{n}" for n in size.e2e_batch_sizes for b in ("short", "mixed")]
    cells = [c for c in cells if any(c in row["e2e"] for row in rows)]
    meta = provenance(config.device) | {
        "benchmark": "quickstart",
        "size": args.size,
        "run_dir": str(config.directory),
        "train_config": config.to_dict(),
        "seconds": seconds,
        "files": [str(p) for p in (out / "eval.json", e2e_path, *figures)],
    }
    path = write_results(out / "quickstart.json", rows, meta)
    test_examples = records[0]["examples"]
    print(f"\n{config.dataset} test ({test_examples} examples), settings selected on dev within {MAX_DROP:g} of dense:")
    print("x latency: HF sdpa time / ours, padded batches of 32 sorted by length; x CELL: e2e, bucket@batch size")
    print(format_table(rows, cells))
    print(f"\nwrote {path}, {out / 'eval.json'}, {e2e_path} and {', '.join(p.name for p in figures)} in {out}")
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f", total {sum(seconds.values()):.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
