"""``MagicPyramidForSequenceClassification``: one set of weights served as dense BERT, LTP, FastBERT or MP."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import BertModel, BertPreTrainedModel

from mp_kernels.dispatch import choose_backend
from mp_model.config import MagicPyramidConfig, check_thresholds
from mp_model.exit_head import ExitClassifier
from mp_model.graph_engine import GraphEngine
from mp_model.knobs import ResolvedKnobs, ThresholdReader, check_knobs, resolve_knobs
from mp_model.masked_training import masked_forward
from mp_model.ort_layers import supports as ort_supports
from mp_model.outputs import MagicPyramidOutput, MagicPyramidTrainingOutput
from mp_model.packed_inference import PackedEngine
from mp_model.permissions import apply_umask
from mp_model.saved_files import write_manifest

# A tensor or, on the CPU, its numpy view: ``_value_facts`` runs the same operations on either.
Array = torch.Tensor | np.ndarray
SCHEDULE_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_inputs(
    config: MagicPyramidConfig,
    input_ids: object,
    attention_mask: object,
    token_type_ids: object,
    validate: bool = True,
    exit_schedule: object = None,
) -> tuple[torch.Tensor, int, bool]:
    """Validate ``(batch, seq)`` inputs (and ``exit_schedule``); returns the attention mask (all ones if None),
    the longest row and whether any row starts with padding (so needs moving left).

    Shapes, dtypes and devices are always checked; ``validate`` also reads the values, all in one host read on
    a GPU: the mask holds only 0 and 1, one contiguous run of ones per row (padding on either side, no hole);
    token ids lie in ``[0, vocab_size)``, token type ids in ``[0, type_vocab_size)``; ``exit_schedule`` is
    non-negative. Without it the longest row is taken to be the input's width and every row may need moving.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be a (batch, seq) integer tensor, got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    batch, width = input_ids.shape
    if batch == 0 or width == 0:
        raise ValueError(f"input_ids is empty: shape {tuple(input_ids.shape)}")
    if width > config.max_position_embeddings:
        raise ValueError(
            f"input_ids has {width} positions, more than the model's max_position_embeddings "
            f"({config.max_position_embeddings}): truncate the inputs"
        )
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, input_ids has {tuple(input_ids.shape)}")
        if tensor.device != input_ids.device:
            raise ValueError(f"{name} is on {tensor.device}, input_ids on {input_ids.device}")
    if token_type_ids is not None and (token_type_ids.dtype.is_floating_point or token_type_ids.dtype == torch.bool):
        raise ValueError(f"token_type_ids must be an integer tensor, got {token_type_ids.dtype}")
    if exit_schedule is not None:
        if not isinstance(exit_schedule, torch.Tensor) or exit_schedule.shape != input_ids.shape[:1]:
            raise ValueError(f"exit_schedule must be a ({batch},) tensor")
        if exit_schedule.dtype not in SCHEDULE_DTYPES:
            raise ValueError(f"exit_schedule must be an integer (int64) tensor, got {exit_schedule.dtype}")
        if exit_schedule.device != input_ids.device:
            raise ValueError(f"exit_schedule is on {exit_schedule.device}, input_ids on {input_ids.device}")
    if not validate:
        return attention_mask, width, True
    values = (attention_mask, input_ids, token_type_ids, exit_schedule)
    if input_ids.device.type == "cpu":  # numpy takes about a microsecond an operation on small arrays, torch several
        facts = [int(fact) for fact in _value_facts(*(None if t is None else t.numpy() for t in values))]
    else:  # one host read
        facts = torch.stack([fact.long() for fact in _value_facts(*values)]).tolist()
    bad, empty_rows, longest, holed, ids_low, ids_high, types_low, types_high, schedule_low, left = facts
    if bad:
        raise ValueError("attention_mask must hold only 0 and 1")
    if empty_rows:
        empty = ((attention_mask != 0).sum(dim=1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {empty} hold no token (all padding)")
    if holed:
        real = attention_mask != 0
        runs = real[:, 0].long() + (real[:, 1:] & ~real[:, :-1]).sum(dim=1)
        rows = (runs > 1).nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows} have padding between real tokens: each row needs one contiguous run of "
            "ones (padding on the left, the right or both sides)"
        )
    for name, low, high, size, field in (
        ("input_ids", ids_low, ids_high, config.vocab_size, "vocab_size"),
        ("token_type_ids", types_low, types_high, config.type_vocab_size, "type_vocab_size"),
    ):
        if low < 0 or high >= size:
            raise ValueError(f"{name} must lie in [0, {field}={size}), got values in [{low}, {high}]")
    if schedule_low < 0:
        raise ValueError(f"exit_schedule must be non-negative, got {schedule_low}")
    return attention_mask, int(longest), bool(left)


def _value_facts(mask: Array, ids: Array, types: Array | None, schedule: Array | None) -> list[Array]:
    """What ``_check_inputs`` reads from the values, as 0-d torch tensors or numpy scalars (the same operations
    serve both): non-0/1 mask entries, rows without a token, the longest row, rows with more than one run of
    ones, the ranges of the token ids, token type ids and schedule, and whether a row starts with padding."""
    real = mask != 0
    lengths = real.sum(1)
    runs = real[:, 0] * 1 + (real[:, 1:] & ~real[:, :-1]).sum(1)
    types = ids[:1, :1] * 0 if types is None else types
    schedule = ids[0, :1] * 0 if schedule is None else schedule
    return [
        ((mask != 0) & (mask != 1)).any(),
        (lengths == 0).sum(),
        lengths.max(),
        (runs > 1).sum(),
        ids.min(),
        ids.max(),
        types.min(),
        types.max(),
        schedule.min(),
        (~real[:, 0]).any(),
    ]


def _shifts(attention_mask: torch.Tensor) -> torch.Tensor:
    """``(batch,)`` int64: the column of each row's first real token (0 for a row without one), on the device."""
    return (attention_mask != 0).to(torch.int32).argmax(dim=1)


def _roll_rows(tensor: torch.Tensor | None, shifts: torch.Tensor) -> torch.Tensor | None:
    """Each row of ``(..., batch, seq)`` ``tensor`` rotated left by its shift: ``out[b, j] = in[b, (j + s_b) % seq]``.

    A negative shift rotates right (undoes the rotation). One gather, no host read.
    """
    if tensor is None:
        return None
    width = tensor.shape[-1]
    columns = torch.arange(width, device=tensor.device)
    index = torch.remainder(columns[None, :] + shifts[:, None], width)
    return tensor.gather(-1, index.expand(tensor.shape))


class MagicPyramidForSequenceClassification(BertPreTrainedModel):
    """A BERT classifier with learned token pruning and early exit (Magic Pyramid).

    Holds the BERT backbone (with its pooler), the main classifier (``dropout -> Linear`` on the pooled
    first token, as ``BertForSequenceClassification``), one ``ExitClassifier`` after each layer but the last,
    and one learnable pruning threshold per layer (``thresholds``, on the length-normalised importance scale).

    ``from_pretrained`` takes a plain BERT-architecture folder (``BertModel`` or ``BertForSequenceClassification``;
    missing heads are initialised) or a folder saved by this class.

    Calling the model runs inference (``forward``): it resolves the knobs once (``resolve_knobs``,
    ``mp_model.knobs``) and hands them to one engine (``mp_model.engine.Engine``): on CUDA the sync-free graph
    engine (``graph_engine``, ``mp_model.graph_engine``), elsewhere the packed path (``mp_model.packed_inference``,
    with ONNX Runtime for lone sequences on a CPU in float32). Every engine computes the function that
    ``mp_model.reference`` states plainly. Training uses ``masked_forward``.
    """

    config_class = MagicPyramidConfig

    def __init__(self, config: MagicPyramidConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=True)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.exits = nn.ModuleList(ExitClassifier(config) for _ in range(config.num_hidden_layers - 1))
        self.thresholds = nn.Parameter(torch.tensor(config.prune_thresholds, dtype=torch.float32))
        self._graph_engine: GraphEngine | None = None
        # The packed engine without and with ONNX Runtime for lone sequences.
        self._packed_engines = (PackedEngine(self), PackedEngine(self, use_ort=True))
        self._threshold_reader = ThresholdReader()
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> MagicPyramidForSequenceClassification:
        """``PreTrainedModel.from_pretrained``, in float32 unless ``dtype`` (or ``torch_dtype``) says otherwise, on
        bytes of its own (``mp_model.loading``): a local folder's files are read whole and checked against its
        ``checksums.json`` and the checksums its run records, nothing stays memory-mapped.

        transformers 5 loads a checkpoint in its stored dtype; a float16 copy of a model would then give float16
        master weights, which AdamW cannot train (its ``eps`` underflows), and a float16 model on the CPU path.
        Cast for inference afterwards (``model.to(torch.bfloat16)``) or pass ``dtype``.

        Raises:
            ValueError: naming the folder or file, if a local folder is missing, its ``config.json`` is missing
                (and no ``config`` is given) or not a JSON object, its ``model.safetensors`` is damaged, or its files
                do not match their ``checksums.json`` or their run's recorded checksums.
        """
        from mp_model.loading import load_pretrained

        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = torch.float32
        return load_pretrained(super().from_pretrained, cls.config_class, *args, **kwargs)

    @property
    def graph_engine(self) -> GraphEngine:
        """The model's ``GraphEngine`` (created on first use): ``warm_up``, ``stats``, ``reset``."""
        if self._graph_engine is None:
            self._graph_engine = GraphEngine(self)
        return self._graph_engine

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MagicPyramidForSequenceClassification):
            module.thresholds.copy_(torch.tensor(self.config.prune_thresholds, dtype=module.thresholds.dtype))

    def set_thresholds(self, thresholds: list[float] | torch.Tensor) -> None:
        """Set the per-layer pruning thresholds (also recorded in the config, so that they are saved).

        Every value must be finite: NaN or infinity raise a ``ValueError`` and leave the thresholds unchanged.
        """
        values = torch.as_tensor(thresholds, dtype=torch.float32).flatten().cpu()
        if values.numel() != self.config.num_hidden_layers:
            raise ValueError(f"thresholds needs {self.config.num_hidden_layers} values, got {values.numel()}")
        host = check_thresholds(values.tolist(), "thresholds")
        with torch.no_grad():
            self.thresholds.copy_(values.to(self.thresholds.device))
        self.config.prune_thresholds = host

    def checked_thresholds(self) -> list[float]:
        """The learned thresholds as float64 values; raise if one is NaN or infinite (it would silently stop or
        break that layer's pruning).

        The thresholds are read back only when the parameter changed since the last successful check (its
        storage or version counter; ``mp_model.knobs.ThresholdReader``), so steady-state inference reads nothing.
        Change them with ``set_thresholds`` or any in-place operation on the parameter; a write through
        ``thresholds.data`` leaves the version counter unchanged and is not seen, as for the weights the packed
        path, the ONNX Runtime sessions and the GPU engine derive their copies from.
        """
        return self._threshold_reader(self.thresholds)

    def resolve_knobs(
        self,
        *,
        tau: float | None = None,
        threshold_scale: float | None = None,
        prune: bool | None = None,
        early_exit: bool | None = None,
        exit_schedule: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> ResolvedKnobs:
        """The knobs of a call (as ``forward`` takes them; None: the config's defaults), checked and resolved for
        the engines (``mp_model.knobs.ResolvedKnobs``): the learned thresholds scaled, the pruning layers.

        Raises:
            ValueError: ``tau`` outside [0, 1] or NaN, ``threshold_scale`` negative, NaN or infinite, or NaN or
                infinite learned thresholds when pruning.
        """
        config = self.config
        prune = config.use_pruning if prune is None else prune
        return resolve_knobs(
            self.checked_thresholds() if prune else None,
            config.num_hidden_layers,
            tau=config.exit_tau if tau is None else tau,
            threshold_scale=getattr(config, "threshold_scale", 1.0) if threshold_scale is None else threshold_scale,
            early_exit=config.use_early_exit if early_exit is None else early_exit,
            exit_schedule=exit_schedule,
            backend=backend,
        )

    def save_pretrained(self, *args: object, **kwargs: object) -> None:
        """Save weights (safetensors) and config; the config records the current thresholds. Then, last, the
        folder's ``checksums.json`` (``mp_model.checkpoint.write_manifest``), which every load checks the files
        against: a folder copied over in parts is refused until it is whole again."""
        self.config.prune_thresholds = self.thresholds.detach().float().cpu().tolist()
        super().save_pretrained(*args, **kwargs)
        folder = kwargs.get("save_directory", args[0] if args else None)
        apply_umask(folder)  # the weights' file is written 0600
        write_manifest(folder)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        tau: float | None = None,
        threshold_scale: float | None = None,
        prune: bool | None = None,
        early_exit: bool | None = None,
        backend: str | None = None,
        exit_schedule: torch.Tensor | None = None,
        engine: str | None = None,
        validate: bool = True,
        return_exit_logits: bool = False,
    ) -> MagicPyramidOutput:
        """Inference with real removal of pruned tokens and exited examples.

        Padding may be on either side (or both): position ids count from each row's first real token. The graph
        engine packs the real tokens wherever they are (``embed_pack``); for the other engines each row's real
        tokens are first moved to the left (one gather with per-row shifts computed on the device, no host read).
        Left-, right- and mixed-padded batches of the same texts give identical outputs.

        Args:
            input_ids: ``(batch, seq)`` int64 (or int32) token ids in ``[0, vocab_size)``, padded (any side).
            attention_mask: ``(batch, seq)`` 0/1, 1 at real tokens: one contiguous run of ones per row (a row
                with padding between real tokens is an error); every row needs one; None: no padding.
            token_type_ids: ``(batch, seq)`` integers in ``[0, type_vocab_size)``, or None.
            tau: exit threshold on the normalised entropy in [0, 1] (default ``config.exit_tau``); larger
                exits earlier.
            threshold_scale: multiplies every layer's pruning threshold (0 prunes nothing; larger prunes more;
                default ``config.threshold_scale``, 1.0 unless set).
            prune, early_exit: switch token pruning / early exit (defaults from the config). Both off gives
                the dense model through the packed path.
            backend: kernel backend (``None``: Triton on CUDA, PyTorch on CPU).
            exit_schedule: ``(batch,)`` int64 (or another integer dtype) on the inputs' device: the layer after
                which each example exits, replacing the entropy test (benchmarks replay a measured exit pattern
                with it); values must be non-negative; 0 and values ``>= num_hidden_layers`` never exit.
            engine: ``"graph"`` (the sync-free engine, CUDA graphs per bucket on CUDA), ``"packed"`` (host-sized
                packed path, PyTorch operators), ``"ort"`` (the packed path with a lone sequence's layers run by
                ONNX Runtime, ``mp_model.ort_layers``: float32 on a CPU, needs ``onnx`` and ``onnxruntime``; the
                other sequences' layers use the PyTorch kernels) or ``None``: graph on CUDA, ``"ort"`` where it can
                run and the kernels resolve to PyTorch, else packed. All give the same outputs (to float32
                rounding).
            validate: read the inputs' values to check them (the mask's 0/1 values and contiguous runs, the
                token and type id ranges, the schedule's sign: one host read on a GPU); ``False`` skips it on hot
                paths whose inputs are known to be valid.
            return_exit_logits: also run every sub-classifier on every example still present and return their
                logits (``exit_logits``, for evaluations that simulate early exit offline); runs on the packed
                path whatever ``engine`` says.

        Raises:
            ValueError: bad shapes, dtypes, devices or (with ``validate``) values of the inputs, knobs out of
                range (``tau`` outside [0, 1] or NaN, ``threshold_scale`` negative, NaN or infinite), or NaN or
                infinite learned thresholds when pruning.

        Returns:
            ``MagicPyramidOutput`` with logits, exit layer, kept tokens per layer and FLOPs per example.
        """
        knobs = self.resolve_knobs(
            tau=tau,
            threshold_scale=threshold_scale,
            prune=prune,
            early_exit=early_exit,
            exit_schedule=exit_schedule,
            backend=backend,
        )
        attention_mask, max_length, left_padded = _check_inputs(
            self.config, input_ids, attention_mask, token_type_ids, validate, exit_schedule
        )
        if engine not in (None, "graph", "packed", "ort"):
            raise ValueError(f"engine must be 'graph', 'packed', 'ort' or None, got {engine!r}")
        ort_runs = engine in (None, "ort") and ort_supports(self, input_ids.device)
        if engine == "ort" and (not ort_runs or backend == "triton"):
            raise ValueError(
                "engine='ort' runs float32 models on a CPU with a GELU activation, with the PyTorch kernels beside "
                "it (backend None or 'torch'), and needs onnx and onnxruntime (pip install onnx onnxruntime)"
            )
        if engine is None and ort_runs:  # the default engine uses ORT where the PyTorch kernels would run
            ort_runs = choose_backend(backend, input_ids.device) == "torch"
        if not return_exit_logits and (engine == "graph" or (engine is None and input_ids.is_cuda)):
            # embed_pack counts positions over each row's real tokens: left padding needs no move
            return self.graph_engine(input_ids, attention_mask, token_type_ids, knobs)
        if left_padded:  # known from validation; without it, moving right-padded rows by 0 is the identity
            shifts = _shifts(attention_mask)
            input_ids, attention_mask, token_type_ids = (
                _roll_rows(tensor, shifts) for tensor in (input_ids, attention_mask, token_type_ids)
            )
        return self._packed_engines[ort_runs](
            input_ids,
            attention_mask,
            token_type_ids,
            knobs,
            max_length=max_length,
            return_exit_logits=return_exit_logits,
            lone_length=max_length if validate else None,
        )

    def masked_forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        mask_mode: str = "none",
        temperature: float | None = None,
        threshold_scale: float = 1.0,
    ) -> MagicPyramidTrainingOutput:
        """Differentiable padded forward pass for training (see ``mp_model.masked_training``).

        ``mask_mode`` is ``"none"``, ``"soft"`` or ``"hard"``; ``temperature`` defaults to
        ``config.soft_mask_temperature``. Inputs are checked and padding handled as in ``forward`` (either side;
        the real tokens are moved left before the pass), and ``masks`` are returned in the inputs' own columns.
        """
        check_knobs(0.0, float(threshold_scale))
        attention_mask, _, left_padded = _check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        if mask_mode != "none":
            self.checked_thresholds()
        inputs = (input_ids, attention_mask, token_type_ids)
        if left_padded:
            shifts = _shifts(attention_mask)
            inputs = tuple(_roll_rows(tensor, shifts) for tensor in inputs)
        out = masked_forward(
            self,
            *inputs,
            mask_mode=mask_mode,
            temperature=self.config.soft_mask_temperature if temperature is None else temperature,
            threshold_scale=float(threshold_scale),
        )
        if left_padded:
            out.masks = _roll_rows(out.masks, -shifts)
        return out
