"""Stage 4's loss compared on one finished run: the sub-classifiers retrained per variant, selected on dev, reported
on test, all in one run.

    python -m bench.exit_loss_sweep --run-dir runs/rotten_tomatoes \\
        --out bench/results/sweeps/exit-loss-rotten_tomatoes-cpu.json

Stages 1-3 fix the backbone, the main classifier and the thresholds; only the sub-classifiers differ between
variants of stage 4. So the script runs the backbone once per split and threshold scale and reuses it for every
variant:

1. ``distillation_cache`` caches stage 3's sub-classifier inputs on the run's distillation examples at the run's
   ``exit_scales`` (as ``mp train``; a run saved before that field existed: at scale 1.0 only).
2. Per split (dev, test) and per threshold scale of ``mp eval``'s sweep (and unpruned): ``collect`` runs the run's
   final model through the packed path (kept tokens, main logits, FLOPs), and ``masked_forward`` with hard masks at
   that scale gives each sub-classifier's input. The run's own heads on those inputs must give the packed path's
   exit logits (``max_exit_logit_error``, ``exit_argmax_agreement`` in the JSON): the check that both passes prune
   alike.
3. Per variant (``TrainConfig`` fields ``distillation``, ``exit_label_weight``, ``epochs_exits``, ``exit_lr``):
   ``fit_exits`` from stage 3's heads with the run's seed, then every setting of the sweep is scored from the
   cached passes with the new heads (``evaluation.setting_record``), each method's setting selected on dev by
   ``mp eval``'s rules (paired bootstrap at confidence 0.8, and the point estimate) and reported on test, with the
   re-split reliability of both rules.

The variant equal to the run's configuration must reproduce the run's heads (``reproduces_run``).
``--cache-scales 1.0`` (or ``none 1.0 2.0``) also trains each loss on a cache at those threshold scales instead of
the run's, in the same number of steps (``fit_exits``). ``--cache-precision`` sets the caches' arithmetic;
``--variants`` picks losses. Each record has the sub-classifiers' accuracy per layer on dev and test at threshold
scale 1.0.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.provenance import SWEEPS_DIR, provenance, write_results
from mp_model.exit_head import apply_exits
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.recipe.cli_support import threshold_scale
from mp_model.recipe.data import Encoded, encode
from mp_model.recipe.evaluation import (
    DEFAULT_SCALES,
    DEFAULT_TAUS,
    Collected,
    collect,
    exit_uncertainty,
    setting_record,
    settings,
)
from mp_model.recipe.fit_exits import distillation_cache, exit_targets, fit_exits
from mp_model.recipe.runs import load_model, load_run, stage_dir
from mp_model.recipe.selection import DEFAULT_CONFIDENCE, select, selection_reliability, setting_key
from mp_model.recipe.train_config import TrainConfig
from mp_model.recipe.training import load_data

# (name, TrainConfig changes); "forward KL" is the default loss (at the default 20 epochs).
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("forward KL", {"distillation": "forward", "exit_label_weight": 0.0}),
    ("0.75 KL + 0.25 CE", {"distillation": "forward", "exit_label_weight": 0.25}),
    ("0.5 KL + 0.5 CE", {"distillation": "forward", "exit_label_weight": 0.5}),
    ("0.25 KL + 0.75 CE", {"distillation": "forward", "exit_label_weight": 0.75}),
    ("CE", {"distillation": "forward", "exit_label_weight": 1.0}),
    ("reverse KL", {"distillation": "reverse", "exit_label_weight": 0.0}),
)


@dataclasses.dataclass
class Pass:
    """One split at one threshold scale: the packed pass and the sub-classifier inputs, ``(N, L - 1, hidden)``."""

    collected: Collected
    features: torch.Tensor


def exit_inputs(
    model: MagicPyramidForSequenceClassification, encoded: Encoded, scale: float | None, config: TrainConfig
) -> torch.Tensor:
    """``(N, L - 1, hidden)`` float32 sub-classifier inputs of ``encoded`` with hard masks at ``scale`` (None: off),
    computed as ``mp eval``'s passes are: fp32 on the CPU."""
    inference = dataclasses.replace(config, device="cpu", precision="fp32")
    return exit_targets(model, encoded, inference, threshold_scale=scale, progress=False).features


def with_heads(passed: Pass, model: MagicPyramidForSequenceClassification) -> Collected:
    """``passed.collected`` with the exit logits and uncertainty of ``model.exits`` on ``passed.features``."""
    with torch.no_grad():
        logits = apply_exits(model.exits, passed.features.transpose(0, 1), model.config.num_labels).transpose(0, 1)
    return dataclasses.replace(passed.collected, exit_logits=logits.float(), uncertainty=exit_uncertainty(logits))


def exit_accuracy(passed: Pass, model: MagicPyramidForSequenceClassification) -> list[float]:
    """Each sub-classifier's accuracy against the gold labels on ``passed`` (every example, no exiting)."""
    collected = with_heads(passed, model)
    right = collected.exit_logits.argmax(dim=-1) == collected.labels[:, None]
    return right.double().mean(dim=0).tolist()


def score(
    passes: dict[tuple[str, float | None], Pass],
    dense: Collected,
    model: MagicPyramidForSequenceClassification,
    dataset: str,
    split: str,
    taus: tuple[float, ...],
    scales: tuple[float, ...],
) -> list[dict[str, Any]]:
    """``evaluate``'s records with outcomes of every setting on ``split``, with ``model``'s sub-classifiers."""
    scored = {scale: with_heads(passes[split, scale], model) for scale in (None, *scales)}
    return [
        setting_record(dense if method == "dense" else scored[scale], (method, tau, scale), dataset, split, "cpu", True)
        for method, tau, scale in settings(("dense", "ltp", "fastbert", "mp"), taus, scales)
    ]


def report(
    dev: list[dict[str, Any]], test: list[dict[str, Any]], confidence: float | None, splits: int
) -> dict[str, Any]:
    """Each method's dev choice under the rule, its test accuracy drop and FLOPs speedup, and its reliability."""
    by_key = {setting_key(r): r for r in test}
    dense = next(r for r in test if r["method"] == "dense")
    chosen = {}
    for record in select(dev, confidence=confidence):
        if record["method"] == "dense":
            continue
        unseen = by_key[setting_key(record)]
        chosen[record["method"]] = {
            "tau": record["tau"],
            "threshold_scale": record["threshold_scale"],
            "dev_drop": next(r for r in dev if r["method"] == "dense")["accuracy"] - record["accuracy"],
            "dev_flops_speedup": record["flops_speedup"],
            "test_accuracy": unseen["accuracy"],
            "test_drop": dense["accuracy"] - unseen["accuracy"],
            "test_flops_speedup": unseen["flops_speedup"],
        }
    reliability = selection_reliability(dev, test, confidence=confidence, splits=splits)
    return {"chosen": chosen, "reliability": reliability}


def summary_line(name: str, rule: dict[str, Any], seconds: float) -> str:
    """One line of a variant: MP's and FastBERT's choice on test under ``rule``, and MP's reliability."""
    mp, fastbert = rule["chosen"]["mp"], rule["chosen"]["fastbert"]
    again = rule["reliability"]["mp"]
    return (
        f"{name:<28} MP {mp['test_flops_speedup']:.2f}x at {100 * mp['test_drop']:+.2f} on test "
        f"(dev {mp['dev_flops_speedup']:.2f}x); FastBERT {fastbert['test_flops_speedup']:.2f}x at "
        f"{100 * fastbert['test_drop']:+.2f}; MP within the limit in {100 * again['within_limit']:.0f} % of "
        f"re-splits, median {again['median_flops_speedup']:.2f}x ({seconds:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished `mp train` run")
    parser.add_argument("--out", type=Path, default=SWEEPS_DIR / "exit-loss-cpu.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs-exits", type=float, nargs="*", default=[], help="also each variant at these epochs")
    parser.add_argument("--taus", type=float, nargs="+", default=list(DEFAULT_TAUS), help="exit thresholds swept")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES), help="threshold scales")
    parser.add_argument("--reliability-splits", type=int, default=200, help="re-splits of selection_reliability")
    parser.add_argument(
        "--variants", nargs="+", choices=[name for name, _ in VARIANTS], help="only these losses (default: all)"
    )
    parser.add_argument(
        "--cache-precision",
        choices=("run", "fp32", "bf16"),
        default="run",
        help="arithmetic of step 1's cache of the distillation examples ('run': the run's own, as mp train)",
    )
    parser.add_argument(
        "--cache-scales",
        type=threshold_scale,
        nargs="+",
        help="also each loss trained on the cache at these threshold scales ('none': unpruned) instead of the run's "
        "(TrainConfig.exit_scales), in the same steps",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    meta = provenance(command="python -m bench.exit_loss_sweep " + command)  # the code as it starts
    dense_model, final, tokenizer, saved = load_run(args.run_dir)
    # A run saved before exit_scales existed cached its distillation examples at scale 1.0 only.
    config = TrainConfig(**({"exit_scales": [1.0]} | saved))
    data = load_data(config)
    splits = {"dev": data.dev, "test": encode(tokenizer, data.dataset.split("test"), config.max_length)}
    stage3 = load_model(stage_dir(args.run_dir, 3)).eval()
    cached = config if args.cache_precision == "run" else dataclasses.replace(config, precision=args.cache_precision)
    labelled = len(data.train["labels"])
    caches = {"run": distillation_cache(stage3, data.exit_train, cached, labelled=labelled, progress=False)}
    if args.cache_scales:
        other = dataclasses.replace(cached, exit_scales=tuple(args.cache_scales))
        caches["scales"] = distillation_cache(stage3, data.exit_train, other, labelled=labelled, progress=False)
    taus, scales = tuple(args.taus), tuple(args.scales)
    passes: dict[tuple[str, float | None], Pass] = {}
    dense: dict[str, Collected] = {}
    checks: dict[str, dict[str, float]] = {}
    for split, encoded in splits.items():
        dense[split] = collect(dense_model, encoded, batch_size=config.eval_batch_size, device="cpu", prune=False)
        for scale in (None, *scales):
            collected = collect(
                final,
                encoded,
                batch_size=config.eval_batch_size,
                device="cpu",
                prune=scale is not None,
                threshold_scale=1.0 if scale is None else scale,
            )
            passed = Pass(collected, exit_inputs(final, encoded, scale, config))
            again = with_heads(passed, final)
            checks[f"{split} {scale}"] = {
                "max_exit_logit_error": float((again.exit_logits - collected.exit_logits).abs().max()),
                "exit_argmax_agreement": float(
                    (again.exit_logits.argmax(-1) == collected.exit_logits.argmax(-1)).double().mean()
                ),
            }
            passes[split, scale] = passed
        print(f"{split}: passes done at {time.perf_counter() - begin:.0f} s", flush=True)
    losses = [(name, changes) for name, changes in VARIANTS if args.variants is None or name in args.variants]
    epochs = [None, *args.epochs_exits]  # None: the run's
    named = ", ".join("unpruned" if scale is None else f"{scale:g}" for scale in args.cache_scales or ())
    variants = [
        (
            name + (f", scales {named}" if cache == "scales" else "") + ("" if n is None else f", {n:g} epochs"),
            changes | ({} if n is None else {"epochs_exits": n}),
            cache,
        )
        for cache in caches
        for n in epochs
        for name, changes in losses
        if n is None or name != "reverse KL"
    ]
    results = []
    for name, changes, cache in variants:
        model = copy.deepcopy(stage3)
        variant = dataclasses.replace(config, **changes)
        fit_exits(model, caches[cache], variant, seed=config.seed * 100 + 4, progress=False)
        pairs = zip(model.exits.state_dict().values(), final.exits.state_dict().values(), strict=True)
        reproduces = all(torch.equal(a, b) for a, b in pairs)
        records = {
            split: score(passes, dense[split], model, data.dataset.name, split, taus, scales) for split in splits
        }
        rules = {
            f"confidence {DEFAULT_CONFIDENCE}": report(*records.values(), DEFAULT_CONFIDENCE, args.reliability_splits),
            "point estimate": report(*records.values(), None, args.reliability_splits),
        }
        accuracy = {split: exit_accuracy(passes[split, 1.0 if 1.0 in scales else None], model) for split in splits}
        results.append(
            {
                "variant": name,
                "changes": changes,
                "cache_scales": list(config.exit_scales if cache == "run" else args.cache_scales),
                "reproduces_run": reproduces,
                "exit_accuracy": accuracy,
                "rules": rules,
            }
        )
        print(summary_line(name, rules[f"confidence {DEFAULT_CONFIDENCE}"], time.perf_counter() - begin), flush=True)
    meta.update(
        run_dir=str(args.run_dir),
        dataset=data.dataset.name,
        examples={split: len(encoded["labels"]) for split, encoded in splits.items()},
        distillation_examples=caches["run"].labels.numel() // caches["run"].passes,
        exit_scales=list(config.exit_scales),
        cache_arithmetic=cached.arithmetic,
        taus=list(taus),
        scales=list(scales),
        pass_checks=checks,
        seconds=time.perf_counter() - begin,
    )
    write_results(args.out, results, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
