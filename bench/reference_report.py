"""A run's plain fine-tune (``mp reference``) scored on dev and test beside the recipe's dense model of a committed
``mp eval`` results file, for a reference trained apart from the run (``mp eval`` reports it itself when the
reference sits in the run directory).

    python -m bench.reference_report --run-dir runs/bbc_news-reference \\
        --recipe bench/results/archive/evaluations/bbc_news-all-cpu.json \\
        --out bench/results/archive/evaluations/bbc_news-reference-cpu.json

The reference must have been trained with the recipe run's stage-1 data and budget
(``mp_model.recipe.reference.stage1_differences`` empty): otherwise the script stops. Records: one per split,
``{"dataset", "split", "examples", "reference_accuracy", "recipe_dense_accuracy", "difference"}`` (``difference``
= recipe - reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.provenance import provenance, write_results
from mp_model.recipe.cli_support import quiet_transformers, use_threads
from mp_model.recipe.data import encode
from mp_model.recipe.datasets import load_dataset
from mp_model.recipe.reference import REFERENCE_DIR, REFERENCE_FILE, accuracy, load_reference, stage1_differences


def recipe_dense(payload: dict[str, Any]) -> dict[str, float]:
    """``{split: accuracy}`` of the dense record of an ``mp eval`` results file (its reported and selection
    splits)."""
    dense = next((r for r in payload["records"] if r["method"] == "dense"), None)
    if dense is None:
        raise ValueError("the recipe results file has no dense record")
    scores = {dense["split"]: dense["accuracy"]}
    if dense.get("selected_on") and dense.get("dev_accuracy") is not None:
        scores[dense["selected_on"]] = dense["dev_accuracy"]
    return scores


def report(run_dir: Path, recipe_path: Path, *, device: str, batch_size: int) -> tuple[list[dict[str, Any]], dict]:
    """Score the reference of ``run_dir`` on the splits of ``recipe_path``'s dense record; records and metadata."""
    recipe = json.loads(recipe_path.read_text())
    saved_path = Path(run_dir) / REFERENCE_FILE
    if not saved_path.is_file():
        raise ValueError(f"{run_dir} has no reference: run `mp reference --run-dir {run_dir}` first")
    made_with = json.loads(saved_path.read_text())["train_config"]
    changed = stage1_differences(made_with, recipe["provenance"]["train_config"])
    if changed:
        raise ValueError(f"the reference and the recipe run differ in stage-1 settings: {', '.join(changed)}")
    loaded = load_reference(run_dir, device)
    if loaded is None:
        raise ValueError(f"{run_dir / REFERENCE_DIR} holds no model: rerun `mp reference --run-dir {run_dir}`")
    model, saved = loaded
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(run_dir) / REFERENCE_DIR)
    dataset = load_dataset(
        made_with["dataset"], seed=made_with["seed"], dev_from_train=made_with.get("dev_from_train", 0)
    )
    records = []
    for split, dense in recipe_dense(recipe).items():
        examples = dataset.split(split)
        score = accuracy(
            model, encode(tokenizer, examples, made_with["max_length"]), batch_size=batch_size, device=device
        )
        records.append(
            {
                "dataset": dataset.name,
                "split": split,
                "examples": len(examples),
                "reference_accuracy": score,
                "recipe_dense_accuracy": dense,
                "difference": dense - score,
            }
        )
    meta = {
        "run_dir": str(Path(run_dir).resolve()),
        "reference": {k: v for k, v in saved.items() if k != "train_config"},
        "reference_train_config": made_with,
        "recipe_results": str(recipe_path),
        "recipe_provenance": {k: recipe["provenance"].get(k) for k in ("git_commit", "date", "command", "cpu")},
        "recipe_training_arithmetic": recipe["provenance"].get("training_arithmetic"),
    }
    return records, meta


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a run directory holding reference/")
    parser.add_argument("--recipe", type=Path, required=True, help="the recipe run's `mp eval --json` file")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    quiet_transformers()
    try:
        use_threads(args.threads)
        records, meta = report(args.run_dir, args.recipe, device="cpu", batch_size=args.batch_size)
    except (ValueError, OSError, KeyError) as error:
        print(f"reference_report: {error}", file=sys.stderr)
        return 2
    for record in records:
        print(
            f"{record['split']} ({record['examples']}): reference {record['reference_accuracy']:.4f}, "
            f"recipe dense {record['recipe_dense_accuracy']:.4f}, difference {record['difference']:+.4f}"
        )
    path = write_results(args.out, records, provenance("cpu") | meta)
    print(f"wrote {len(records)} records to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
