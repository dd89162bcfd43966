"""The HF twin of a Magic Pyramid model: ``BertForSequenceClassification`` holding the same weights.

The dense baseline that evaluation (``mp eval``) and the benchmarks (``bench.e2e``) time the model against: a
Magic Pyramid model's backbone, pooler and main classifier load into HF's BERT unchanged (the sub-classifiers and
thresholds are left out), so the twin computes the dense model with HF's own attention implementations.
"""

from __future__ import annotations

from transformers import BertConfig, BertForSequenceClassification

from mp_model.modeling import MagicPyramidForSequenceClassification


def hf_twin(model: MagicPyramidForSequenceClassification, attention: str = "sdpa") -> BertForSequenceClassification:
    """``BertForSequenceClassification`` with ``model``'s backbone, pooler and classifier weights, in eval mode on
    ``model``'s device and dtype, with ``attn_implementation=attention`` (``"sdpa"``, ``"eager"``, ...)."""
    config = BertConfig.from_dict(model.config.to_dict())
    twin = BertForSequenceClassification._from_config(config, attn_implementation=attention)
    missing, _ = twin.load_state_dict(model.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"weights missing for the HF twin: {missing}")
    parameter = next(model.parameters())
    return twin.to(device=parameter.device, dtype=parameter.dtype).eval()
