"""``finish_slots``: the tail of a fixed-slot packed forward pass (main classifier, exit records, kept token counts
and FLOPs) in one launch, without host read-back.

After the last layer, for every slot ``b`` of the batch:

1. a slot still running with at least one token left (``alive[b]``, ``cu_seqlens[b + 1] > cu_seqlens[b]``) goes
   through the main classifier from its first token, as HF's ``BertPooler``: ``pooled = tanh(pooler(hidden[
   cu_seqlens[b]]))``, ``logits[b] = classifier(pooled)`` (each product accumulated in float32 and rounded to the
   model's dtype, tanh in float32 and rounded, as PyTorch computes them), and ``exit_layer[b] = layers``;
2. a padding slot (``lengths[b] == 0``, it never ran) gets ``logits[b] = 0`` and ``exit_layer[b] = layers``;
3. any other slot (it exited earlier) keeps the logits and exit layer its exit step wrote;
4. the rows of ``kept`` of the layers that do not prune (which no earlier step writes) become the tokens entering
   that layer (``lengths[b]`` for the first layer, else the previous row) where the slot ran the layer
   (``exit_layer[b] > i``), else 0; the pruning layers' rows are left as their compaction wrote them;
5. ``flops[b]`` becomes ``mp_model.flops.flops_from_outputs`` of those outputs, from the integer coefficients of
   ``mp_model.flops.flops_coefficients`` (passed in, since the kernels do not import the model), in int64.

A slot that is padding is treated as padding even if ``alive`` says otherwise.
"""

from __future__ import annotations

import torch

from mp_kernels.checks import check_cu_seqlens, check_tensor
from mp_kernels.dispatch import choose_backend
from mp_kernels.finish_slots_reference import finish_slots_torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TORCH_DTYPES = (*TRITON_DTYPES, torch.float64)
COEFFICIENTS = ("attention_linear", "attention_quadratic", "feed_forward", "exit_head", "main_head")


def check_prunes(prunes: object, layers: int) -> tuple[bool, ...]:
    """Check a host tuple (or list) of one bool per layer: whether that layer prunes tokens."""
    if not isinstance(prunes, tuple | list) or not all(isinstance(p, bool) for p in prunes):
        raise TypeError(f"prunes must be a tuple of bools (one per layer), got {prunes!r}")
    if len(prunes) != layers:
        raise ValueError(f"prunes must hold one bool per layer ({layers}, kept's rows), got {len(prunes)}")
    return tuple(prunes)


def check_coefficients(coefficients: object) -> tuple[int, int, int, int, int]:
    """Check a host tuple of the 5 non-negative int FLOPs coefficients of ``flops_coefficients``."""
    if not isinstance(coefficients, tuple | list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in coefficients
    ):
        raise TypeError(f"coefficients must be a tuple of ints {COEFFICIENTS}, got {coefficients!r}")
    if len(coefficients) != len(COEFFICIENTS) or any(c < 0 for c in coefficients):
        raise ValueError(f"coefficients must be 5 non-negative ints {COEFFICIENTS}, got {coefficients!r}")
    return tuple(coefficients)


def finish_slots(
    hidden: torch.Tensor,
    cu_seqlens: torch.Tensor,
    pooler_weight: torch.Tensor,
    pooler_bias: torch.Tensor,
    classifier_weight: torch.Tensor,
    classifier_bias: torch.Tensor,
    alive: torch.Tensor,
    lengths: torch.Tensor,
    logits: torch.Tensor,
    exit_layer: torch.Tensor,
    kept: torch.Tensor,
    flops: torch.Tensor,
    prunes: tuple[bool, ...],
    coefficients: tuple[int, int, int, int, int],
    *,
    early_exit: bool,
    backend: str | None = None,
) -> None:
    """Classify the slots still running, record padding slots, complete ``kept`` and count FLOPs (in place).

    Args:
        hidden: ``(capacity, d)`` float16, bfloat16 or float32 (float64 on the ``"torch"`` backend), contiguous,
            ``d >= 1``; slot ``b``'s tokens are rows ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        cu_seqlens: int32 ``(batch + 1,)`` prefix sums (empty slots allowed), ending at most at ``capacity``.
        pooler_weight, pooler_bias: ``(d, d)``, ``(d,)``; classifier_weight, classifier_bias: ``(classes, d)``,
            ``(classes,)`` with ``classes >= 1``; all in ``hidden``'s dtype, contiguous.
        alive: bool ``(batch,)``: the slots still running after the last layer.
        lengths: int64 ``(batch,)``: each slot's input length (0 for a padding slot).
        logits: ``(batch, classes)`` in ``hidden``'s dtype: receives the running and padding slots' logits.
        exit_layer: int64 ``(batch,)``: receives ``layers`` at the running and padding slots, read elsewhere.
        kept: int64 ``(layers, batch)``, ``layers >= 1``: row ``i`` the tokens kept after layer ``i``'s pruning;
            the rows of non-pruning layers are written, the others read.
        flops: int64 ``(batch,)``: receives each slot's FLOPs, as ``flops_from_outputs``.
        prunes: host tuple of ``layers`` bools, whether each layer prunes (a compile-time constant of the kernel).
        coefficients: host tuple of 5 non-negative ints, ``mp_model.flops.flops_coefficients(config)``.
        early_exit: whether sub-classifiers ran (their FLOPs are counted).
        backend: ``"triton"``, ``"torch"`` or ``None`` (Triton on CUDA or under ``TRITON_INTERPRET=1``).
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=TORCH_DTYPES)
    device, dtype = hidden.device, hidden.dtype
    d = hidden.shape[1]
    if d == 0:
        raise ValueError("hidden must have at least one feature column (d >= 1), got shape (capacity, 0)")
    check_cu_seqlens(cu_seqlens, hidden.shape[0], device, validate=False)
    batch = cu_seqlens.numel() - 1
    check_tensor("classifier_weight", classifier_weight, ndim=2, dtypes=(dtype,), device=device)
    classes = classifier_weight.shape[0]
    if classes == 0 or classifier_weight.shape[1] != d:
        raise ValueError(f"classifier_weight must have shape (classes >= 1, {d}), got {tuple(classifier_weight.shape)}")
    for name, tensor, shape in (
        ("pooler_weight", pooler_weight, (d, d)),
        ("pooler_bias", pooler_bias, (d,)),
        ("classifier_bias", classifier_bias, (classes,)),
        ("logits", logits, (batch, classes)),
    ):
        check_tensor(name, tensor, ndim=len(shape), dtypes=(dtype,), device=device)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    for name, tensor, kind in (
        ("alive", alive, torch.bool),
        ("lengths", lengths, torch.int64),
        ("exit_layer", exit_layer, torch.int64),
        ("flops", flops, torch.int64),
    ):
        check_tensor(name, tensor, ndim=1, dtypes=(kind,), device=device)
        if tensor.shape[0] != batch:
            raise ValueError(f"{name} must hold one entry per slot ({batch}), got {tensor.shape[0]}")
    check_tensor("kept", kept, ndim=2, dtypes=(torch.int64,), device=device)
    if kept.shape[0] == 0 or kept.shape[1] != batch:
        raise ValueError(f"kept must have shape (layers >= 1, {batch}), got {tuple(kept.shape)}")
    prunes = check_prunes(prunes, kept.shape[0])
    coefficients = check_coefficients(coefficients)
    if not isinstance(early_exit, bool):
        raise TypeError(f"early_exit must be a bool, got {type(early_exit).__name__}")
    args = (hidden, cu_seqlens, pooler_weight, pooler_bias, classifier_weight, classifier_bias, alive, lengths)
    outputs = (logits, exit_layer, kept, flops)
    if choose_backend(backend, device) == "triton":
        if dtype not in TRITON_DTYPES:
            raise TypeError(f"hidden must be float16, bfloat16 or float32 on the triton backend, got {dtype}")
        from mp_kernels._triton.finish_slots import finish_slots_triton

        finish_slots_triton(*args, *outputs, prunes, coefficients, early_exit)
    else:
        finish_slots_torch(*args, *outputs, prunes, coefficients, early_exit)
