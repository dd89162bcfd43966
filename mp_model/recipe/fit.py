"""The optimisation loops of the recipe: ``fit`` (stages 1-3, resumable from a partial checkpoint) and stage 4's
``exit_targets`` cache and ``fit_exits`` (sub-classifier self-distillation on it). See ``mp_model.recipe.training``.
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

from mp_model.exit_head import apply_exits
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.outputs import MagicPyramidTrainingOutput
from mp_model.recipe.data import Encoded, batches
from mp_model.recipe.runs import CHECKPOINT_FILE, PROGRESS_FILE, TrainingWarning, sha256, write_json
from mp_model.recipe.train_config import TrainConfig

# The label of a distillation example that stage 4 may not train on (beyond ``TrainConfig.train_size``).
UNLABELLED = -1

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
    config.prune_teacher_weight``. Returns ``(masked_forward output, loss)``."""
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
    return out, loss


def step_counts(epochs: float, examples: int, batch_size: int) -> tuple[int, int]:
    """``(steps per epoch, total steps)`` of ``epochs`` (fractions allowed; at least one step if positive)."""
    per_epoch = math.ceil(examples / batch_size)
    total = math.ceil(epochs * per_epoch) if epochs > 0 else 0
    return per_epoch, total


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


def _set_trainable(
    model: MagicPyramidForSequenceClassification, objective: str
) -> list[tuple[str, torch.nn.Parameter]]:
    """Switch ``requires_grad`` for ``objective`` and return the weights the AdamW optimizer trains.

    ``ce``/``soft``: everything but the sub-classifiers and thresholds (``soft`` also switches the thresholds on,
    trained by their own optimizer); ``distill``: the sub-classifiers only.
    """
    for name, parameter in model.named_parameters():
        if objective == "distill":
            parameter.requires_grad_(name.startswith("exits."))
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


def exit_loss(
    exit_logits: torch.Tensor,
    main_logits: torch.Tensor,
    labels: torch.Tensor,
    direction: str = "forward",
    label_weight: float = 0.0,
) -> torch.Tensor:
    """Stage 4's loss: per example ``(1 - label_weight) * KL + label_weight * CE``, averaged over the batch.

    ``KL`` is ``distillation_loss``'s per-example sum over sub-classifiers; ``CE`` the sum over sub-classifiers of
    the cross-entropy to the gold label. An example whose label is ``UNLABELLED`` (-1: beyond ``train_size``,
    distilled but not labelled for training) takes ``KL`` alone. ``exit_logits`` ``(layers - 1, batch, labels)``,
    ``main_logits`` ``(batch, labels)``, ``labels`` ``(batch,)`` int64; ``label_weight`` in [0, 1].
    """
    if not 0.0 <= label_weight <= 1.0:
        raise ValueError(f"label_weight must be in [0, 1], got {label_weight}")
    kl = distillation_loss(exit_logits, main_logits, direction, reduce=False)
    if label_weight == 0.0:
        return kl.mean()
    labelled = labels != UNLABELLED
    student = exit_logits.float().log_softmax(dim=-1)
    index = labels.clamp(min=0).view(1, -1, 1).expand(student.shape[0], -1, 1)
    cross_entropy = -student.gather(-1, index)[..., 0].sum(dim=0)
    weight = labelled.float() * label_weight
    return ((1.0 - weight) * kl + weight * cross_entropy).mean()


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


def _restore_rng(saved: dict[str, Any], device: torch.device) -> None:
    """Restore a checkpoint's generator states: the CPU's, and on CUDA the device's (dropout draws from it there).
    Both setters take CPU byte tensors, whatever ``map_location`` the checkpoint was loaded with."""
    torch.set_rng_state(saved["rng"].cpu())
    if device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)


def _load_checkpoint(partial: Path, device: torch.device) -> dict[str, Any] | None:
    """The partial checkpoint in ``partial`` if it is whole; ``None`` if there is none.

    A checkpoint without a recorded SHA-256, not matching it, or not loading is deleted with a
    ``TrainingWarning`` (its stage then restarts from its start), as is a leftover temporary file.
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
            if not isinstance(saved, dict) or not {"stage", "seed", "step", "model", "rng"} <= set(saved):
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
    """Train ``model`` in place through stage 1, 2 or 3; returns the last epoch's running loss, accuracy, kept ratio.

    ``teacher``: ``(len(train), labels)`` logits of the dense model on ``train`` for ``stage_loss`` (None: labels
    only).

    With ``evaluate`` (the model's dev metrics, ``dev_accuracy`` among them), it is called after every epoch (and
    after the last step) and the model ends with the weights of the most accurate call (ties: the later, more
    trained); that call's metrics, ``epoch_dev_accuracy`` and ``best_epoch`` join the returned metrics. With
    ``partial`` (a folder), a checkpoint is written there every ``config.checkpoint_every`` steps (the best weights
    so far with it) and one found there for the same stage is resumed; ``callback("checkpoint", info)`` follows
    each write.
    """
    device = torch.device(config.device)
    model.to(device)
    named = _set_trainable(model, stage.objective)
    optimizer = torch.optim.AdamW(weight_groups(named, config.weight_decay), lr=config.lr)
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

    model.train()
    totals = {"loss": 0.0, "correct": 0.0, "kept": 0.0, "examples": 0, "batches": 0}
    bar = tqdm(total=total, initial=step, desc=f"stage {stage.number} {stage.name}", disable=not progress, leave=False)
    while step < total:
        epoch, skip = divmod(step, per_epoch)
        if skip == 0:
            totals = {"loss": 0.0, "correct": 0.0, "kept": 0.0, "examples": 0, "batches": 0}
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
                if best is None or evaluations[-1] >= best["metrics"]["dev_accuracy"]:
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


@dataclass
class ExitTargets:
    """Stage 4's cache: what the frozen backbone gives each distillation example.

    Attributes:
        features: ``(N, layers - 1, hidden)`` float32, each sub-classifier's input (mean of the live tokens).
        teacher: ``(N, labels)`` float32 main-classifier logits.
        labels: ``(N,)`` int64 gold labels, ``UNLABELLED`` where stage 4 may not train on one (``exit_loss``).
        kept_ratio: mean share of real tokens kept over layers (hard masks).
    """

    features: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor
    kept_ratio: float


@torch.inference_mode()
def exit_targets(
    model: MagicPyramidForSequenceClassification,
    encoded: Encoded,
    config: TrainConfig,
    *,
    labelled: int | None = None,
    threshold_scale: float | None = 1.0,
    progress: bool = True,
) -> ExitTargets:
    """Run ``encoded`` once through the hard-masked backbone (eval mode) and cache the sub-classifiers' inputs.

    Only the first ``labelled`` examples (None: all) keep their labels; the rest are ``UNLABELLED``.
    ``threshold_scale`` multiplies the thresholds of the hard masks (None: no masks, every token kept).
    """
    device = torch.device(config.device)
    model.eval().to(device)
    count, layers = len(encoded["labels"]), model.config.num_hidden_layers
    features = torch.zeros(count, layers - 1, model.config.hidden_size)
    teacher = torch.zeros(count, model.config.num_labels)
    kept, total = 0.0, 0
    steps = math.ceil(count / config.eval_batch_size)
    for batch in tqdm(
        batches(encoded, config.eval_batch_size, sort_by_length=True),
        total=steps,
        desc="stage 4 features",
        disable=not progress,
        leave=False,
    ):
        with config.autocast():
            out = model.masked_forward(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["token_type_ids"].to(device),
                mask_mode="none" if threshold_scale is None else "hard",
                temperature=config.temperature,
                threshold_scale=1.0 if threshold_scale is None else threshold_scale,
            )
        features[batch["index"]] = out.exit_features.transpose(0, 1).float().cpu()
        teacher[batch["index"]] = out.logits.float().cpu()
        kept += float(out.kept_ratio.mean()) * len(batch["index"])
        total += len(batch["index"])
    labels = torch.tensor(encoded["labels"], dtype=torch.int64)
    labels[count if labelled is None else labelled :] = UNLABELLED
    return ExitTargets(features, teacher, labels, kept / max(1, total))


def fit_exits(
    model: MagicPyramidForSequenceClassification,
    targets: ExitTargets,
    config: TrainConfig,
    *,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage 4 on the cache: train ``model.exits`` in place by ``exit_loss`` for ``config.epochs_exits``.

    Returns the last epoch's running loss, the sub-classifiers' mean accuracy (on the labelled examples) and
    agreement with the main classifier, per layer, and the kept ratio of the cached pass.
    """
    device = torch.device(config.device)
    model.to(device)
    named = _set_trainable(model, "distill")
    optimizer = torch.optim.AdamW(weight_groups(named, config.weight_decay), lr=config.exit_lr)
    count = targets.labels.numel()
    per_epoch, total = step_counts(config.epochs_exits, count, config.batch_size)
    scheduler = linear_schedule(optimizer, math.ceil(config.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.eval()
    model.exits.train()
    layers = targets.features.shape[1]
    cached = targets.features.to(device).transpose(0, 1)
    teacher_logits = targets.teacher.to(device)
    labels, teacher_labels = targets.labels.to(device), targets.teacher.argmax(dim=-1).to(device)
    is_labelled = targets.labels != UNLABELLED  # on the host: counting needs no device sync
    step = 0
    bar = tqdm(total=total, desc="stage 4 exits", disable=not progress, leave=False)
    while step < total:
        order = torch.randperm(count, generator=generator)
        labelled_before = is_labelled[order].cumsum(0)  # labelled examples among the first i + 1 of the epoch
        order = order.to(device)
        loss_sum, seen, labelled = 0.0, 0, 0
        correct, agree = torch.zeros(layers, device=device), torch.zeros(layers, device=device)
        for rows in order[: min(count, (total - step) * config.batch_size)].split(config.batch_size):
            teacher = teacher_logits[rows]
            logits = apply_exits(model.exits, cached[:, rows], teacher.shape[-1])
            loss = exit_loss(logits, teacher, labels[rows], config.distillation, config.exit_label_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            predictions = logits.detach().argmax(dim=-1)
            loss_sum += finite_loss(loss, "stage 4 exits", step, model.exits) * rows.numel()
            correct += (predictions == labels[rows]).sum(dim=1)
            agree += (predictions == teacher_labels[rows]).sum(dim=1)
            seen += rows.numel()
            labelled = int(labelled_before[seen - 1])
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}",
                acc=f"{float(correct.mean()) / max(1, labelled):.3f}",
                kept=f"{targets.kept_ratio:.3f}",
            )
    bar.close()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    seen, labelled = max(1, seen), max(1, labelled)
    correct, agree = correct.cpu(), agree.cpu()
    return {
        "train_loss": loss_sum / seen,
        "train_accuracy": float(correct.mean()) / labelled,
        "train_exit_accuracy": (correct / labelled).tolist(),
        "train_exit_agreement": (agree / seen).tolist(),
        "train_kept_ratio": targets.kept_ratio,
        "distillation_examples": count,
        "labelled_examples": int((targets.labels != UNLABELLED).sum()),
        "steps": total,
    }
