"""``MagicPyramidConfig``: a BERT configuration plus the token-pruning and early-exit settings."""

from __future__ import annotations

import math
from collections.abc import Iterable

from transformers import BertConfig


def check_thresholds(values: Iterable[float], name: str = "prune_thresholds") -> list[float]:
    """``values`` as a list of floats; a ``ValueError`` naming ``name`` and the layers if one is NaN or infinite.

    A NaN threshold would silently stop a layer's pruning (NaN compares false), an infinite one would remove
    every token but the first: both are rejected wherever thresholds enter the model.
    """
    values = [float(v) for v in values]
    bad = [index for index, value in enumerate(values) if not math.isfinite(value)]
    if bad:
        raise ValueError(f"{name} must be finite, got {[values[i] for i in bad]} at layers {bad}")
    return values


class MagicPyramidConfig(BertConfig):
    """BERT configuration with Magic Pyramid's knobs.

    Args:
        prune_thresholds: one threshold per layer on the length-normalised importance scale (``n_b`` times the
            importance, mean 1 over a sequence): layer ``l`` keeps token ``j`` iff its normalised importance is
            above ``prune_thresholds[l] * threshold_scale``. ``None`` gives zeros (nothing is pruned). These
            are the initial values of the model's learnable ``thresholds`` parameter, which is what is used.
            Each must be finite (NaN or infinity raise a ``ValueError``, also when a saved config is loaded).
        use_pruning: default for the ``prune`` call argument.
        use_early_exit: default for the ``early_exit`` call argument.
        exit_tau: default normalised-entropy threshold in [0, 1]; an example exits at the first sub-classifier
            whose uncertainty is at most ``tau`` (larger exits earlier).
        threshold_scale: default scale of the learned pruning thresholds (>= 0, finite; larger prunes more).
        exit_hidden_size: width of each sub-classifier's hidden layer.
        soft_mask_temperature: ``T`` of the soft masks ``sigmoid((s - threshold) / T)`` in training.

    ``exit_tau``, ``threshold_scale``, ``use_pruning`` and ``use_early_exit`` are the serve-time defaults of a call
    that does not pass ``tau``, ``threshold_scale``, ``prune`` or ``early_exit``, as
    ``pipeline("text-classification")`` calls the model. Set them when
    loading (``from_pretrained(folder, exit_tau=0.3)``, ``pipeline(..., model_kwargs={"exit_tau": 0.3})``: keyword
    arguments naming config fields update the config) or on ``model.config``; an ``exit_tau`` outside [0, 1] set
    this way is a ``ValueError`` at the call.
    """

    model_type = "magic_pyramid"

    def __init__(
        self,
        prune_thresholds: list[float] | None = None,
        use_pruning: bool = True,
        use_early_exit: bool = True,
        exit_tau: float = 0.5,
        threshold_scale: float = 1.0,
        exit_hidden_size: int = 128,
        soft_mask_temperature: float = 0.05,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        layers = self.num_hidden_layers
        if prune_thresholds is None:
            prune_thresholds = [0.0] * layers
        if len(prune_thresholds) != layers:
            raise ValueError(f"prune_thresholds needs one value per layer ({layers}), got {len(prune_thresholds)}")
        if not 0.0 <= exit_tau <= 1.0:
            raise ValueError(f"exit_tau must lie in [0, 1], got {exit_tau}")
        if not 0.0 <= threshold_scale < math.inf:
            raise ValueError(f"threshold_scale must be non-negative and finite, got {threshold_scale}")
        self.prune_thresholds = check_thresholds(prune_thresholds)
        self.use_pruning = use_pruning
        self.use_early_exit = use_early_exit
        self.exit_tau = float(exit_tau)
        self.threshold_scale = float(threshold_scale)
        self.exit_hidden_size = exit_hidden_size
        self.soft_mask_temperature = soft_mask_temperature
