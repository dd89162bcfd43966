"""A lone sequence's remaining layers through ONNX Runtime sessions (``mp_model.ort_layers``), exits included.

The packed path hands a sequence over once it is the only one left: at batch size 1 from the start, with its token
ids, so that the embeddings run in the session too, or after the other sequences of its batch exited. Without
sub-classifiers all remaining layers and the main classifier are one session call. With them, a sequence from its
token ids is one call too, the exit test inside the graph (``OrtLayers.run_to_exit``); a sequence handed over at a
later layer runs one call per layer, each returning the layer's sub-classifier logits and their uncertainty, which
the exit test compares with ``tau`` on the host (``mp_kernels.entropy_exit``'s rule: exit when
``uncertainty <= tau``; NaN never exits), or the replayed schedule's layer, to decide whether the next layer
runs.
"""

from __future__ import annotations

import numpy as np
import torch

from mp_model.knobs import ResolvedKnobs
from mp_model.ort_layers import LoneResult, OrtLayers


def run_lone_sequence(
    runner: OrtLayers,
    start: int,
    inputs: torch.Tensor | tuple[np.ndarray, np.ndarray],
    knobs: ResolvedKnobs,
    exit_after: int | None,
    return_exit_logits: bool,
) -> LoneResult:
    """Layers ``start`` onwards on one sequence, with the call's ``knobs``.

    ``inputs``: hidden states ``(n, d)`` float32 entering layer ``start``, or (``start == 0``) token ids and token
    type ids ``(n,)`` int64 numpy arrays. ``exit_after``: the replayed schedule's exit layer for this sequence
    (``knobs.exit_after(row)``; None: the entropy test at ``knobs.tau``). ``return_exit_logits``: run every
    sub-classifier (also without ``knobs.early_exit``).
    """
    layers = runner.layer_count
    early_exit, tau = knobs.early_exit, knobs.tau
    if not (early_exit or return_exit_logits):
        run = runner.run(start, layers, inputs, knobs, exit_head=False)
        return LoneResult(run.logits, layers, run.counts, None)
    if isinstance(inputs, tuple):
        return runner.run_to_exit(inputs, knobs, exit_after)
    counts = torch.zeros(layers - start, dtype=torch.int64)
    exit_logits = torch.full((layers - 1 - start, runner.source.num_labels), float("nan"))
    result = LoneResult(torch.empty(0, runner.source.num_labels), layers, counts, exit_logits)  # logits set below
    for index in range(start, layers):
        head = index < layers - 1
        run = runner.run(index, index + 1, inputs, knobs, exit_head=head)
        inputs = run.hidden
        counts[index - start] = run.counts[0]
        if not head:
            result.logits = run.logits
            break
        exit_logits[index - start] = run.exit_logits[0]
        # In float32, as ``entropy_exit`` and the graph's exit test compare (NaN never passes).
        leaves = run.uncertainty <= np.float32(tau) if exit_after is None else exit_after == index + 1
        if early_exit and leaves:
            result.logits, result.exit_layer = run.exit_logits, index + 1
            break
    return result
