"""``entropy_exit``: which examples of a batch are certain enough to leave at this layer.

An example's uncertainty is the entropy of its softmax over ``classes``, normalised by its largest value::

    uncertainty = sum_c p_c log p_c / log(1 / classes)   in [0, 1]

0 for a one-hot distribution, 1 for a uniform one. Examples with ``uncertainty <= tau`` exit (DeeBERT's
entropy criterion, normalised so that one ``tau`` serves any number of classes).
"""

from __future__ import annotations

import numbers

import torch

from mp_kernels.checks import check_probability, check_tensor
from mp_kernels.dispatch import choose_backend
from mp_kernels.early_exit_reference import entropy_exit_torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)


def entropy_exit(
    logits: torch.Tensor,
    tau: float,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised softmax entropy of each row of ``logits`` and whether it is at most ``tau``.

    The softmax is computed stably in float32, so logits of +-1e4 give no NaN; the uncertainty is clamped into
    [0, 1] against rounding. NaN policy (both backends): a row with a NaN logit, or infinite logits of both
    signs, has a NaN uncertainty and never exits. Nothing is read back to the host.

    Args:
        logits: ``(batch, classes)``, float16, bfloat16 or float32 (float64 on the ``"torch"`` backend),
            contiguous, ``batch >= 1``, ``classes >= 2``.
        tau: a Python float in [0, 1]: 0 lets only certain examples exit, 1 lets all exit.
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
        validate: accepted for symmetry with the other kernels; there are no values to read here.

    Returns:
        ``exit_mask`` bool ``(batch,)`` (``uncertainty <= tau``, compared in float32) and ``uncertainty``
        float32 ``(batch,)``.
    """
    check_tensor("logits", logits, ndim=2, dtypes=TORCH_DTYPES)
    if logits.shape[0] == 0:
        raise ValueError("logits holds no rows: the batch is empty")
    if logits.shape[1] < 2:
        raise ValueError(f"logits must have at least 2 classes (logits.shape[1]), got {logits.shape[1]}")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"tau must be a float, got {type(tau).__name__}")
    tau = check_probability("tau", tau)
    chosen = choose_backend(backend, logits.device)
    if chosen == "triton":
        if logits.dtype not in TRITON_DTYPES:
            raise TypeError(f"logits must be float16, bfloat16 or float32 on the triton backend, got {logits.dtype}")
        from mp_kernels._triton.early_exit import entropy_exit_triton

        return entropy_exit_triton(logits, tau)
    return entropy_exit_torch(logits, tau)
