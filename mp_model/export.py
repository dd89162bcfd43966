"""Export a Magic Pyramid model's dense weights as a plain ``BertForSequenceClassification`` checkpoint.

The backbone, pooler and main classifier of ``MagicPyramidForSequenceClassification`` are BERT's under BERT's
names, so they load into ``BertForSequenceClassification`` unchanged; the sub-classifiers (``exits.*``) and the
pruning thresholds are left out, and the config keeps only BERT's fields (model type ``bert``, the label names
kept). The exported folder loads with plain transformers, without this package, and computes the dense model:
the logits of ``model(..., prune=False, early_exit=False)``. ``mp export`` runs ``to_bert`` on a saved folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from mp_model.config import MagicPyramidConfig
from mp_model.modeling import MagicPyramidForSequenceClassification

# What a Magic Pyramid state dict holds beyond BERT's: the sub-classifiers and the pruning thresholds.
DROPPED_PREFIXES = ("exits.", "thresholds")


def bert_config(config: MagicPyramidConfig) -> BertConfig:
    """``config`` as a plain ``BertConfig``: every field BERT has (sizes, labels, dropout, ...), none of Magic
    Pyramid's (thresholds, exit settings)."""
    bert_fields = BertConfig().to_dict().keys() - {"model_type"}  # the type is the class's: "bert"
    values = {key: value for key, value in config.to_dict().items() if key in bert_fields}
    values["architectures"] = [BertForSequenceClassification.__name__]
    return BertConfig.from_dict(values)


def _load(source: MagicPyramidForSequenceClassification | str | Path) -> MagicPyramidForSequenceClassification:
    if isinstance(source, MagicPyramidForSequenceClassification):
        return source
    if not isinstance(source, str | Path):
        raise TypeError(
            f"model must be a MagicPyramidForSequenceClassification or a folder path, got {type(source).__name__}"
        )
    if not Path(source).is_dir():
        raise ValueError(f"model folder {source} does not exist")
    try:
        return MagicPyramidForSequenceClassification.from_pretrained(str(source))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
        raise ValueError(f"model folder {source} does not load ({type(error).__name__}: {error})") from error


def _source_tokenizer(folder: Path) -> Any:
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"model folder {folder} has no usable tokenizer: pass tokenizer= ({error})") from error


def to_bert(
    model: MagicPyramidForSequenceClassification | str | Path, out: str | Path, *, tokenizer: Any = None
) -> Path:
    """Write ``model``'s dense weights to the folder ``out`` as a ``BertForSequenceClassification`` checkpoint.

    Args:
        model: a ``MagicPyramidForSequenceClassification`` or a folder saved by one (a run's ``stage4_exits``).
        out: the folder to write: it must not exist or be empty (it is created, parents included).
        tokenizer: saved beside the weights. ``None``: the source folder's tokenizer when ``model`` is a folder
            (a ``ValueError`` if it has none), no tokenizer when ``model`` is a model object.

    Returns:
        ``out`` as a ``Path``. The weights keep ``model``'s dtype; ``BertForSequenceClassification.from_pretrained
        (out)`` gives the logits of ``model(..., prune=False, early_exit=False)`` (to float rounding).

    Raises:
        TypeError: ``model`` is neither a Magic Pyramid model nor a path.
        ValueError: the folder is missing, does not load or has no tokenizer; ``out`` is a file or a non-empty
            folder; the weights do not map onto BERT.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out {out} exists and is not an empty folder: refusing to overwrite it")
    source = _load(model)
    if tokenizer is None and not isinstance(model, MagicPyramidForSequenceClassification):
        tokenizer = _source_tokenizer(Path(model))
    parameter = next(source.parameters())
    bert = BertForSequenceClassification(bert_config(source.config)).to(dtype=parameter.dtype)
    missing, unexpected = bert.load_state_dict(source.state_dict(), strict=False)
    foreign = [key for key in unexpected if not key.startswith(DROPPED_PREFIXES)]
    if missing or foreign:
        raise ValueError(f"the model's weights do not map onto BERT: missing {missing}, unexpected {foreign}")
    out.mkdir(parents=True, exist_ok=True)
    bert.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
