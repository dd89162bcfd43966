"""The optimisation loop of the recipe's stages 1-3, ``fit`` (resumable from a partial checkpoint), and the pieces
stage 4 (``mp_model.recipe.fit_exits``) shares with it: schedules, weight groups, trainable parameters, the
distillation loss and the divergence check. See ``mp_model.recipe.training``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.outputs import MagicPyramidTrainingOutput
from mp_model.recipe.data import Encoded, batches
from mp_model.recipe.runs import CHECKPOINT_FILE, PROGRESS_FILE, TrainingWarning, sha256, write_json
from mp_model.recipe.train_config import TrainConfig

Callback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class StageSpec:
    """One training stage: which parameters learn, with which masks and objective, for how long."""

    number: int
    name: str
    epochs: float
    mask_mode: str
    objective: str
    lambda_: float = 0.0


def stage_loss(
    model: MagicPyramidForSequenceClassification,
    stage: StageSpec,
    batch: dict[str, torch.Tensor],
    config: TrainConfig,
    teacher: torch.Tensor | None = None,
) -> tuple[MagicPyramidTrainingOutput, torch.Tensor]:
    """The forward pass of one training step of ``stage`` under ``config.autocast()``, and its scalar fp32 loss:
    cross-entropy of the ``(batch, labels)`` logits with ``batch["labels"]``, plus ``lambda_`` times the mean soft
    mask for the ``"soft"`` objective. With ``teacher`` (``(batch, labels)`` logits of the dense model on the same
    examples), the cross-entropy becomes ``(1 - w) * CE + w * KL(p_teacher || p)`` at ``w =
    config.prune_teacher_weight``. The ``"joint"`` objective adds the sub-classifiers' mean ``distillation_loss`` (in
    ``config.distillation``'s direction) to ``teacher``, or to the main classifier's detached logits without one.
    Returns ``(masked_forward output, loss)``."""
    with config.autocast():
        out = model.masked_forward(
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            mask_mode=stage.mask_mode,
            temperature=config.temperature,
        )
        loss = F.cross_entropy(out.logits.float(), batch["labels"])
        if teacher is not None:
            weight = config.prune_teacher_weight
            loss = (1.0 - weight) * loss + weight * distillation_loss(out.logits.unsqueeze(0), teacher)
        if stage.objective == "soft":
            loss = loss + stage.lambda_ * out.mask_mean.float()
        if stage.objective == "joint" and out.exit_logits.shape[0]:
            target = out.logits if teacher is None else teacher
            exits = distillation_loss(out.exit_logits, target, config.distillation) / out.exit_logits.shape[0]
            loss = loss + exits
    return out, loss


def step_counts(epochs: float, examples: int, batch_size: int) -> tuple[int, int]:
    """``(steps per epoch, total steps)`` of ``epochs`` (fractions allowed; at least one step if positive)."""
    per_epoch = math.ceil(examples / batch_size)
    total = math.ceil(epochs * per_epoch) if epochs > 0 else 0
    return per_epoch, total


def keeps_epoch(dev_accuracy: float, best: float | None) -> bool:
    """Whether an epoch scoring ``dev_accuracy`` replaces the best kept so far (``best``; ``None``: none yet): every
    loop that keeps its epoch of best dev accuracy (the recipe's stages, ``mp reference``) keeps the later on a tie."""
    return best is None or dev_accuracy >= best


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def weight_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on biases and LayerNorm weights."""
    no_decay = [p for name, p in named if name.endswith("bias") or "LayerNorm" in name]
    decay = [p for name, p in named if not (name.endswith("bias") or "LayerNorm" in name)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def optimizer_groups(named: list[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> list[dict[str, Any]]:
    """``weight_groups`` of ``named`` at ``config.lr``, except the sub-classifiers', which get groups of their own
    at ``config.exit_lr`` (they start untrained; the ``"joint"`` objective)."""
    heads = [(name, p) for name, p in named if name.startswith("exits.")]
    rest = [(name, p) for name, p in named if not name.startswith("exits.")]
    groups = [group | {"lr": config.lr} for group in weight_groups(rest, config.weight_decay)]
    if heads:
        groups += [group | {"lr": config.exit_lr} for group in weight_groups(heads, config.weight_decay)]
    return groups


def set_trainable(model: MagicPyramidForSequenceClassification, objective: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Switch ``requires_grad`` for ``objective`` and return the weights the AdamW optimizer trains.

    ``ce``/``soft``: everything but the sub-classifiers and thresholds (``soft`` also switches the thresholds on,
    trained by their own optimizer); ``distill``: the sub-classifiers only; ``joint``: everything but the
    thresholds.
    """
    for name, parameter in model.named_parameters():
        if objective == "distill":
            parameter.requires_grad_(name.startswith("exits."))
        elif objective == "joint":
            parameter.requires_grad_(name != "thresholds")
        else:
            parameter.requires_grad_(not name.startswith("exits.") and name != "thresholds")
    model.thresholds.requires_grad_(objective == "soft")
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and name != "thresholds"]


def distillation_loss(
    exit_logits: torch.Tensor, main_logits: torch.Tensor, direction: str = "forward", *, reduce: bool = True
) -> torch.Tensor:
    """Sum over sub-classifiers ``l`` of a KL divergence to the main classifier, averaged over the batch.

    ``direction="forward"``: ``KL(p_main || p_l)`` (Hinton's knowledge distillation: mass-covering, the student
    keeps the teacher's doubt); ``"reverse"``: ``KL(p_l || p_main)`` (FastBERT's stated loss: mode-seeking, which
    left our students over-confident; see ``TrainConfig.distillation``). ``p_main`` is detached.
    ``exit_logits`` ``(layers - 1, batch, labels)``, ``main_logits`` ``(batch, labels)``; ``reduce=False``
    returns the ``(batch,)`` per-example sums instead of their mean.
    """
    student = exit_logits.float().log_softmax(dim=-1)
    teacher = main_logits.detach().float().log_softmax(dim=-1).unsqueeze(0)
    if direction == "forward":
        per_example = (teacher.exp() * (teacher - student)).sum(dim=-1).sum(dim=0)
    elif direction == "reverse":
        per_example = (student.exp() * (student - teacher)).sum(dim=-1).sum(dim=0)
    else:
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    return per_example.mean() if reduce else per_example


def finite_loss(loss: torch.Tensor, where: str, step: int, module: torch.nn.Module) -> float:
    """``loss`` (a scalar tensor) as a Python float, or a ``ValueError`` naming ``where`` and ``step`` if it is NaN or
    infinite: training has diverged, and every later step would only carry the NaN into the weights."""
    value = float(loss.detach())
    if not math.isfinite(value):
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
        raise ValueError(
            f"{where}: the training loss is {value} at step {step} (weights in {', '.join(dtypes)}): training "
            "diverged; lower the learning rate, or check the starting model's weights"
        )
    return value


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


def _new_totals() -> dict[str, float]:
    """Zeroed running sums of an epoch: example-weighted loss, correct predictions, per-batch kept ratios, and
    the counts of examples and batches they are over."""
    return {"loss": 0.0, "correct": 0.0, "kept": 0.0, "examples": 0, "batches": 0}


def _restore_rng(saved: dict[str, Any], device: torch.device) -> None:
    """Restore a checkpoint's generator states: the CPU's, and on CUDA the device's (dropout draws from it there).
    Both setters take CPU byte tensors, whatever ``map_location`` the checkpoint was loaded with."""
    torch.set_rng_state(saved["rng"].cpu())
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)


def _load_checkpoint(partial: Path, device: torch.device) -> dict[str, Any] | None:
    """The partial checkpoint in ``partial`` if it is whole; ``None`` if there is none.

    A checkpoint without a recorded SHA-256, not matching it, not loading, or lacking part of the trainer's state
    (one written before the epoch's running totals were saved with it) is deleted with a ``TrainingWarning`` (its
    stage then restarts from its start), as is a leftover temporary file.
    """
    checkpoint = partial / CHECKPOINT_FILE
    checkpoint.with_suffix(".tmp").unlink(missing_ok=True)
    if not checkpoint.exists():
        return None
    problem = None
    try:
        recorded = json.loads((partial / PROGRESS_FILE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded is None:
        problem = f"no readable {PROGRESS_FILE} with its SHA-256"
    elif sha256(checkpoint) != recorded:
        problem = "its SHA-256 does not match the recorded one"
    else:
        try:
            saved = torch.load(checkpoint, map_location=device, weights_only=False)
            if not isinstance(saved, dict) or not {"stage", "seed", "step", "model", "rng", "totals"} <= set(saved):
                problem = "it lacks the trainer's state"
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a damaged file
            problem = f"it does not load ({type(error).__name__}: {error})"
    if problem is None:
        return saved
    warnings.warn(
        f"discarding the partial checkpoint {checkpoint} ({problem}); the stage restarts from its start",
        TrainingWarning,
        stacklevel=3,
    )
    shutil.rmtree(partial, ignore_errors=True)
    return None


def fit(
    model: MagicPyramidForSequenceClassification,
    stage: StageSpec,
    train: Encoded,
    config: TrainConfig,
    *,
    seed: int,
    partial: Path | None = None,
    callback: Callback | None = None,
    progress: bool = True,
    evaluate: Callable[[], dict[str, float]] | None = None,
    teacher: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place through stage 1, 2 or 3 (or stage 4's joint phase); returns the last epoch's running
    loss, accuracy, kept ratio.

    ``teacher``: ``(len(train), labels)`` logits of the dense model on ``train`` for ``stage_loss`` (None: labels
    only).

    With ``evaluate`` (the model's dev metrics, ``dev_accuracy`` among them), it is called after every epoch (and
    after the last step) and the model ends with the weights of the most accurate call (ties: the later, more
    trained); that call's metrics, ``epoch_dev_accuracy`` and ``best_epoch`` join the returned metrics. With
    ``partial`` (a folder), a checkpoint is written there every ``config.checkpoint_every`` steps (the best weights
    so far and the epoch's running totals with it) and one found there for the same stage is resumed;
    ``callback("checkpoint", info)`` follows each write.
    """
    device = torch.device(config.device)
    model.to(device)
    named = set_trainable(model, stage.objective)
    optimizer = torch.optim.AdamW(optimizer_groups(named, config), lr=config.lr)
    examples = len(train["labels"])
    per_epoch, total = step_counts(stage.epochs, examples, config.batch_size)
    scheduler = linear_schedule(optimizer, math.ceil(config.warmup_ratio * total), total)
    threshold_optimizer = (
        torch.optim.Adam([model.thresholds], lr=config.threshold_lr, weight_decay=0.0)
        if stage.objective == "soft"
        else None
    )
    teacher = None if teacher is None else teacher.to(device)
    torch.manual_seed(seed)
    step = 0
    # The best evaluation so far: {"metrics", "epoch", "model"} (a CPU copy), and every evaluation's accuracy.
    best: dict[str, Any] | None = None
    evaluations: list[float] = []
    # The running sums of the current epoch, which the returned train_* metrics average: checkpointed with the
    # weights, so that a resumed stage reports the same metrics as an uninterrupted one.
    totals = _new_totals()
    checkpoint = partial / CHECKPOINT_FILE if partial is not None else None
    saved = _load_checkpoint(partial, device) if partial is not None else None
    if saved is not None:
        if saved["stage"] == stage.number and saved["seed"] == seed:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if threshold_optimizer is not None:
                threshold_optimizer.load_state_dict(saved["threshold_optimizer"])
            _restore_rng(saved, device)
            step = saved["step"]
            best, evaluations = saved.get("best"), list(saved.get("evaluations", []))
            totals = dict(saved["totals"])

    model.train()
    bar = tqdm(total=total, initial=step, desc=f"stage {stage.number} {stage.name}", disable=not progress, leave=False)
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        if skip == 0:
            totals = _new_totals()
        epoch_batches = batches(train, config.batch_size, shuffle=True, seed=seed * 1000 + epoch, sort_by_length=True)
        for batch in itertools.islice(epoch_batches, skip, None):
            if step >= total:
                break
            batch = _to_device(batch, device)
            batch_teacher = None if teacher is None else teacher[batch["index"]]
            out, loss = stage_loss(model, stage, batch, config, batch_teacher)
            correct = (out.logits.argmax(dim=-1) == batch["labels"]).sum()
            optimizer.zero_grad(set_to_none=True)
            if threshold_optimizer is not None:
                threshold_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if threshold_optimizer is not None:
                threshold_optimizer.step()
            step += 1
            size = batch["labels"].numel()
            totals["loss"] += finite_loss(loss, f"stage {stage.number} {stage.name}", step, model) * size
            totals["correct"] += float(correct)
            totals["kept"] += float(out.kept_ratio.mean())
            totals["examples"] += size
            totals["batches"] += 1
            bar.update(1)
            bar.set_postfix(
                loss=f"{totals['loss'] / totals['examples']:.4f}",
                acc=f"{totals['correct'] / totals['examples']:.3f}",
                kept=f"{totals['kept'] / totals['batches']:.3f}",
            )
            if evaluate is not None and (step % per_epoch == 0 or step == total):
                measured = dict(evaluate())
                model.train()
                evaluations.append(float(measured["dev_accuracy"]))
                if keeps_epoch(evaluations[-1], None if best is None else best["metrics"]["dev_accuracy"]):
                    weights = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
                    best = {"metrics": measured, "epoch": len(evaluations), "model": weights}
            if checkpoint is not None and config.checkpoint_every > 0 and step % config.checkpoint_every == 0:
                if step < total:
                    partial.mkdir(parents=True, exist_ok=True)
                    payload = {
                        "stage": stage.number,
                        "seed": seed,
                        "step": step,
                        "epoch": step // per_epoch,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "threshold_optimizer": threshold_optimizer.state_dict() if threshold_optimizer else None,
                        "rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "best": best,
                        "evaluations": evaluations,
                        "totals": dict(totals),
                    }
                    torch.save(payload, checkpoint.with_suffix(".tmp"))
                    os.replace(checkpoint.with_suffix(".tmp"), checkpoint)
                    progress_info = {"stage": stage.number, "step": step, "total": total, "sha256": sha256(checkpoint)}
                    write_json(partial / PROGRESS_FILE, progress_info)
                    if callback is not None:
                        callback("checkpoint", {"stage": stage.number, "step": step, "total": total})
    bar.close()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    count = max(1, totals["examples"])
    metrics: dict[str, Any] = {
        "train_loss": totals["loss"] / count,
        "train_accuracy": totals["correct"] / count,
        "train_kept_ratio": totals["kept"] / max(1, totals["batches"]),
        "steps": total,
    }
    if best is not None:
        if best["epoch"] < len(evaluations):
            model.load_state_dict(best["model"])
        metrics |= best["metrics"] | {"epoch_dev_accuracy": evaluations, "best_epoch": best["epoch"]}
    return metrics
