"""The GPU training window in one command (#17, #38): the recipe on CUDA, its reference, evaluation and predict.

    python -m bench.gpu_training --out $OUT/train                 # on an H100/H200 (MiniLM and data carried)
    python -m bench.gpu_training --smoke --out /tmp/train         # the same plumbing on a CPU at toy sizes
    python -m bench.gpu_training --toy --out $OUT/toy             # toy sizes on the GPU: does the stack run there?

For each dataset of ``DATASETS`` a chain of four ``mp`` commands, each a subprocess with its own time limit
(``bench.gpu_suite.run_step``: output teed into ``OUT/<dataset>-<step>.log``, killed at its limit):

1. ``train``: ``mp train --device cuda`` (``--precision auto``: bf16 autocast on CUDA) with every training example
   (Rotten Tomatoes: 2,000 of them moved into dev; BBC News: 340, at 512 tokens), the recipe's defaults otherwise;
2. ``reference``: ``mp reference`` (the plain ``BertForSequenceClassification`` fine-tune with the run's budget);
3. ``eval``: ``mp eval --device cuda --latency none`` (settings chosen on dev, reported on test) into
   ``OUT/<dataset>-all-cuda.json``;
4. ``predict``: ``mp predict --device cuda`` of the first ``PREDICT_TEXTS`` test texts (written before the chains
   start, ``write_texts``) into ``OUT/<dataset>-all-predict-cuda.jsonl``. (``--engine ray`` cannot run on the
   device machine: Ray is not installed there and does not fit the 64 MiB carried.)

The chains run concurrently (one thread each: the GPU is far from busy with one small model) unless
``--sequential``; a chain stops at its first failed step. Timing is not what this window measures: ``mp eval``
runs with ``--latency none``, and GPU speed belongs to ``bench.gpu_suite``. ``summary.json`` (rewritten after every
step) holds the provenance, each step's command, status and wall time. ``--toy`` runs the same chains with a few
hundred examples, a fraction of an epoch per stage and a small evaluation grid; ``--smoke`` is ``--toy`` on the CPU
with one thread. ``--train-args`` and ``--eval-args`` append options to every chain's ``mp train`` and ``mp eval``
(later options win).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from bench.gpu_suite import run_step
from bench.provenance import device_name, provenance

BUDGET_S = 420
STEP_TIMEOUTS = {"train": 300, "reference": 60, "eval": 120, "predict": 60}
PREDICT_TEXTS = 1000  # test texts `mp predict` labels after the evaluation (``texts_file``)
# dataset: (options of mp train, name of the eval JSON without the device)
DATASETS: dict[str, tuple[list[str], str]] = {
    "rotten_tomatoes": (["--dev-from-train", "2000"], "rotten_tomatoes-all"),
    "bbc_news": (["--dev-from-train", "340", "--max-length", "512"], "bbc_news-all"),
}
SMOKE_TRAIN = [
    "--train-size", "192", "--dev-size", "64", "--epochs-finetune", "1", "--epochs-soft", "0.25", "--epochs-hard",
    "0.25", "--epochs-exits", "1", "--search-epochs-soft", "0.1", "--search-epochs-hard", "0.1", "--lambdas", "0.1",
    "--final-thresholds", "0.6", "--max-length", "64",
]  # fmt: skip
SMOKE_EVAL = ["--size", "64", "--taus", "0.2", "0.6", "--scales", "1.0", "2.0", "--reliability-splits", "5"]


def chain(dataset: str, args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The (step, command) pairs of one dataset's chain."""
    mp = [sys.executable, "-m", "mp_model.recipe.cli"]
    options, name = DATASETS[dataset]
    run_dir, threads = str(args.runs / dataset), ["--threads", "1"] if args.smoke else []
    train = [*mp, "train", "--dataset", dataset, "--device", args.device, "--run-dir", run_dir, *options, *threads]
    train += (SMOKE_TRAIN if args.toy else []) + ([] if args.progress else ["--no-progress"])
    evaluate = [*mp, "eval", "--run-dir", run_dir, "--device", args.device, "--latency", "none", *threads]
    evaluate += ["--json", str(args.out / f"{name}-{args.device}{'-toy' if args.toy else ''}.json")]
    evaluate += SMOKE_EVAL if args.toy else []
    reference = [*mp, "reference", "--run-dir", run_dir, "--no-progress", *threads]
    train, evaluate = train + shlex.split(args.train_args), evaluate + shlex.split(args.eval_args)
    output = args.out / f"{name}-predict-{args.device}.jsonl"
    predict = [*mp, "predict", str(texts_file(dataset, args)), "--run-dir", run_dir, "--device", args.device]
    predict += ["--output", str(output), "--no-progress"]
    return [("train", train), ("reference", reference), ("eval", evaluate), ("predict", predict)]


def texts_file(dataset: str, args: argparse.Namespace) -> Path:
    """Where ``write_texts`` puts the dataset's texts for the ``predict`` step."""
    return args.out / f"{dataset}-texts.jsonl"


def write_texts(dataset: str, args: argparse.Namespace) -> Path:
    """The first ``PREDICT_TEXTS`` test texts of ``dataset`` as JSON lines (``{"text": ...}``), for ``mp predict``."""
    from mp_model.recipe.datasets import load_dataset

    path = texts_file(dataset, args)
    examples = load_dataset(dataset).test[:PREDICT_TEXTS]
    path.write_text("".join(json.dumps({"text": example.text}) + "\n" for example in examples))
    return path


def run_chain(
    dataset: str, args: argparse.Namespace, deadline: float, summary: dict[str, Any], lock: threading.Lock
) -> None:
    """Run one dataset's chain within ``deadline`` (a ``time.monotonic`` value), recording each step in
    ``summary["steps"]`` and rewriting ``summary.json``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for step, command in chain(dataset, args):
        key, remaining = f"{dataset}-{step}", deadline - time.monotonic()
        if remaining < 5:
            record: dict[str, Any] = {"status": "skipped", "reason": "the window's --budget is spent", "wall_s": 0.0}
        else:
            print(f"=== {key}: starting", flush=True)
            record = run_step(key, command, min(STEP_TIMEOUTS[step] * args.timeout_scale, remaining), args.out, env)
            print(f"=== {key}: {record['status']} in {record['wall_s']} s", flush=True)
        with lock:
            summary["steps"][key] = record
            (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if record["status"] != "ok":
            return


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for the logs, eval JSON and summary.json")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/mp-gpu-runs"), help="folder of the run directories")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of the datasets")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything")
    parser.add_argument("--timeout-scale", type=float, default=1.0, help="multiplies every step's time limit")
    parser.add_argument("--sequential", action="store_true", help="one chain after the other")
    parser.add_argument("--device", default="cuda", help="torch device of the three commands (default cuda)")
    parser.add_argument("--toy", action="store_true", help="toy sizes: does everything run?")
    parser.add_argument("--smoke", action="store_true", help="--toy on the CPU with one thread: the plumbing only")
    parser.add_argument("--progress", action="store_true", help="mp train's progress bars into its log (rates)")
    parser.add_argument("--train-args", default="", help="more mp train options, one string")
    parser.add_argument("--eval-args", default="", help="more mp eval options, one string")
    args = parser.parse_args(argv)
    if args.smoke:
        args.toy, args.device = True, "cpu"
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if unknown := set(args.datasets) - set(DATASETS):
        parser.error(f"--datasets: unknown {sorted(unknown)}; choose from {', '.join(DATASETS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chains and write ``summary.json``; returns 0 when every step is ``ok``, else 1."""
    begin = time.monotonic()
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU plumbing check")
    summary: dict[str, Any] = {"provenance": provenance(args.device), "device": device_name(args.device), "steps": {}}
    summary["mode"], summary["budget_s"] = ("toy" if args.toy else "full"), args.budget
    lock, deadline = threading.Lock(), begin + args.budget
    for dataset in args.datasets:
        write_texts(dataset, args)
    threads = [
        threading.Thread(target=run_chain, args=(dataset, args, deadline, summary, lock)) for dataset in args.datasets
    ]
    for thread in threads:
        thread.start()
        if args.sequential:
            thread.join()
    for thread in threads:
        thread.join()
    summary["wall_s"] = round(time.monotonic() - begin, 1)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for key, record in summary["steps"].items():
        print(f"{key:28} {record['status']:10} {record['wall_s']:>7} s")
    return 0 if all(r["status"] == "ok" for r in summary["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
