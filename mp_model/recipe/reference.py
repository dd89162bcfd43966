"""The dense reference: a plain fine-tune of HF ``BertForSequenceClassification`` with a run's data and budget.

``mp eval`` reports it beside the recipe's models, so that a user sees the recipe's dense model (stage 1) reach a
plain fine-tune, and stages 2-4 lose no more than the selection limit from it. The loop is deliberately independent
of ``mp_model.recipe.fit``'s training loop (it shares only fit's schedule helpers and best-epoch rule): it trains the
``transformers`` class itself (no masks, no thresholds, no exits), with the run's training examples, batch size,
AdamW groups, warm-up and linear decay and stage-1 epochs, over a grid of learning rates (default: the run's ``lr``
alone), and keeps the ``(lr, epoch)`` with the best dev accuracy (ties: the later epoch, by stage 1's rule
``keeps_epoch``, and the earlier learning rate). It is written to ``<run>/reference`` with ``reference.json``
(metrics of every grid point).

``mp reference --run-dir runs/rotten_tomatoes --lrs 2e-5 5e-5 1e-4`` trains it for a run (the run's
``train_config.json`` gives the data and budget; no stage need be done).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mp_model.permissions import apply_umask
from mp_model.recipe.checks import check_float
from mp_model.recipe.cli_support import use_threads
from mp_model.recipe.data import Encoded, batches
from mp_model.recipe.fit import keeps_epoch, linear_schedule, step_counts, weight_groups
from mp_model.recipe.runs import CONFIG_FILE, model_folder_problem, read_json_object, write_json
from mp_model.recipe.train_config import TrainConfig
from mp_model.recipe.training import load_data

REFERENCE_DIR = "reference"
REFERENCE_FILE = "reference.json"

# The settings stage 1 (and so the reference, its plain twin) depends on; the later stages' do not concern it.
STAGE1_FIELDS = (
    "model",
    "dataset",
    "seed",
    "max_length",
    "batch_size",
    "train_size",
    "dev_size",
    "dev_from_train",
    "lr",
    "weight_decay",
    "warmup_ratio",
    "epochs_finetune",
)


def stage1_differences(reference: dict[str, Any], recipe: dict[str, Any]) -> list[str]:
    """The ``STAGE1_FIELDS`` on which two ``train_config`` dictionaries differ; a field one of them lacks (saved
    before it existed) counts as ``TrainConfig``'s default, which keeps the earlier behaviour."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return [name for name in STAGE1_FIELDS if reference.get(name, defaults[name]) != recipe.get(name, defaults[name])]


@torch.inference_mode()
def accuracy(model: torch.nn.Module, encoded: Encoded, *, batch_size: int, device: torch.device | str) -> float:
    """Accuracy of an HF sequence classifier (``model(input_ids, attention_mask, token_type_ids).logits``)."""
    model.eval().to(device)
    correct = 0
    for batch in batches(encoded, batch_size, sort_by_length=True):
        logits = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            token_type_ids=batch["token_type_ids"].to(device),
        ).logits
        correct += int((logits.argmax(dim=-1).cpu() == batch["labels"]).sum())
    return correct / max(1, len(encoded["labels"]))


def _fine_tune(
    config: TrainConfig, data: Any, lr: float, *, progress: bool
) -> tuple[torch.nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """One learning rate: train, evaluate dev after each epoch; returns the kept epoch's model (``keeps_epoch``), that
    epoch's record and every epoch's."""
    from transformers import BertForSequenceClassification

    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    labels = data.dataset.labels
    model = BertForSequenceClassification.from_pretrained(
        config.model,
        dtype=torch.float32,  # as the recipe's stage 1: fp32 master weights from any checkpoint
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    ).to(device)
    optimizer = torch.optim.AdamW(weight_groups(list(model.named_parameters()), config.weight_decay), lr=lr)
    per_epoch, total = step_counts(config.epochs_finetune, len(data.train["labels"]), config.batch_size)
    scheduler = linear_schedule(optimizer, math.ceil(config.warmup_ratio * total), total)
    epochs: list[dict[str, Any]] = []
    best: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None
    step = 0
    bar = tqdm(total=total, desc=f"reference lr={lr:g}", disable=not progress, leave=False)
    for epoch in range(math.ceil(total / per_epoch)):
        model.train()
        order = batches(
            data.train, config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch, sort_by_length=True
        )
        for batch in order:
            if step >= total:
                break
            with config.autocast():
                logits = model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    token_type_ids=batch["token_type_ids"].to(device),
                ).logits
            loss = F.cross_entropy(logits.float(), batch["labels"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
        dev = accuracy(model, data.dev, batch_size=config.eval_batch_size, device=device)
        epochs.append({"lr": lr, "epoch": epoch + 1, "steps": step, "dev_accuracy": dev})
        if keeps_epoch(dev, None if best is None else best[0]["dev_accuracy"]):
            best = (epochs[-1], copy.deepcopy(model.state_dict()))
    bar.close()
    if best is None:
        raise ValueError("the reference trained no epoch: epochs_finetune must be > 0")
    model.load_state_dict(best[1])
    return model, best[0], epochs


def train_reference(
    config: TrainConfig, *, lrs: Sequence[float] | None = None, progress: bool = True
) -> dict[str, Any]:
    """Fine-tune the reference over ``lrs`` (default ``(config.lr,)``); save the best to ``<run>/reference``.

    Returns (and writes to ``<run>/reference.json``) ``{"lr", "epoch", "dev_accuracy", "grid", "seconds",
    "arithmetic", "train_config", "train_examples", "dev_examples"}``; ``grid`` lists every ``(lr, epoch)``'s dev
    accuracy, ``arithmetic`` is ``"bf16"`` (autocast) or ``"fp32"``.
    """
    grid_lrs = (config.lr,) if lrs is None else tuple(check_float("lrs", lr, positive=True) for lr in lrs)
    if not grid_lrs:
        raise ValueError("lrs must name at least one learning rate")
    target = config.directory / REFERENCE_DIR
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a folder: move it away, then run mp reference again")
    data = load_data(config)
    start = time.perf_counter()
    grid: list[dict[str, Any]] = []
    best_model, best_point = None, None
    for lr in grid_lrs:
        model, point, epochs = _fine_tune(config, data, lr, progress=progress)
        grid += epochs
        if best_point is None or point["dev_accuracy"] > best_point["dev_accuracy"]:
            best_model, best_point = model, point
    assert best_model is not None and best_point is not None  # grid_lrs is not empty
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        best_model.save_pretrained(tmp)
        data.tokenizer.save_pretrained(tmp)
        apply_umask(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "model_class": "transformers.BertForSequenceClassification",
        **{k: best_point[k] for k in ("lr", "epoch", "dev_accuracy")},
        "grid": grid,
        "seconds": time.perf_counter() - start,
        "arithmetic": config.arithmetic,
        "train_config": config.to_dict(),
        "train_examples": len(data.train["labels"]),
        "dev_examples": len(data.dev["labels"]),
    }
    write_json(config.directory / REFERENCE_FILE, result)
    return result


def load_reference(run_dir: Path, device: torch.device | str) -> tuple[torch.nn.Module, dict[str, Any]] | None:
    """The run's reference model (eval mode, on ``device``) and its ``reference.json``; ``None`` if it has none."""
    folder = Path(run_dir) / REFERENCE_DIR
    if model_folder_problem(folder) is not None or not (Path(run_dir) / REFERENCE_FILE).is_file():
        return None
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(folder, attn_implementation="eager").to(device).eval()
    return model, read_json_object(Path(run_dir) / REFERENCE_FILE)


def run_reference(args: argparse.Namespace) -> int:
    """``mp reference --run-dir D [--lrs ...]``: train run ``D``'s plain fine-tune; prints its result."""
    path = args.run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: start the run with `mp train --run-dir {args.run_dir}` first")
    use_threads(args.threads)
    config = TrainConfig.from_dict(read_json_object(path) | {"run_dir": str(args.run_dir)})
    result = train_reference(config, lrs=args.lrs, progress=not args.no_progress)
    print(json.dumps({k: v for k, v in result.items() if k != "grid"}))
    return 0
