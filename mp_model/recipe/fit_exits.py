"""Stage 4 of the recipe: the ``exit_targets`` cache of what the frozen, hard-pruned backbone gives each
distillation example (``distillation_cache``: at several threshold scales), and ``fit_exits``, the
sub-classifiers' self-distillation on it (``exit_loss``).
See ``mp_model.recipe.training``; stages 1-3 are ``mp_model.recipe.fit``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from mp_model.exit_head import apply_exits
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.recipe.data import Encoded, batches
from mp_model.recipe.fit import (
    distillation_loss,
    finite_loss,
    linear_schedule,
    set_trainable,
    step_counts,
    weight_groups,
)
from mp_model.recipe.train_config import TrainConfig

# The label of a distillation example that stage 4 may not train on (beyond ``TrainConfig.train_size``).
UNLABELLED = -1


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


@dataclass
class ExitTargets:
    """Stage 4's cache: what the frozen backbone gives each distillation example.

    Attributes:
        features: ``(N, layers - 1, hidden)`` float32, each sub-classifier's input (mean of the live tokens).
        teacher: ``(N, labels)`` float32 main-classifier logits.
        labels: ``(N,)`` int64 gold labels, ``UNLABELLED`` where stage 4 may not train on one (``exit_loss``).
        kept_ratio: mean share of real tokens kept over layers (hard masks; over the passes, their mean).
        passes: how many passes over the same examples the rows hold (one per threshold scale of
            ``distillation_cache``): ``N`` is ``passes`` times the number of examples.
    """

    features: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor
    kept_ratio: float
    passes: int = 1


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


def concatenated(parts: list[ExitTargets]) -> ExitTargets:
    """One cache of several caches' rows, in order (kept ratios averaged, passes added)."""
    return ExitTargets(
        torch.cat([part.features for part in parts]),
        torch.cat([part.teacher for part in parts]),
        torch.cat([part.labels for part in parts]),
        sum(part.kept_ratio for part in parts) / len(parts),
        sum(part.passes for part in parts),
    )


def distillation_cache(
    model: MagicPyramidForSequenceClassification,
    encoded: Encoded,
    config: TrainConfig,
    *,
    labelled: int | None = None,
    progress: bool = True,
) -> ExitTargets:
    """Stage 4's training cache: ``exit_targets`` of ``encoded`` at each of ``config.exit_scales`` (None:
    unpruned), each pass with the main classifier's logits at that scale as teacher, concatenated in that order.

    The threshold scale is a serve-time knob, and the mean of the surviving tokens shifts with it; heads trained
    at scale 1.0 alone never saw the inputs of the scales ``mp eval`` selects (bench/NOTES.md, "Stage 4 on inputs
    pruned at several threshold scales").
    """
    return concatenated(
        [
            exit_targets(model, encoded, config, labelled=labelled, threshold_scale=scale, progress=progress)
            for scale in config.exit_scales
        ]
    )


def fit_exits(
    model: MagicPyramidForSequenceClassification,
    targets: ExitTargets,
    config: TrainConfig,
    *,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage 4 on the cache: train ``model.exits`` in place by ``exit_loss`` for ``config.epochs_exits`` epochs of
    the examples: a cache of ``targets.passes`` passes is traversed ``epochs_exits / passes`` times, so the number
    of steps does not depend on how many threshold scales were cached.

    Returns the last epoch's running loss, the sub-classifiers' mean accuracy (on the labelled examples) and
    agreement with the main classifier, per layer, and the kept ratio of the cache (its passes' mean: an
    unpruned pass counts 1.0).
    """
    device = torch.device(config.device)
    model.to(device)
    named = set_trainable(model, "distill")
    optimizer = torch.optim.AdamW(weight_groups(named, config.weight_decay), lr=config.exit_lr)
    count = targets.labels.numel()
    _, total = step_counts(config.epochs_exits / targets.passes, count, config.batch_size)
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
        "distillation_examples": count // targets.passes,
        "distillation_rows": count,
        "labelled_examples": int((targets.labels != UNLABELLED).sum()) // targets.passes,
        "steps": total,
    }
