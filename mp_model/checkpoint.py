"""A saved model read once, whole, into process memory: ``read_snapshot`` and ``load_snapshot``.

transformers' ``from_pretrained`` memory-maps ``model.safetensors`` and reads it lazily, so a file overwritten in
place while a job runs kills the job (SIGBUS) or hands it a mix of old and new weights, and a folder replaced
between reading ``config.json`` and the weights pairs one model's label names with another's weights. A ``Snapshot``
instead holds the bytes of ``config.json`` and ``model.safetensors``, both opened through one handle on the folder
(a folder moved or replaced meanwhile is either read whole, as it was, or not found), each checked not to have
changed while it was read, and checked against recorded SHA-256 when they exist (``check_files``). The model is then
built from those bytes alone (``load_snapshot``; ``MagicPyramidForSequenceClassification.from_pretrained`` does the
same through ``mp_model.loading``): nothing maps a file that another process can change. The tokenizer's files are
read through the same handle (``load_snapshot_tokenizer``), so weights, label names and tokenizer always come from
one model.

The files are read and checked by ``mp_model.saved_files`` (against the folder's ``checksums.json`` and, for a
run's stage folder, the checksums its ``state.json`` records).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from mp_model.config import MagicPyramidConfig
from mp_model.saved_files import WEIGHTS_FILE, check_files, read_files

VOCABULARY_FILES = ("tokenizer.json", "vocab.txt")  # a BERT tokenizer needs one of them


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The bytes of a saved model, read at one time: its parsed ``config`` (``config.json``), its ``weights`` (the
    tensors of ``model.safetensors``, on the CPU) and the SHA-256 (hex) of each file; the bytes of the tokenizer
    files present (``mp_model.saved_files.TOKENIZER_FILES``) and one SHA-256 over them (names and bytes, in name
    order)."""

    folder: Path
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    config_sha256: str
    weights_sha256: str
    tokenizer_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    tokenizer_sha256: str = ""


def read_snapshot(
    folder: str | os.PathLike[str], checksum: str | None = None, config_checksum: str | None = None
) -> Snapshot:
    """Read the model saved in ``folder`` (``config.json`` and ``model.safetensors``) whole into memory
    (``read_files``), parse the weights and check the files (``check_files``, same arguments).

    Raises:
        ValueError: naming the folder or file, as ``read_files`` and ``check_files`` do, or if the weights do not
            parse.
    """
    files = read_files(folder)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        weights = load(files.weight_bytes)
    except (SafetensorError, ValueError) as error:
        raise ValueError(f"{files.folder / WEIGHTS_FILE} is damaged ({error})") from error
    check_files(files, checksum, config_checksum)
    tokenizer_hash = hashlib.sha256()
    for name in sorted(files.tokenizer_files):
        tokenizer_hash.update(name.encode() + b"\0" + hashlib.sha256(files.tokenizer_files[name]).digest())
    return Snapshot(
        files.folder,
        files.config,
        weights,
        hashlib.sha256(files.config_bytes).hexdigest(),
        hashlib.sha256(files.weight_bytes).hexdigest(),
        files.tokenizer_files,
        tokenizer_hash.hexdigest(),
    )


def load_snapshot_tokenizer(snapshot: Snapshot) -> Any:
    """The tokenizer of ``snapshot``, built from the bytes read with its weights (written to a private temporary
    folder for ``AutoTokenizer``, which reads paths).

    Raises:
        ValueError: naming the folder, if it holds no vocabulary (``tokenizer.json`` or ``vocab.txt``: without one
            a tokenizer loads with only its special tokens and maps every word to ``[UNK]``) or the files do not
            load.
    """
    import tempfile

    from transformers import AutoTokenizer

    folder = snapshot.folder
    if not any(name in snapshot.tokenizer_files for name in VOCABULARY_FILES):
        raise ValueError(f"{folder} holds no tokenizer vocabulary ({' or '.join(VOCABULARY_FILES)})")
    with tempfile.TemporaryDirectory(prefix="mp-tokenizer-") as private:
        for name, data in snapshot.tokenizer_files.items():
            Path(private, name).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(private)
        except (OSError, ValueError, TypeError) as error:
            raise ValueError(f"{folder}: no usable tokenizer ({' '.join(str(error).split())})") from error


def load_snapshot(snapshot: Snapshot) -> Any:
    """A ``MagicPyramidForSequenceClassification`` (float32, on the CPU) built from ``snapshot`` alone.

    Raises:
        ValueError: naming the folder, if the config is not a Magic Pyramid config or the weights do not fit it.
    """
    from mp_model.modeling import MagicPyramidForSequenceClassification

    try:
        config = MagicPyramidConfig.from_dict(snapshot.config)
        model = MagicPyramidForSequenceClassification(config)
        model.load_state_dict(snapshot.weights, strict=True)
    except (ValueError, TypeError, KeyError, RuntimeError) as error:
        shown = " ".join(str(error).split())
        raise ValueError(f"{snapshot.folder}: the model does not load ({type(error).__name__}: {shown})") from error
    return model.float()
