"""Which selection rule keeps the most of the achievable speedup without leaving the accuracy limit more often (#42).

    python -m bench.selection_study --run-dir RUN [--run-dir RUN2 ...] \
        --out bench/results/sweeps/selection-<dataset>-cpu.json

Per finished run (``mp train``), the dev and test splits are loaded as ``mp eval`` loads them (the run's dataset,
seed, ``dev_from_train`` and ``max_length``; dense = stage 1, final = stage 4) and the whole sweep of settings is
evaluated once per split with per-example outcomes (``evaluate(keep_outcomes=True)``). Those outcomes are cached
in ``RUN/selection_outcomes.pt`` with a fingerprint (every file of the two model folders, the dataset's examples,
split sizes, sweep and truncation): a cache whose fingerprint differs is recomputed, never reused.

Every rule of ``mp_model.recipe.selection_rules.candidate_rules`` then chooses each method's setting on dev, and its
choice is read on test: the FLOPs speedup over dense, the drop from dense, whether it is within the limit, the
"oracle" (the method's best speedup within the limit read on test itself), the ratio of the two, and the re-split
reliability (``selection_reliability`` with the rule: dev and test pooled and re-split ``--splits`` times, the share
of splits whose choice stays within the limit on the unseen part). Aggregated per rule and method over runs: the
mean ratio, the runs within the limit on test, the mean reliability, and (for MP) the runs where MP's choice is
faster on test than both LTP-only's and FastBERT-only's. The issue's target: MP's mean ratio >= 0.8 while within
the limit on test in at least 2 of 3 runs.

One JSON record per (run, rule, method), the aggregates and each run's timings in the provenance; a table of MP's
numbers per rule is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mp_model.recipe.cli_support import add_threads_flag, optional_int, quiet_transformers, use_threads
from mp_model.recipe.data import encode
from mp_model.recipe.eval_command import eval_inputs
from mp_model.recipe.evaluation import DEFAULT_SCALES, DEFAULT_TAUS, evaluate
from mp_model.recipe.runs import DENSE_DIR, FINAL_DIR, sha256
from mp_model.recipe.selection import RESAMPLES, Rule, outcome_record, selection_reliability, setting_key, within_limit
from mp_model.recipe.selection_rules import candidate_rules

CACHE_FILE = "selection_outcomes.pt"
CACHE_FORMAT = 1  # raise when the cached outcomes' meaning changes (the FLOPs count, the record layout)
SPLITS = ("dev", "test")
COMPARED = ("ltp", "fastbert", "mp")
TARGET_RATIO = 0.8


def model_files(run_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of the run's dense and final model folders, by relative path."""
    return {
        f"{folder}/{path.name}": sha256(path)
        for folder in (DENSE_DIR, FINAL_DIR)
        for path in sorted((run_dir / folder).iterdir())
        if path.is_file()
    }


def fingerprint(run_dir: Path, dataset: Any, splits: dict[str, list[Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """What the cached outcomes of ``run_dir`` depend on: its models' files, the dataset's name and examples per
    split, their sizes, and the evaluation ``settings``."""
    examples = {
        name: hashlib.sha256(json.dumps([[e.text, e.text_pair, e.label] for e in rows]).encode()).hexdigest()
        for name, rows in splits.items()
    }
    return {
        "format": CACHE_FORMAT,
        "models": model_files(run_dir),
        "dataset": dataset.name,
        "split_sizes": {name: len(rows) for name, rows in splits.items()},
        "examples_sha256": examples,
        **settings,
    }


def read_cache(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The cached outcomes in ``path`` if its fingerprint is ``expected``; None (and a line saying why) if not."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable cache is recomputed
        print(f"{path}: unreadable ({type(error).__name__}), recomputing")
        return None
    if not isinstance(cached, dict) or cached.get("fingerprint") != expected:
        print(f"{path}: made for another run, model or sweep, recomputing")
        return None
    return cached


def run_outcomes(
    run_dir: Path,
    *,
    size: int | None,
    taus: Sequence[float],
    scales: Sequence[float],
    batch_size: int,
    device: str,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """Per split (dev, test), the sweep's records with per-example outcomes, from the cache or evaluated (and
    cached); and facts of the run: its dataset, split sizes, whether the cache was used, seconds taken."""
    start = time.perf_counter()
    dense, final, tokenizer, _saved, dataset, max_length = eval_inputs(run_dir, device)
    splits = {name: dataset.split(name)[:size] for name in SPLITS}
    for name, rows in splits.items():
        if not rows:
            raise ValueError(f"{dataset.name}: the {name} split is empty, nothing to evaluate")
    sweep = {"max_length": max_length, "size": size, "batch_size": batch_size, "device": device}
    sweep |= {"taus": [float(t) for t in taus], "scales": [float(s) for s in scales]}
    expected = fingerprint(run_dir, dataset, splits, sweep)
    path = run_dir / CACHE_FILE
    cached = read_cache(path, expected)
    reused = cached is not None
    if cached is None:
        cached = {"fingerprint": expected, "dataset": dataset.name, "keys": None}
        for name, rows in splits.items():
            encoded = encode(tokenizer, rows, max_length)
            records = evaluate(
                dense,
                final,
                encoded,
                dataset=dataset.name,
                split=name,
                taus=taus,
                scales=scales,
                batch_size=batch_size,
                device=device,
                keep_outcomes=True,
            )
            cached["keys"] = [setting_key(r) for r in records]
            cached[name] = {
                field: torch.stack([r["outcome"][field] for r in records]) for field in ("correct", "flops")
            }
        partial = path.with_suffix(".partial")
        torch.save(cached, partial)
        partial.replace(path)  # a run cut short leaves no half-written cache
    records = {
        name: [
            outcome_record(cached["dataset"], tuple(key), cached[name]["correct"][i], cached[name]["flops"][i])
            for i, key in enumerate(cached["keys"])
        ]
        for name in SPLITS
    }
    facts = {
        "run_dir": str(run_dir.resolve()),
        "dataset": dataset.name,
        "examples": {name: len(rows) for name, rows in splits.items()},
        "settings": len(cached["keys"]),
        "outcomes_cached": reused,
        "outcomes_seconds": time.perf_counter() - start,
    }
    return records, facts


def oracle(test: Sequence[dict[str, Any]], method: str, max_drop: float) -> dict[str, Any] | None:
    """The ``method``'s fewest-GFLOPs record within ``max_drop`` of dense on ``test`` itself (None if none)."""
    dense = next(r for r in test if r["method"] == "dense")
    within = [r for r in test if r["method"] == method and within_limit(dense["accuracy"] - r["accuracy"], max_drop)]
    return min(within, key=lambda r: (r["gflops"], -r["accuracy"])) if within else None


def study_run(
    records: dict[str, list[dict[str, Any]]], rules: dict[str, Rule], *, max_drop: float, splits: int, seed: int
) -> list[dict[str, Any]]:
    """One row per (rule, compared method) of one run: the rule's choice on dev read on test, beside the oracle and
    the re-split reliability."""
    dev, test = records["dev"], records["test"]
    by_key = {name: {setting_key(r): r for r in records[name]} for name in SPLITS}
    dense = {name: by_key[name][("dense", None, None)] for name in SPLITS}
    best = {method: oracle(test, method, max_drop) for method in COMPARED}
    rows = []
    for name, rule in rules.items():
        chosen = {r["method"]: setting_key(r) for r in rule(dev, seed)}
        reliability = selection_reliability(dev, test, max_drop, splits=splits, seed=seed, rule=rule)
        for method in COMPARED:
            key = chosen[method]
            on = {split: by_key[split][key] for split in SPLITS}
            speedup = {split: dense[split]["gflops"] / on[split]["gflops"] for split in SPLITS}
            drop = {split: dense[split]["accuracy"] - on[split]["accuracy"] for split in SPLITS}
            top = best[method]
            top_speedup = None if top is None else dense["test"]["gflops"] / top["gflops"]
            rows.append(
                {
                    "rule": name,
                    "method": method,
                    "tau": key[1],
                    "threshold_scale": key[2],
                    "dev_drop": drop["dev"],
                    "dev_flops_speedup": speedup["dev"],
                    "test_drop": drop["test"],
                    "test_flops_speedup": speedup["test"],
                    "within_limit": bool(within_limit(drop["test"], max_drop)),
                    "oracle_tau": None if top is None else top["tau"],
                    "oracle_threshold_scale": None if top is None else top["threshold_scale"],
                    "oracle_flops_speedup": top_speedup,
                    "ratio": None if top_speedup is None else speedup["test"] / top_speedup,
                    "reliability": reliability[method],
                }
            )
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarise(rows: Sequence[dict[str, Any]], rules: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per rule and method, over runs: mean ratio, runs within the limit on test, mean reliability, mean speedup;
    for MP also the runs where it is ahead of both others, and whether the issue's target is met."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for rule in rules:
        of_rule = [r for r in rows if r["rule"] == rule]
        summary[rule] = {}
        for method in COMPARED:
            mine = [r for r in of_rule if r["method"] == method]
            ratios = [r["ratio"] for r in mine if r["ratio"] is not None]
            within = sum(r["within_limit"] for r in mine)
            summary[rule][method] = {
                "runs": len(mine),
                "mean_ratio": _mean(ratios),
                "within_limit_on_test": within,
                "mean_reliability": _mean([r["reliability"]["within_limit"] for r in mine]),
                "mean_flops_speedup": _mean([r["test_flops_speedup"] for r in mine]),
                "mean_oracle_flops_speedup": _mean(
                    [r["oracle_flops_speedup"] for r in mine if r["oracle_flops_speedup"] is not None]
                ),
            }
        mp = [r for r in of_rule if r["method"] == "mp"]
        ahead = 0
        for row in mp:
            others = [r for r in of_rule if r["run_dir"] == row["run_dir"] and r["method"] != "mp"]
            ahead += all(row["test_flops_speedup"] > r["test_flops_speedup"] for r in others)
        entry = summary[rule]["mp"]
        entry["ahead_of_ltp_and_fastbert"] = ahead
        entry["meets_target"] = (
            entry["mean_ratio"] is not None
            and entry["mean_ratio"] >= TARGET_RATIO - 1e-9
            and 3 * entry["within_limit_on_test"] >= 2 * entry["runs"]
        )
    return summary


def format_table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """MP's aggregates per rule (and FastBERT-only's and LTP-only's mean ratios), one line each."""
    header = f"{'rule':<24}{'MP x':>7}{'oracle x':>9}{'ratio':>7}{'within':>8}{'reliab.':>8}{'ahead':>7}"
    lines = [header + f"{'target':>8}{'FB ratio':>9}{'LTP ratio':>10}"]

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for rule, methods in summary.items():
        mp = methods["mp"]
        lines.append(
            f"{rule:<24}{number(mp['mean_flops_speedup'], '.2f'):>7}{number(mp['mean_oracle_flops_speedup'], '.2f'):>9}"
            f"{number(mp['mean_ratio'], '.2f'):>7}{mp['within_limit_on_test']:>4}/{mp['runs']:<3}"
            f"{number(mp['mean_reliability'], '.0%'):>8}{mp['ahead_of_ltp_and_fastbert']:>4}/{mp['runs']:<2}"
            f"{'yes' if mp['meets_target'] else 'no':>8}{number(methods['fastbert']['mean_ratio'], '.2f'):>9}"
            f"{number(methods['ltp']['mean_ratio'], '.2f'):>10}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, action="append", required=True, help="a finished run (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--max-drop", type=float, default=0.01, help="largest accuracy drop from dense (fraction)")
    parser.add_argument("--splits", type=int, default=200, help="re-splits of pooled dev+test for the reliability")
    parser.add_argument("--resamples", type=int, default=RESAMPLES, help="bootstrap resamples of the rules")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rules' bootstraps and of the re-splits")
    parser.add_argument("--size", type=optional_int, default=None, metavar="N|all", help="first N of each split")
    parser.add_argument("--taus", nargs="+", type=float, default=list(DEFAULT_TAUS), help="exit thresholds tau")
    parser.add_argument("--scales", nargs="+", type=float, default=list(DEFAULT_SCALES), help="threshold scales")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (mp eval's default)")
    parser.add_argument("--device", default="cpu", help="torch device of the evaluation")
    add_threads_flag(parser)
    return parser.parse_args(argv)


def study(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The records and the provenance extras (summary, runs) of the study ``args`` describe."""
    from mp_model.recipe.checks import check_float, check_int

    check_float("--max-drop", args.max_drop, 0.0, 1.0)
    check_int("--splits", args.splits)
    check_int("--seed", args.seed, 0)
    check_int("--batch-size", args.batch_size)
    if args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory")
    use_threads(args.threads)
    quiet_transformers()
    rules = candidate_rules(args.max_drop, args.resamples)
    rows, runs = [], []
    for run_dir in args.run_dir:
        records, facts = run_outcomes(
            run_dir, size=args.size, taus=args.taus, scales=args.scales, batch_size=args.batch_size, device=args.device
        )
        start, threads = time.perf_counter(), torch.get_num_threads()
        torch.set_num_threads(1)  # small tensors: more threads only contend (50x slower on 2 busy cores)
        try:
            found = study_run(records, rules, max_drop=args.max_drop, splits=args.splits, seed=args.seed)
        finally:
            torch.set_num_threads(threads)
        facts["rules_seconds"] = time.perf_counter() - start
        rows += [{"run_dir": facts["run_dir"], "dataset": facts["dataset"], **row} for row in found]
        runs.append(facts)
        print(f"{run_dir}: outcomes {facts['outcomes_seconds']:.0f} s, rules {facts['rules_seconds']:.0f} s")
    meta = {
        "benchmark": "selection-study",
        "max_drop": args.max_drop,
        "splits": args.splits,
        "resamples": args.resamples,
        "seed": args.seed,
        "rules": list(rules),
        "definitions": {
            "ratio": "the choice's FLOPs speedup on test over the method's best speedup within the limit on test",
            "reliability": "share of re-splits of pooled dev+test whose choice stays within the limit on the unseen "
            "part (selection_reliability)",
            "target": f"MP mean ratio >= {TARGET_RATIO} and within the limit on test in >= 2/3 of runs",
        },
        "runs": runs,
        "summary": summarise(rows, list(rules)),
    }
    return rows, meta


def main(argv: list[str] | None = None) -> int:
    """Run the study (see the module docstring); errors are one line on stderr and exit code 2."""
    from bench.provenance import provenance, write_results

    args = parse_args(argv)
    try:
        rows, meta = study(args)
    except ValueError as error:
        print(f"selection_study: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    path = write_results(args.out, rows, provenance(args.device, command=" ".join(sys.argv)) | meta)
    print(format_table(meta["summary"]))
    print(f"wrote {len(rows)} records to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
