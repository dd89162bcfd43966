"""The ONNX Runtime baseline of ``bench.e2e`` (method ``ort``): the strongest dense baseline on a CPU.

The model's HF twin (``BertForSequenceClassification``, same weights, eager attention) is exported to ONNX with
the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``, dynamic batch and sequence axes, opset 17),
optimised by ORT's transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")``),
and loaded into one ``InferenceSession`` per model on the CPU execution provider with ``intra_op_num_threads``
equal to ``--threads`` (0: ORT's default, every core). The optimised graph's fused operators are recorded
(``fused_operators``): on the eager twin the optimizer fuses each layer's attention into one ``Attention`` node,
the residual adds and LayerNorms into ``SkipLayerNormalization`` and the embeddings into
``EmbedLayerNormalization``; the sdpa twin's graph gets no ``Attention`` fusion, and the dynamo exporter needs
``onnxscript``. The session's logits are checked against the torch twin's on a padded batch of real texts
(``torch.testing.assert_close``, atol 1e-4, rtol 1e-3) and the largest absolute difference recorded
(``max_abs_error``). Export files go to a temporary directory, removed once the session is loaded.

Needs the optional extra ``magic-pyramid[onnx]`` (``onnx``, ``onnxruntime``); without it ``OrtUnavailable`` is
raised with the install hint and ``bench.e2e`` records the method as skipped.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.e2e_models import MethodUnavailable
from mp_model.hf_twin import hf_twin
from mp_model.modeling import MagicPyramidForSequenceClassification

ORT_METHOD = "ort"
INSTALL_HINT = "pip install 'magic-pyramid[onnx]' (onnx and onnxruntime)"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OPSET = 17
CHECK_ATOL, CHECK_RTOL = 1e-4, 1e-3


class OrtUnavailable(MethodUnavailable):
    """onnx or onnxruntime is not installed (the message carries the install hint)."""


def missing_packages() -> list[str]:
    """The packages of the ``onnx`` extra that cannot be imported here."""
    return [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]


class _Logits(torch.nn.Module):
    """``BertForSequenceClassification`` returning its logits only, with positional inputs (what the exporter
    traces)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


@dataclass
class OrtBaseline:
    """One model's ONNX Runtime session and how it was made.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        threads: its ``intra_op_num_threads`` (0: ORT's default).
        prepare_s: seconds of export, optimisation, session creation and the check.
        max_abs_error: largest ``|ORT - torch|`` logit on the check batch.
        fused_operators: the optimizer's fused-operator counts (nonzero ones).
        versions: onnx and onnxruntime versions.
    """

    session: Any
    threads: int
    prepare_s: float
    max_abs_error: float
    fused_operators: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: batch[name].cpu().numpy() for name in INPUT_NAMES}
        return torch.from_numpy(self.session.run(None, feeds)[0])

    def describe(self) -> dict[str, Any]:
        """JSON-ready description for the results' metadata."""
        return {
            "exporter": f"torch.onnx.export(dynamo=False, opset {OPSET}) of the eager HF twin",
            "optimizer": "onnxruntime.transformers.optimizer.optimize_model(model_type='bert')",
            "intra_op_threads": self.threads,
            "prepare_s": self.prepare_s,
            "max_abs_error": self.max_abs_error,
            "check": f"torch.testing.assert_close(atol={CHECK_ATOL}, rtol={CHECK_RTOL}) against the torch twin",
            "fused_operators": self.fused_operators,
            "versions": self.versions,
        }


def build_ort(
    model: MagicPyramidForSequenceClassification, check: dict[str, torch.Tensor], threads: int
) -> OrtBaseline:
    """Export, optimise and load ``model``'s HF twin (see the module docstring); check it on the batch ``check``.

    Raises ``OrtUnavailable`` without the packages, ``MethodUnavailable`` off the CPU.
    """
    missing = missing_packages()
    if missing:
        raise OrtUnavailable(f"{', '.join(missing)} not installed: {INSTALL_HINT}")
    if next(model.parameters()).device.type != "cpu":
        raise MethodUnavailable("ort runs on the CPU execution provider only")
    import onnx
    import onnxruntime
    from onnxruntime.transformers.optimizer import optimize_model

    started = time.perf_counter()
    twin = hf_twin(model, "eager").float().eval()
    wrapper = _Logits(twin).eval()
    config = model.config
    example = tuple(check[name][:2].cpu() for name in INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES} | {"logits": {0: "batch"}}
    with tempfile.TemporaryDirectory(prefix="mp-onnx-") as folder:
        exported, optimised = Path(folder) / "model.onnx", Path(folder) / "model-opt.onnx"
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                example,
                str(exported),
                input_names=list(INPUT_NAMES),
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
        wrapper.eval()  # the exporter restores the training flag of the wrapper's whole tree
        optimizer = optimize_model(
            str(exported),
            model_type="bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
        )
        fused = {name: count for name, count in optimizer.get_fused_operator_statistics().items() if count}
        optimizer.save_model_to_file(str(optimised))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(threads, 0)
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(optimised), options, providers=["CPUExecutionProvider"])
    baseline = OrtBaseline(
        session, threads, 0.0, 0.0, fused, {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    )
    cpu_check = {name: check[name].cpu() for name in INPUT_NAMES}
    with torch.no_grad():
        expected = wrapper(*(cpu_check[name] for name in INPUT_NAMES)).float()
    got = baseline(cpu_check)
    torch.testing.assert_close(got, expected, atol=CHECK_ATOL, rtol=CHECK_RTOL)
    baseline.max_abs_error = float((got - expected).abs().max())
    baseline.prepare_s = time.perf_counter() - started
    return baseline
