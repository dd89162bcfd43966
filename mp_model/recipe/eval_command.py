"""``mp eval``: select each method's setting on dev, report the sweep on test, beside the plain fine-tune."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mp_model.recipe.cli_support import (
    add_threads_flag,
    check_output,
    model_labels,
    optional_int,
    quiet_transformers,
    use_threads,
)


def configure_eval(parser: argparse.ArgumentParser) -> None:
    from mp_model.recipe.evaluation import DEFAULT_SCALES, DEFAULT_TAUS, METHODS
    from mp_model.recipe.selection import LATENCY_CHOICES
    from mp_model.recipe.selection_rules import RULE_SPECS

    parser.add_argument("--run-dir", default="runs/rotten_tomatoes", help="a finished `mp train` run directory")
    parser.add_argument("--dataset", help="dataset name or file (default: the run's)")
    parser.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split to report")
    parser.add_argument(
        "--select-split",
        default="dev",
        choices=["train", "dev", "test"],
        help="split on which each method's setting is selected (default dev; never select on the reported split)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to sweep")
    parser.add_argument("--taus", nargs="+", type=float, default=list(DEFAULT_TAUS), help="exit thresholds tau")
    parser.add_argument(
        "--scales", nargs="+", type=float, default=list(DEFAULT_SCALES), help="threshold scales for pruning"
    )
    parser.add_argument("--max-drop", type=float, default=0.01, help="selection: largest accuracy drop from dense")
    parser.add_argument(
        "--rule",
        metavar="SPEC",
        help=f"selection rule, one of {RULE_SPECS} (default {DEFAULT_RULE}: a setting's paired drop from dense plus "
        "K standard errors must be within --max-drop; bootstrap:C: within it in a share C of paired bootstrap "
        "resamples; docs/training.md)",
    )
    parser.add_argument(
        "--confidence",
        metavar="C|none",
        help="the same as --rule bootstrap:C ('none': --rule point)",
    )
    parser.add_argument(
        "--reliability-splits",
        type=int,
        default=200,
        help="re-split the pooled selection and reported examples this many times and report how often each rule's "
        "choice stays within --max-drop on the unseen part (0: skip)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation and latency batch size")
    parser.add_argument("--max-length", type=int, help="truncation (default: the run's)")
    parser.add_argument(
        "--size", type=optional_int, default=None, metavar="N|all", help="first N examples of each split"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument(
        "--latency",
        default="tables",
        choices=LATENCY_CHOICES,
        help="which settings to time on the reported split: those the README tables show (default: the selected "
        "ones and the tau sweeps of FastBERT-only and of MP at its selected scale), the selected ones, every one, "
        "or none",
    )
    parser.add_argument("--latency-examples", type=int, default=256, help="examples timed (first N of the split)")
    parser.add_argument("--latency-repeats", type=int, default=3, help="timed passes (median) after one warm-up")
    add_threads_flag(parser)
    parser.add_argument("--json", type=Path, help="write the records with provenance to this file")


DEFAULT_RULE = "normal:1"
"""``mp eval``'s selection rule, chosen by the pre-registered study of #42 (``bench/NOTES.md``, "Choosing the
selection rule") over bootstrap:0.8, the rule before it."""


def format_table(records: Sequence[dict[str, Any]]) -> str:
    header = f"{'method':<9}{'tau':>6}{'scale':>7}{'acc':>8}{'GFLOPs':>9}{'FLOPs x':>9}{'ms/batch':>10}{'lat x':>7}"
    lines = [header]
    for r in records:
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"
        lat_x = "-" if r["latency_speedup"] is None else f"{r['latency_speedup']:.2f}"
        tau = "-" if r["tau"] is None else f"{r['tau']:g}"
        scale = "-" if r["threshold_scale"] is None else f"{r['threshold_scale']:g}"
        lines.append(
            f"{r['method']:<9}{tau:>6}{scale:>7}{r['accuracy']:>8.4f}{r['gflops']:>9.4f}"
            f"{r['flops_speedup']:>9.2f}{lat:>10}{lat_x:>7}"
        )
    return "\n".join(lines)


def eval_inputs(
    run_dir: Path, device: str, dataset_name: str | None = None, max_length: int | None = None
) -> tuple[Any, Any, Any, dict[str, Any], Any, int]:
    """What evaluating a run reads: its stage-1 (dense) and final models, tokenizer and saved ``train_config``, the
    dataset (the run's own, with its seed and ``dev_from_train``, unless ``dataset_name`` names another) with labels
    matched to the model's, and the ``max_length`` (the run's unless given), checked against the model."""
    from mp_model.recipe.data import check_max_length
    from mp_model.recipe.datasets import load_dataset
    from mp_model.recipe.runs import load_run

    dense, final, tokenizer, saved = load_run(run_dir, device)
    own = dataset_name in (None, saved.get("dataset"))
    dataset = load_dataset(
        dataset_name or saved.get("dataset", "rotten_tomatoes"),
        seed=saved.get("seed", 0),
        labels=model_labels(final),
        dev_from_train=saved.get("dev_from_train", 0) if own else 0,
    )
    max_length = max_length if max_length is not None else saved.get("max_length", 128)
    check_max_length(max_length, tokenizer, limit=final.config.max_position_embeddings)
    return dense, final, tokenizer, saved, dataset, max_length


def selection_rule(args: argparse.Namespace) -> tuple[str, Any]:
    """``(name, Rule)`` of ``--rule`` or ``--confidence``, ``DEFAULT_RULE`` if neither; a ``ValueError`` naming the
    flag if both are given or either is malformed or out of range."""
    from mp_model.recipe.selection_rules import parse_rule

    if args.rule is not None and args.confidence is not None:
        raise ValueError("give --rule or --confidence, not both")
    flag, spec = "--rule", args.rule or DEFAULT_RULE
    if args.confidence is not None:
        flag = "--confidence"
        spec = "point" if args.confidence.strip().lower() == "none" else f"bootstrap:{args.confidence}"
    try:
        return parse_rule(spec, args.max_drop)
    except ValueError as error:
        raise ValueError(f"{flag}: {error}") from None


def run_eval(args: argparse.Namespace) -> int:
    from mp_model.recipe.checks import check_device, check_float, check_int
    from mp_model.recipe.data import check_max_length
    from mp_model.recipe.provenance import provenance, write_results
    from mp_model.recipe.runs import STAGES, read_state
    from mp_model.recipe.selection import fallback_note, select_and_report

    quiet_transformers()
    check_device(args.device)
    for tau in args.taus:
        check_float("--taus", tau, 0.0, 1.0)
    for scale in args.scales:
        check_float("--scales", scale, 0.0)
    check_float("--max-drop", args.max_drop, 0.0, 1.0)
    rule = selection_rule(args)
    check_int("--reliability-splits", args.reliability_splits, 0)
    for name in ("batch_size", "latency_examples", "latency_repeats"):
        check_int("--" + name.replace("_", "-"), getattr(args, name))
    if args.max_length is not None:
        check_max_length(args.max_length)
    check_output("--json", args.json)
    use_threads(args.threads)
    if args.select_split == args.split:
        warnings.warn(f"selecting on the reported split ({args.split})", stacklevel=1)
    run_dir = Path(args.run_dir)
    dense, final, tokenizer, saved, dataset, max_length = eval_inputs(
        run_dir, args.device, args.dataset, args.max_length
    )
    records, selection = select_and_report(
        dense,
        final,
        tokenizer,
        dataset,
        max_length=max_length,
        select_split=args.select_split,
        split=args.split,
        size=args.size,
        max_drop=args.max_drop,
        rule=rule,
        reliability_splits=args.reliability_splits,
        methods=args.methods,
        taus=args.taus,
        scales=args.scales,
        batch_size=args.batch_size,
        device=args.device,
        latency=args.latency,
        latency_examples=args.latency_examples,
        latency_repeats=args.latency_repeats,
    )
    selected = [r for r in records if r["selected"]]
    rule_name = rule[0]
    print(
        f"{dataset.name} {args.split} ({records[0]['examples']} examples), settings selected on {args.select_split} "
        f"(fewest GFLOPs within {args.max_drop:g} of dense at {rule_name}):"
    )
    print(format_table(selected))
    note = fallback_note(selected, args.select_split)
    if note is not None:
        print(note)
    reference = reference_accuracy(run_dir, dataset, tokenizer, max_length, args, saved)
    if reference is not None:
        dense_accuracy = next(r["accuracy"] for r in records if r["method"] == "dense")
        print(
            f"plain fine-tune ({reference['model_class']}, lr {reference['lr']:g}, epoch {reference['epoch']}): "
            f"{args.split} accuracy {reference['accuracy']:.4f}; the recipe's dense (stage 1): {dense_accuracy:.4f}"
        )
    for name, methods in selection.get("reliability", {}).items():
        shown = ", ".join(
            f"{m} {v['within_limit']:.0%} (median {v['median_flops_speedup']:.2f}x)" for m, v in methods.items()
        )
        print(f"within the limit on unseen examples, {name} rule, {args.reliability_splits} re-splits: {shown}")
    if args.json:
        state = read_state(run_dir)
        meta = provenance(args.device) | {
            "run_dir": str(run_dir.resolve()),
            "train_config": saved,
            "training_arithmetic": {
                f"stage{n}": state.get(f"stage{n}", {}).get("arithmetic", "unrecorded") for n in STAGES
            },
            "selection": f"per method, fewest GFLOPs within {args.max_drop} accuracy of dense on {args.select_split} "
            f"at {rule_name}",
            "selection_details": selection,
            "reference": reference,
            "latency": "ms per padded batch, median of passes over the first latency_examples examples sorted by "
            "length, vs HF BertForSequenceClassification (sdpa) on the stage-1 weights",
            "latency_examples": args.latency_examples,
            "latency_repeats": args.latency_repeats,
            "batch_size": args.batch_size,
            "max_length": max_length,
        }
        path = write_results(args.json, records, meta)
        print(f"wrote {len(records)} records to {path}")
    return 0


def reference_accuracy(
    run_dir: Path, dataset: Any, tokenizer: Any, max_length: int, args: argparse.Namespace, run_config: dict[str, Any]
) -> dict[str, Any] | None:
    """The run's plain fine-tune (``mp_model.recipe.reference``) with its accuracy on the reported split, if any;
    a warning if it was trained with other stage-1 settings than the run's ``run_config`` (``stage1_differences``:
    the later stages' settings do not concern it)."""
    from mp_model.recipe.data import encode
    from mp_model.recipe.reference import accuracy, load_reference, stage1_differences

    loaded = load_reference(run_dir, args.device)
    if loaded is None:
        return None
    model, saved = loaded
    changed = stage1_differences(saved.get("train_config", run_config), run_config)
    if changed:
        warnings.warn(
            f"the run's reference was trained with another stage-1 configuration ({', '.join(changed)})", stacklevel=1
        )
    encoded = encode(tokenizer, dataset.split(args.split)[: args.size], max_length)
    score = accuracy(model, encoded, batch_size=args.batch_size, device=args.device)
    lrs = sorted({point["lr"] for point in saved.get("grid", [])})
    kept = {k: v for k, v in saved.items() if k not in ("grid", "train_config")}
    return kept | {"lrs": lrs, "split": args.split, "accuracy": score}
