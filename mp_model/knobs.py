"""The serve-time knobs of one call, resolved and checked once: one vocabulary for every engine.

``MagicPyramidForSequenceClassification.resolve_knobs`` turns the caller's settings (``tau``, ``threshold_scale``,
``prune``, ``early_exit``, ``exit_schedule``, ``backend``) into a ``ResolvedKnobs``, which every engine
(``mp_model.engine.Engine``) and the reference forward (``mp_model.reference``) take as they are:

* ``thresholds``: each layer's pruning threshold already multiplied by ``threshold_scale`` (all 0 without
  pruning), and ``prune_layers``, which layers prune (``threshold > 0``), computed here and nowhere else;
* ``early_exit=False`` is the one way to say "never exit": ``tau`` is always a number in [0, 1];
* ``exit_schedule``, when given, replaces the entropy test (``exit_after(row)`` reads one row's exit layer).

The learned thresholds are read back from the device only when the parameter changed (``ThresholdReader``), so
steady-state inference reads nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mp_model.config import check_thresholds


@dataclass(frozen=True, slots=True, eq=False)
class ResolvedKnobs:
    """The knobs of one call, checked (``resolve_knobs``).

    Attributes:
        tau: exit threshold on the normalised entropy, in [0, 1] (an example leaves when its uncertainty is at
            most ``tau``; NaN never does). Read only where ``early_exit`` is on.
        threshold_scale: the factor applied to the learned thresholds (non-negative, finite).
        thresholds: each layer's scaled pruning threshold as host floats (all 0 without pruning).
        prune_layers: whether each layer prunes (its scaled threshold is above 0).
        early_exit: run the sub-classifiers and let examples leave; False never exits.
        exit_schedule: ``(batch,)`` integer tensor, the layer after which each example exits, replacing the
            entropy test (0 and values ``>= layers`` never exit), or None.
        backend: the kernel backend (None: Triton on CUDA, PyTorch elsewhere).
    """

    tau: float
    threshold_scale: float
    thresholds: tuple[float, ...]
    prune_layers: tuple[bool, ...]
    early_exit: bool
    exit_schedule: torch.Tensor | None = None
    backend: str | None = None

    def exit_after(self, row: int) -> int | None:
        """Row ``row``'s exit layer in the replayed schedule (one host read), or None without a schedule."""
        return None if self.exit_schedule is None else int(self.exit_schedule[row])


def check_knobs(tau: float, threshold_scale: float) -> None:
    """A ``ValueError`` naming the knob if ``tau`` lies outside [0, 1] (or is NaN) or ``threshold_scale`` is
    negative, NaN or infinite."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if not 0.0 <= threshold_scale < math.inf:
        raise ValueError(f"threshold_scale must be non-negative and finite, got {threshold_scale}")


def resolve_knobs(
    thresholds: Sequence[float] | None,
    layers: int,
    *,
    tau: float,
    threshold_scale: float,
    early_exit: bool,
    exit_schedule: torch.Tensor | None = None,
    backend: str | None = None,
) -> ResolvedKnobs:
    """Check the knobs and resolve them for a model of ``layers`` layers.

    ``thresholds``: the learned per-layer thresholds (host floats, checked finite by ``ThresholdReader``), or None
    for no pruning. Python floats multiply as float64 tensors do, so every engine sees the same scaled values.
    """
    tau, threshold_scale = float(tau), float(threshold_scale)
    check_knobs(tau, threshold_scale)
    scaled = (0.0,) * layers if thresholds is None else tuple(t * threshold_scale for t in thresholds)
    prune_layers = tuple(t > 0.0 for t in scaled)
    return ResolvedKnobs(tau, threshold_scale, scaled, prune_layers, bool(early_exit), exit_schedule, backend)


class ThresholdReader:
    """The host values of a thresholds parameter as float64, read back only when it changed (its storage or
    version counter) and checked finite (``check_thresholds``: NaN or infinity raise a ``ValueError``).

    A write through ``parameter.data`` leaves the version counter unchanged and is not seen, as for the weights
    the engines derive their copies from.
    """

    __slots__ = ("_seen", "_values")

    def __init__(self) -> None:
        self._seen: tuple[int, int] = (-1, -1)
        self._values: list[float] = []

    def __call__(self, parameter: torch.Tensor) -> list[float]:
        seen = (parameter.data_ptr(), parameter._version)
        if seen != self._seen:
            values = parameter.detach().double().cpu().tolist()
            check_thresholds(values, "thresholds")
            self._seen, self._values = seen, values
        return self._values
