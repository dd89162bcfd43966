"""``exit_step``: the whole early-exit step of one layer for a fixed-slot packed batch, without host read-back.

After layer ``layer`` (1-based), every live slot ``b`` of the batch (``alive[b]``, at least one token):

1. is pooled: the mean of its remaining tokens (``segment mean``, rounded to ``hidden``'s dtype);
2. goes through the layer's sub-classifier ``Linear(d, w) -> tanh -> Linear(w, classes)`` (each product in
   float32, its result rounded to ``hidden``'s dtype, as PyTorch's ``nn.Linear`` gives it);
3. is tested: it exits iff the normalised entropy of the softmax of its logits is at most ``tau`` (as
   ``entropy_exit``), or, with ``schedule``, iff ``schedule[b] == layer`` (benchmarks replay a measured exit
   pattern with it);
4. if it exits: its logits go to ``logits[b]``, ``layer`` to ``exit_layer[b]``, and ``alive[b]`` becomes false.

NaN policy (both backends): a slot whose uncertainty is NaN (NaN or infinite logits of both signs) does not
exit; an empty live slot does not exit. ``tau`` lives in device memory, so a captured CUDA graph serves any
``tau`` without recapture.
"""

from __future__ import annotations

import torch

from mp_kernels.checks import check_cu_seqlens, check_tensor
from mp_kernels.dispatch import choose_backend
from mp_kernels.exit_step_reference import exit_step_torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)


def exit_step(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    dense_weight: torch.Tensor,
    dense_bias: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    tau: torch.Tensor,
    layer: int,
    logits: torch.Tensor,
    exit_layer: torch.Tensor,
    alive: torch.Tensor,
    *,
    schedule: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str | None = None,
) -> None:
    """Pool, classify and test every live slot; record and retire the slots that exit (in place).

    NaN policy (both backends): a NaN never makes a slot exit. A slot whose uncertainty is NaN stays alive, and
    a NaN ``tau`` lets no slot exit (``uncertainty <= tau`` is false); ``schedule`` decisions are unaffected.

    Args:
        hidden: ``(capacity, d)`` float16, bfloat16 or float32 (float64 on the ``"torch"`` backend), contiguous;
            slot ``b``'s tokens are rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        cu_seqlens: int32 ``(batch + 1,)`` prefix sums (empty slots allowed), ending at most at ``capacity``.
        dense_weight, dense_bias: ``(w, d)``, ``(w,)``; classifier_weight, classifier_bias: ``(classes, w)``,
            ``(classes,)``; all in ``hidden``'s dtype, contiguous (``ExitClassifier``'s parameters).
        tau: float32 ``(1,)`` tensor on the device, the exit threshold in [0, 1] (not read with ``schedule``).
        layer: a Python int >= 1, the layer just run (written to ``exit_layer``).
        logits: ``(batch, classes)`` in ``hidden``'s dtype, contiguous: receives the exiting slots' logits.
        exit_layer: int64 ``(batch,)``: receives ``layer`` at the exiting slots.
        alive: bool ``(batch,)``: the slots still running; the exiting ones are set to false.
        schedule: optional int64 ``(batch,)``: replaces the entropy test (exit iff ``schedule[b] == layer``).
        max_seqlen: optional Python int in ``[1, capacity]``, the most rows a slot is expected to hold (e.g. the
            padded width); it only sizes the Triton grid (``cdiv(max_seqlen, 32)`` programs per slot, at most 64),
            so a longer slot is still pooled whole, only by fewer programs. ``None``: ``capacity``.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=TORCH_DTYPES)
    device, dtype = hidden.device, hidden.dtype
    check_cu_seqlens(cu_seqlens, hidden.shape[0], device, validate=False)
    batch = cu_seqlens.numel() - 1
    d = hidden.shape[1]
    check_tensor("dense_weight", dense_weight, ndim=2, dtypes=(dtype,), device=device)
    width = dense_weight.shape[0]
    check_tensor("classifier_weight", classifier_weight, ndim=2, dtypes=(dtype,), device=device)
    classes = classifier_weight.shape[0]
    if dense_weight.shape[1] != d or width == 0:
        raise ValueError(f"dense_weight must have shape (w, {d}) with w >= 1, got {tuple(dense_weight.shape)}")
    if classifier_weight.shape[1] != width or classes < 2:
        raise ValueError(
            f"classifier_weight must have shape (classes >= 2, {width}), got {tuple(classifier_weight.shape)}"
        )
    for name, tensor, size in (("dense_bias", dense_bias, width), ("classifier_bias", classifier_bias, classes)):
        check_tensor(name, tensor, ndim=1, dtypes=(dtype,), device=device)
        if tensor.shape[0] != size:
            raise ValueError(f"{name} must have shape ({size},), got {tuple(tensor.shape)}")
    check_tensor("tau", tau, ndim=1, dtypes=(torch.float32,), device=device)
    if tau.shape[0] != 1:
        raise ValueError(f"tau must be a (1,) tensor, got shape {tuple(tau.shape)}")
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
        raise ValueError(f"layer must be an int >= 1, got {layer!r}")
    check_tensor("logits", logits, ndim=2, dtypes=(dtype,), device=device)
    if tuple(logits.shape) != (batch, classes):
        raise ValueError(f"logits must have shape ({batch}, {classes}), got {tuple(logits.shape)}")
    for name, tensor, kind in (("exit_layer", exit_layer, torch.int64), ("alive", alive, torch.bool)):
        check_tensor(name, tensor, ndim=1, dtypes=(kind,), device=device)
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} must hold one entry per slot ({batch}), got {tensor.shape[0]}")
    if schedule is not None:
        check_tensor("schedule", schedule, ndim=1, dtypes=(torch.int64,), device=device)
        if schedule.shape[0] != batch:
            raise ValueError(f"schedule must hold one entry per slot ({batch}), got {schedule.shape[0]}")
    if max_seqlen is None:
        max_seqlen = hidden.shape[0]
    elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
    elif not 1 <= max_seqlen <= hidden.shape[0]:
        raise ValueError(f"max_seqlen must lie in [1, {hidden.shape[0]}] (the rows of hidden), got {max_seqlen}")
    args = (hidden, cu_seqlens, dense_weight, dense_bias, classifier_weight, classifier_bias, tau, layer)
    outputs = (logits, exit_layer, alive, schedule)
    if choose_backend(backend, device) == "triton":
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"hidden must be float16, bfloat16 or float32 on the triton backend, got {dtype}")
        from mp_kernels._triton.exit_step import exit_step_triton

        exit_step_triton(*args, *outputs, max_seqlen)
    else:
        exit_step_torch(*args, *outputs)
