"""A saved model read once, whole, into process memory: ``read_snapshot`` and ``load_snapshot``.

``from_pretrained`` memory-maps ``model.safetensors`` and reads it lazily, so a file overwritten in place while a
job runs kills the job (SIGBUS) or hands it a mix of old and new weights, and a folder replaced between reading
``config.json`` and the weights pairs one model's label names with another's weights. A ``Snapshot`` instead holds
the bytes of ``config.json`` and ``model.safetensors``, both opened through one handle on the folder (a folder
moved or replaced meanwhile is either read whole, as it was, or not found), each checked not to have changed while
it was read, and the weights checked against a recorded SHA-256 when one is given. The model is then built from
those bytes alone (``load_snapshot``): nothing maps a file that another process can change. The tokenizer's files
are read through the same handle (``load_snapshot_tokenizer``), so weights, label names and tokenizer always come
from one model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from mp_model.config import MagicPyramidConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt")  # a BERT tokenizer needs one of them


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The bytes of a saved model, read at one time: its parsed ``config`` (``config.json``), its ``weights`` (the
    tensors of ``model.safetensors``, on the CPU) and the SHA-256 (hex) of each file; the bytes of the tokenizer
    files present (``TOKENIZER_FILES``) and one SHA-256 over them (names and bytes, in name order)."""

    folder: Path
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    config_sha256: str
    weights_sha256: str
    tokenizer_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    tokenizer_sha256: str = ""


def _read_whole(directory: int, name: str, folder: Path) -> bytes:
    """The bytes of ``name`` in the folder open as ``directory``; a ``ValueError`` if it is missing or changed
    (size, time or inode) while it was read."""
    try:
        handle = os.open(name, os.O_RDONLY, dir_fd=directory)
    except FileNotFoundError as error:
        raise ValueError(f"{folder} is not a saved model: no {name}") from error
    with os.fdopen(handle, "rb") as file:
        before = os.fstat(file.fileno())
        data = file.read()
        after = os.fstat(file.fileno())
    changed = (before.st_size, before.st_mtime_ns, before.st_ino) != (after.st_size, after.st_mtime_ns, after.st_ino)
    if changed or len(data) != after.st_size:
        raise ValueError(f"{folder / name} changed while it was read (another process is writing it): try again")
    return data


def read_snapshot(folder: str | os.PathLike[str], checksum: str | None = None) -> Snapshot:
    """Read the model saved in ``folder`` (``config.json`` and ``model.safetensors``) whole into memory.

    Args:
        folder: a folder written by ``save_pretrained``.
        checksum: the SHA-256 (hex) recorded for its ``model.safetensors`` (a run's ``state.json``), or ``None``.

    Raises:
        ValueError: naming the folder, if it or a file is missing, a file changed while it was read, the config is
            not a JSON object, the weights do not parse or do not match ``checksum``.
    """
    folder = Path(folder)
    try:
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as error:
        raise ValueError(f"{folder} is not a saved model: no such folder") from error
    except NotADirectoryError as error:
        raise ValueError(f"{folder} is not a saved model: not a folder") from error
    try:
        config_bytes = _read_whole(directory, CONFIG_FILE, folder)
        weight_bytes = _read_whole(directory, WEIGHTS_FILE, folder)
        present = set(os.listdir(directory))
        tokenizer_files = {name: _read_whole(directory, name, folder) for name in TOKENIZER_FILES if name in present}
    finally:
        os.close(directory)
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_FILE} does not hold a JSON object")
    weights_sha256 = hashlib.sha256(weight_bytes).hexdigest()
    if checksum is not None and weights_sha256 != checksum:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match its recorded SHA-256 (changed or damaged)")
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        weights = load(weight_bytes)
    except (SafetensorError, ValueError) as error:
        raise ValueError(f"{folder / WEIGHTS_FILE} is damaged ({error})") from error
    tokenizer_hash = hashlib.sha256()
    for name in sorted(tokenizer_files):
        tokenizer_hash.update(name.encode() + b"\0" + hashlib.sha256(tokenizer_files[name]).digest())
    return Snapshot(
        folder,
        config,
        weights,
        hashlib.sha256(config_bytes).hexdigest(),
        weights_sha256,
        tokenizer_files,
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
