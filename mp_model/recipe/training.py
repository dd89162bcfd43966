"""The four-stage Magic Pyramid training recipe, with a small threshold/penalty search and resumable checkpoints.

Stages (paper Appendix C; LTP and FastBERT for the details). Stages 1-3 evaluate dev after every epoch and keep the
epoch of best dev accuracy (stage 1 dense, stages 2-3 pruned; ties go to the later epoch):

1. ``finetune``: backbone and main classifier, cross-entropy, no masks (the dense baseline; kept in the run
   directory for evaluation).
2. ``soft``: soft pruning. Thresholds start at ``delta_L * l / L`` (layer ``l`` = 1..L) and are learned with their own
   Adam optimizer (``threshold_lr``, no weight decay); masks ``sigmoid((s - threshold) / T)``; loss
   ``CE + lambda * mask_mean``, where with ``prune_teacher_weight = w > 0`` (here and in stage 3 and the search)
   ``CE`` becomes ``(1 - w) * CE + w * KL(p_dense || p)``, the stage-1 model's logits on the train split (eval
   mode, computed once) as the teacher. By default ``w = 1``: over three Rotten Tomatoes seeds the pruned model
   stays closer to dense (stage 3 ends 0.17 points below stage 1 on dev on average, against 0.45 with the labels)
   and MP's dev choice is 2.33x on average against 2.21x, as reliable on unseen examples (``bench/NOTES.md``).
   Before it, a search trains every ``(delta_L, lambda)`` of the grids through short soft and hard stages from the
   stage-1 model and keeps the candidate with the fewest dev GFLOPs among those whose dev accuracy is within
   ``max_drop`` of stage 1's (the most accurate one if none is).
3. ``hard``: thresholds frozen, binary masks, stage 2's loss without the L1 term, on the weights.
4. ``exits``: backbone, main classifier and thresholds frozen, hard masks on; every sub-classifier ``l`` learns
   ``(1 - w) * KL(p_main || p_l) + w * CE(p_l, gold)`` per example (``fit_exits.exit_loss``: self-distillation with
   ``p_main`` detached, optionally mixed with the gold label at ``w = exit_label_weight``, 0 by default), summed
   over layers, for ``epochs_exits`` (20) epochs at ``exit_lr``. FastBERT states pure distillation in the other
   direction, ``KL(p_l || p_main)`` (``distillation="reverse"``, ``exit_label_weight=0``); it is mode-seeking, and
   on Rotten Tomatoes its students were confident where they were wrong: at a dev drop within half a point the
   exits saved 1.75x layers against 2.4x with the forward direction. Mixing in the labels and training 40 epochs
   make MP faster at the dev choice (2.43x to 2.56x on one Rotten Tomatoes run) but the choice holds on unseen
   examples less often: over three runs pure forward distillation for 20 epochs keeps it within the limit in 70 %
   of re-splits, the mix for 40 epochs in 62 % (``bench/exit_loss_sweep.py``, ``bench/NOTES.md``). The frozen
   backbone (dropout off) maps an example to the same sub-classifier inputs (the mean of its live tokens after
   each layer) and main logits at every epoch, so one forward pass over the ``exit_train_size`` distillation
   examples (by default the whole train split) caches them, and the sub-classifiers then train on the cache at
   no backbone cost. The result equals training through the backbone each step. Examples beyond ``train_size``
   are distilled on but their labels are not used (``fit_exits.UNLABELLED``): ``train_size`` is the labelled budget.
   With ``epochs_joint > 0`` stage 4 first trains every weight but the thresholds for that many epochs (hard masks,
   ``fit.stage_loss``'s ``"joint"`` objective: stage 3's loss plus the sub-classifiers' mean distillation from the
   same teacher; the heads at ``exit_lr``, keeping the epoch of best pruned dev accuracy), so that the early
   layers learn for their own sub-classifier; the cache and the heads' distillation then follow on that backbone.

Scales. Our thresholds are on the length-normalised importance scale (``n`` times the attention a token
receives, mean 1 over a sequence), LTP's raw scale times 128. Measured on MiniLM, useful ``delta_L`` lie around
0.3-2 (LTP's 0.01-0.08 would be 1.3-10 here, which prunes nearly everything on short texts). The temperature
0.05 here is LTP's ``T`` of 4e-4 on its scale, inside its searched range (1e-5 to 1e-3); the paper's 1e-5 to
5e-5 (1.3e-3 to 6.4e-3 here) give masks that are almost binary and threshold gradients that few tokens feed.
``lambda`` multiplies the mean mask, a number in [0, 1] on either scale, so the papers' range (0.001-0.2) holds.

The run directory's layout, and loading a finished run, belong to ``mp_model.recipe.runs``; the loops to
``mp_model.recipe.fit``; the knobs to ``mp_model.recipe.train_config``.

Rerunning the same command resumes: completed stages are skipped, an interrupted stage continues from its last
checkpoint (every ``checkpoint_every`` steps) with its RNG state and the epoch's running metrics, so the
weights and the recorded metrics equal an uninterrupted run's;
an interrupted search candidate, and an interrupted stage 4 (one forward pass and seconds of head training),
restart from their start.

Damage is repaired, never trusted. Every file is written atomically (a temporary file, then ``os.replace``);
``state.json`` records the SHA-256 of each stage's weights and config (``checksums``, ``config_checksums``) and
``partial/progress.json`` that of ``trainer.pt``.
On resuming, a partial checkpoint that is missing its checksum, does not match it or does not load is discarded
with a ``TrainingWarning`` and its stage restarts from its start (the previous stage's folder); a stage that
``state.json`` calls done but whose folder is gone, does not match its checksum or does not load is dropped with a
warning, and it and the later stages are trained again. An unreadable ``state.json`` starts the run over. A
``train_config.json`` whose run never completed a stage is replaced by a corrected configuration (with a warning)
instead of refusing it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mp_model.exit_head import apply_exits
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.permissions import apply_umask
from mp_model.recipe.data import Encoded, TextDataset, check_max_length, encode
from mp_model.recipe.datasets import load_dataset, warn_overlap
from mp_model.recipe.evaluation import collect, summarize
from mp_model.recipe.fit import Callback, StageSpec, fit
from mp_model.recipe.fit_exits import distillation_cache, exit_targets, fit_exits
from mp_model.recipe.locks import exclusive_lock
from mp_model.recipe.runs import (
    CONFIG_FILE,
    PARTIAL_DIR,
    STAGES,
    STATE_FILE,
    TrainingWarning,
    load_model,
    model_folder_problem,
    read_state,
    sha256,
    stage_dir,
    write_json,
)
from mp_model.recipe.selection import within_limit
from mp_model.recipe.train_config import TrainConfig

# TrainConfig fields that may differ when a run is resumed.
RESUMABLE_CHANGES = ("device", "run_dir", "precision")


@dataclass
class Data:
    """The dataset, its tokenizer and encoded splits of a run: ``train`` (stages 1-3), ``dev``, and
    ``exit_train`` (stage 4's distillation examples)."""

    dataset: TextDataset
    tokenizer: Any
    train: Encoded
    dev: Encoded
    exit_train: Encoded


def load_data(config: TrainConfig) -> Data:
    """Load, subset and tokenise the run's dataset with the tokenizer of ``config.model``.

    Warns (``mp_model.recipe.datasets.warn_overlap``) when dev or test examples repeat training ones, and (a
    ``TrainingWarning``) when a class has no training example (a warning, not an error: a small ``train_size`` of a
    dataset with a rare class is a legitimate quick run); refuses a ``max_length`` above the model's
    ``max_position_embeddings``.
    """
    from transformers import AutoTokenizer

    full = load_dataset(config.dataset, seed=config.seed, dev_from_train=config.dev_from_train)
    dataset = full.subset(train=config.train_size, dev=config.dev_size)
    if not dataset.train or not dataset.dev:
        raise ValueError(f"{dataset.name}: training needs non-empty train and dev splits")
    warn_overlap(full)
    unseen = sorted(set(range(dataset.num_labels)) - {example.label for example in dataset.train})
    if unseen:
        names = ", ".join(repr(dataset.labels[i]) for i in unseen)
        warnings.warn(
            f"{dataset.name}: class(es) {names} have no training example: the model keeps them but cannot learn them",
            TrainingWarning,
            stacklevel=2,
        )
    problem = model_folder_problem(Path(config.model))
    if problem is not None:
        raise ValueError(f"model {config.model!r} is not a saved model: {problem}")
    try:
        limit = json.loads((Path(config.model) / "config.json").read_text()).get("max_position_embeddings")
        tokenizer = AutoTokenizer.from_pretrained(config.model)
    except (OSError, ValueError) as error:
        raise ValueError(f"model {config.model!r}: no usable tokenizer ({error})") from error
    check_max_length(config.max_length, tokenizer, limit=limit)
    # Both training sets are prefixes of the train split: tokenise the longer once.
    exit_count = len(full.subset(train=config.exit_train_size).train)
    train = encode(tokenizer, full.train[: max(len(dataset.train), exit_count)], config.max_length)
    return Data(
        dataset,
        tokenizer,
        {key: value[: len(dataset.train)] for key, value in train.items()},
        encode(tokenizer, dataset.dev, config.max_length),
        {key: value[:exit_count] for key, value in train.items()},
    )


def initial_thresholds(final_threshold: float, layers: int) -> list[float]:
    """``delta_L * l / L`` for layers ``l = 1..L`` (LTP's and the paper's initialisation)."""
    return [final_threshold * (layer + 1) / layers for layer in range(layers)]


def dev_metrics(
    model: MagicPyramidForSequenceClassification, dev: Encoded, config: TrainConfig, *, prune: bool
) -> dict[str, float]:
    """Dev accuracy, mean GFLOPs and kept-token ratio of the packed path (no early exit)."""
    result = collect(model, dev, batch_size=config.eval_batch_size, device=config.device, prune=prune)
    summary = summarize(result, tau=None, early_exit=False)
    return {
        "dev_accuracy": summary["accuracy"],
        "dev_gflops": summary["gflops"],
        "dev_kept_ratio": summary["kept_ratio"],
    }


class Trainer:
    """Runs the recipe for one ``TrainConfig`` in its run directory (see the module docstring)."""

    def __init__(self, config: TrainConfig, *, callback: Callback | None = None, progress: bool = True) -> None:
        self.config = config
        self.directory = config.directory
        self.callback = callback
        self.progress = progress
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"run_dir {self.directory} is a file, not a folder")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = read_state(self.directory)
        self._check_config()
        self._check_stages()
        self._data: Data | None = None
        self._teacher: torch.Tensor | None = None

    def _check_config(self) -> None:
        """Refuse a configuration that differs from the saved one of a run with completed stages; a run that
        completed none takes the new configuration (its partial checkpoint and search results are dropped)."""
        path = self.directory / CONFIG_FILE
        current = self.config.to_dict()
        try:
            saved = json.loads(path.read_text()) if path.exists() else None
        except (OSError, ValueError):
            saved = {"unreadable": True}
        if saved == current:
            return
        if saved is not None and "unreadable" not in saved:
            try:  # fields added since the run was made take their defaults
                saved = TrainConfig.from_dict(saved).to_dict()
            except (TypeError, ValueError):
                pass
        if saved is not None:
            changed = sorted(
                key
                for key in set(saved) | set(current)
                if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
            )
            if not changed:
                return
            if self.state["stages_done"]:
                raise ValueError(
                    f"{self.directory} holds a run with a different configuration ({', '.join(changed)} differ): "
                    "choose another --run-dir or delete it"
                )
            warnings.warn(
                f"{path} belongs to a run that completed no stage: replacing it ({', '.join(changed)} changed)",
                TrainingWarning,
                stacklevel=3,
            )
            shutil.rmtree(self.directory / PARTIAL_DIR, ignore_errors=True)
            self.state = {"stages_done": [], "search": {}}
            self._save_state()
        write_json(path, current)

    def _check_stages(self) -> None:
        """Cross-check ``state.json`` against the stage folders: a done stage whose folder is missing or damaged is
        dropped, with the later ones, and trained again (with a ``TrainingWarning``)."""
        checksums = self.state.setdefault("checksums", {})
        config_checksums = self.state.setdefault("config_checksums", {})
        for number in sorted(self.state["stages_done"]):
            recorded = checksums.get(str(number)), config_checksums.get(str(number))
            problem = model_folder_problem(self.stage_dir(number), *recorded)
            if problem is None:
                continue
            dropped = [n for n in self.state["stages_done"] if n >= number]
            warnings.warn(
                f"{self.stage_dir(number)}: {problem}; stage(s) {', '.join(map(str, dropped))} will be trained again",
                TrainingWarning,
                stacklevel=3,
            )
            self.state["stages_done"] = [n for n in self.state["stages_done"] if n < number]
            for n in dropped:
                self.state.pop(f"stage{n}", None)
                checksums.pop(str(n), None)
                config_checksums.pop(str(n), None)
            self._save_state()
            break

    @property
    def data(self) -> Data:
        if self._data is None:
            self._data = load_data(self.config)
        return self._data

    def teacher(self) -> torch.Tensor | None:
        """``(len(train), labels)`` float32 logits of the stage-1 model on the train split (packed path, no pruning),
        the teacher of stages 2-3 and the search; None when ``prune_teacher_weight`` is 0. Computed once per
        Trainer."""
        if self.config.prune_teacher_weight == 0.0:
            return None
        if self._teacher is None:
            dense = self._load(self.stage_dir(1))
            config = self.config
            self._teacher = collect(
                dense, self.data.train, batch_size=config.eval_batch_size, device=config.device, prune=False
            ).logits
        return self._teacher

    def _save_state(self) -> None:
        write_json(self.directory / STATE_FILE, self.state)

    def stage_dir(self, number: int) -> Path:
        """The folder of stage ``number``'s model."""
        return stage_dir(self.directory, number)

    def _load(self, path: str | Path) -> MagicPyramidForSequenceClassification:
        return load_model(path, self.config.device)

    def _save(self, model: MagicPyramidForSequenceClassification, number: int) -> None:
        """Save stage ``number``'s model and tokenizer: into a temporary folder, checked, then renamed."""
        target = self.stage_dir(number)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        self.data.tokenizer.save_pretrained(tmp)
        apply_umask(tmp)
        problem = model_folder_problem(tmp)
        if problem is not None:
            raise RuntimeError(f"saving stage {number} to {tmp} failed: {problem}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        if (target / "model.safetensors").is_file():
            self.state.setdefault("checksums", {})[str(number)] = sha256(target / "model.safetensors")
            self.state.setdefault("config_checksums", {})[str(number)] = sha256(target / "config.json")

    def _finish(self, number: int, model: MagicPyramidForSequenceClassification, metrics: dict[str, Any]) -> None:
        self._save(model, number)
        self.state[f"stage{number}"] = metrics | {"arithmetic": self.config.arithmetic}
        self.state["stages_done"] = sorted(set(self.state["stages_done"]) | {number})
        self._save_state()
        shutil.rmtree(self.directory / PARTIAL_DIR, ignore_errors=True)
        if self.callback is not None:
            self.callback("stage_end", {"stage": number, **metrics})

    def run(self, stages: Sequence[int] | None = None) -> dict[str, Any]:
        """Run ``stages`` (default all, in order), skipping completed ones; returns the state."""
        wanted = sorted(STAGES) if stages is None else sorted(set(stages))
        for number in wanted:
            if number not in STAGES:
                raise ValueError(f"unknown stage {number}: choose from {sorted(STAGES)}")
            missing = [n for n in range(1, number) if n not in self.state["stages_done"]]
            if missing:
                raise ValueError(f"stage {number} needs stages {missing} first")
            if number in self.state["stages_done"]:
                continue
            getattr(self, f"_stage{number}")()
        return self.state

    def _fit(self, model: MagicPyramidForSequenceClassification, stage: StageSpec) -> dict[str, Any]:
        """Train one stage, keeping its epoch of best dev accuracy (pruned after stage 1); the metrics include
        that epoch's ``dev_metrics`` (measured here if the stage ran no step)."""
        prune = stage.number > 1
        metrics = fit(
            model,
            stage,
            self.data.train,
            self.config,
            seed=self.config.seed * 100 + stage.number,
            partial=self.directory / PARTIAL_DIR,
            callback=self.callback,
            progress=self.progress,
            evaluate=lambda: dev_metrics(model, self.data.dev, self.config, prune=prune),
            teacher=self.teacher() if prune else None,
        )
        if "dev_accuracy" not in metrics:
            metrics |= dev_metrics(model, self.data.dev, self.config, prune=prune)
        return metrics

    def _stage1(self) -> None:
        dataset = self.data.dataset
        torch.manual_seed(self.config.seed)
        model = MagicPyramidForSequenceClassification.from_pretrained(
            self.config.model,
            num_labels=dataset.num_labels,
            id2label=dict(enumerate(dataset.labels)),
            label2id={name: i for i, name in enumerate(dataset.labels)},
        )
        model.set_thresholds([0.0] * model.config.num_hidden_layers)
        metrics = self._fit(model, StageSpec(1, "finetune", self.config.epochs_finetune, "none", "ce"))
        self._finish(1, model, metrics)

    def search(self) -> dict[str, float]:
        """Train every ``(delta_L, lambda)`` candidate briefly (soft, then hard) and pick one; cached in state."""
        config = self.config
        search = self.state.setdefault("search", {})
        if "selected" in search:
            return search["selected"]
        candidates = search.setdefault("candidates", {})
        baseline = self.state["stage1"]["dev_accuracy"]
        for final_threshold, lambda_ in itertools.product(config.final_thresholds, config.lambdas):
            key = f"delta_L={final_threshold:g},lambda={lambda_:g}"
            if key in candidates:
                continue
            model = self._load(self.stage_dir(1))
            model.set_thresholds(initial_thresholds(final_threshold, model.config.num_hidden_layers))
            seed = config.seed * 100 + 20
            soft = StageSpec(2, "search soft", config.search_epochs_soft, "soft", "soft", lambda_)
            hard = StageSpec(3, "search hard", config.search_epochs_hard, "hard", "ce")
            teacher = self.teacher()
            fit(model, soft, self.data.train, config, seed=seed, progress=self.progress, teacher=teacher)
            fit(model, hard, self.data.train, config, seed=seed + 1, progress=self.progress, teacher=teacher)
            result = {"final_threshold": final_threshold, "lambda": lambda_}
            result |= dev_metrics(model, self.data.dev, config, prune=True)
            result["thresholds"] = model.thresholds.detach().cpu().tolist()
            candidates[key] = result
            self._save_state()
            if self.callback is not None:
                self.callback("candidate", {"key": key, **result})
        search["selected"] = select_candidate(list(candidates.values()), baseline, config.max_drop)
        self._save_state()
        return search["selected"]

    def _stage2(self) -> None:
        selected = self.search()
        model = self._load(self.stage_dir(1))
        model.set_thresholds(initial_thresholds(selected["final_threshold"], model.config.num_hidden_layers))
        stage = StageSpec(2, "soft", self.config.epochs_soft, "soft", "soft", selected["lambda"])
        metrics = self._fit(model, stage)
        metrics["thresholds"] = model.thresholds.detach().cpu().tolist()
        metrics |= {"final_threshold": selected["final_threshold"], "lambda": selected["lambda"]}
        self._finish(2, model, metrics)

    def _stage3(self) -> None:
        model = self._load(self.stage_dir(2))
        metrics = self._fit(model, StageSpec(3, "hard", self.config.epochs_hard, "hard", "ce"))
        self._finish(3, model, metrics)

    def _stage4(self) -> None:
        model = self._load(self.stage_dir(3))
        joint = None
        if self.config.epochs_joint > 0:
            joint = self._fit(model, StageSpec(4, "joint", self.config.epochs_joint, "hard", "joint"))
        labelled = len(self.data.train["labels"])
        targets = distillation_cache(
            model, self.data.exit_train, self.config, labelled=labelled, progress=self.progress
        )
        metrics = fit_exits(model, targets, self.config, seed=self.config.seed * 100 + 4, progress=self.progress)
        dev = exit_targets(model, self.data.dev, self.config, progress=False)  # cached on the host
        device = torch.device(self.config.device)
        with torch.no_grad():
            features = dev.features.transpose(0, 1).to(device)
            predictions = apply_exits(model.exits, features, dev.teacher.shape[-1]).cpu()
        metrics["dev_exit_accuracy"] = (predictions.argmax(dim=-1) == dev.labels).double().mean(dim=1).tolist()
        metrics["dev_accuracy"] = float((dev.teacher.argmax(dim=-1) == dev.labels).double().mean())
        if joint is not None:
            metrics["joint"] = joint
        self._finish(4, model, metrics)


def select_candidate(candidates: list[dict[str, Any]], baseline: float, max_drop: float) -> dict[str, Any]:
    """The candidate with the fewest dev GFLOPs whose dev accuracy is at least ``baseline - max_drop``.

    If none qualifies, the most accurate one (fewest GFLOPs among ties).
    """
    if not candidates:
        raise ValueError("no search candidates")
    eligible = [c for c in candidates if within_limit(baseline - c["dev_accuracy"], max_drop)]
    if eligible:
        return min(eligible, key=lambda c: (c["dev_gflops"], -c["dev_accuracy"]))
    return max(candidates, key=lambda c: (c["dev_accuracy"], -c["dev_gflops"]))


def train(
    config: TrainConfig,
    stages: Sequence[int] | None = None,
    *,
    callback: Callback | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) the recipe for ``config``, holding the run folder's lock; returns the run's state (see
    ``Trainer``). A ``LockedError`` (``mp_model.recipe.locks``), at once, if another process trains that folder."""
    config.directory.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(config.directory, f"the run folder {config.directory}"):
        return Trainer(config, callback=callback, progress=progress).run(stages)
