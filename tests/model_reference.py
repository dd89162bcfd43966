"""The tests' entry to the library's reference forward (``mp_model.reference``): one example, knobs as keywords."""

from __future__ import annotations

import torch

from mp_model import MagicPyramidForSequenceClassification
from mp_model.reference import SingleResult, reference_sequence


def run_single(
    model: MagicPyramidForSequenceClassification,
    input_ids: torch.Tensor,
    token_type_ids: torch.Tensor,
    *,
    tau: float,
    threshold_scale: float,
    prune: bool,
    early_exit: bool,
) -> SingleResult:
    """``reference_sequence`` of one unpadded example ``(n,)`` with the knobs ``model.resolve_knobs`` makes."""
    knobs = model.resolve_knobs(tau=tau, threshold_scale=threshold_scale, prune=prune, early_exit=early_exit)
    return reference_sequence(model, input_ids, token_type_ids, knobs)
