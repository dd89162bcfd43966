"""``from_pretrained`` that owns its bytes and checks them: ``load_pretrained``.

``PreTrainedModel.from_pretrained`` memory-maps ``model.safetensors`` (and ``pytorch_model.bin``) and reads it lazily:
a file truncated or overwritten in place after loading kills the next forward (SIGBUS) or changes the model's
answers, and ``config.json`` and the weights are read at different times, so a folder being replaced can pair one
model's label names with another's weights. For a local folder holding ``model.safetensors``, ``load_pretrained``
instead reads the files whole and checks them first (``mp_model.checkpoint.check_files``: against the folder's
``checksums.json`` and, for a run's stage folder, the checksums its ``state.json`` records), writes those bytes to a
private temporary folder and lets transformers build the model from there with ``disable_mmap=True`` (every keyword
of ``from_pretrained`` keeps working: ``num_labels``, ``dtype``, ``config``, ``ignore_mismatched_sizes``, config
fields...). Any other source (a Hub id, sharded or ``.bin`` weights) is loaded as transformers loads it, then every
parameter and buffer is copied out of the mapping. Damage is a ``ValueError`` naming the file, before any work.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mp_model.saved_files import CONFIG_FILE, WEIGHTS_FILE, check_files, read_files, recorded_checksums

# Keywords that make transformers read other files than ``config.json`` and ``model.safetensors`` of the folder.
OTHER_FILES = ("variant", "gguf_file")


def _local_folder(source: Any, subfolder: str) -> Path | None:
    """The local folder that ``source`` (and ``subfolder``) names, or ``None`` for a Hub id.

    Raises:
        ValueError: if ``source`` names a local path (a path object, an absolute or ``./`` path, one with more than
            one ``/``, or one whose parent folder exists) that is missing or not a folder.
    """
    if not isinstance(source, str | os.PathLike):
        return None
    path = Path(source) / subfolder if subfolder else Path(source)
    if path.is_dir():
        return path
    text = os.fspath(source)
    local = (
        isinstance(source, os.PathLike)
        or os.path.isabs(text)
        or text.startswith((".", "~"))
        or text.count("/") > 1
        or os.path.exists(text)
        or ("/" in text and os.path.isdir(os.path.dirname(text)))
    )
    if not local:
        return None
    raise ValueError(f"{path} is not a saved model: {'not a folder' if path.exists() else 'no such folder'}")


def _check_config_file(folder: Path) -> None:
    """A ``ValueError`` naming ``folder``'s ``config.json`` if it is missing, not JSON or not a JSON object."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{folder} holds no {CONFIG_FILE}: it is not a saved model folder")
    try:
        values = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({' '.join(str(error).split())})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a JSON object")


def own_tensors(model: torch.nn.Module) -> torch.nn.Module:
    """Copy every parameter and buffer of ``model`` into memory of its own (out of any file mapping), keeping tied
    parameters tied; returns ``model``."""
    copies: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for parameter in model.parameters():  # each shared parameter once
            parameter.data = parameter.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = copies.setdefault(id(buffer), buffer.clone())
    return model


def _check_config_values(folder: Path, config_class: type, values: dict[str, Any]) -> None:
    """A ``ValueError`` naming ``folder``'s ``config.json`` if ``values`` do not make a ``config_class``."""
    try:
        config_class.from_dict(values)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{folder / CONFIG_FILE}: {' '.join(str(error).split())}") from error


def _owned(loaded: Any) -> Any:
    """``loaded`` (a model, or ``(model, loading_info)``) with the model's tensors its own (``own_tensors``)."""
    own_tensors(loaded[0] if isinstance(loaded, tuple) else loaded)
    return loaded


def _check_weights(files_folder: Path, private: Path) -> None:
    """A ``ValueError`` naming ``files_folder``'s ``model.safetensors`` unless the copy in ``private`` parses (its
    header read, whole and covering the file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(private / WEIGHTS_FILE), "pt") as file:
            file.keys()
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{files_folder / WEIGHTS_FILE} is damaged ({' '.join(str(error).split())})") from error


def load_pretrained(load: Callable[..., Any], config_class: type, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)`` (a ``from_pretrained``) on bytes read whole and checked, as the module says.

    Raises:
        ValueError: naming the folder or file, if a local folder is missing, its ``config.json`` is missing (and no
            ``config`` is given), not JSON, not an object or not a valid ``config_class`` (checked first: a file
            wrong in itself is named as such), its ``model.safetensors`` is damaged, or its files do not match their
            ``checksums.json`` or the checksums its run records (a run whose ``state.json`` is missing or damaged
            included).
    """
    source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
    folder = _local_folder(source, kwargs.get("subfolder") or "")
    if folder is None:
        return _owned(load(*args, **kwargs))
    has_config = (folder / CONFIG_FILE).exists()
    if has_config or "config" not in kwargs:
        _check_config_file(folder)
    other_files = any(kwargs.get(name) for name in OTHER_FILES) or kwargs.get("use_safetensors") is False
    if not has_config or not (folder / WEIGHTS_FILE).exists() or other_files:
        return _owned(load(*args, **kwargs))
    checksums = recorded_checksums(folder)
    files = read_files(folder)
    kwargs.setdefault("disable_mmap", True)
    kwargs.pop("subfolder", None)
    with tempfile.TemporaryDirectory(prefix="mp-load-") as private:
        (Path(private) / CONFIG_FILE).write_bytes(files.config_bytes)
        (Path(private) / WEIGHTS_FILE).write_bytes(files.weight_bytes)
        _check_weights(folder, Path(private))
        if "config" not in kwargs:
            _check_config_values(folder, config_class, files.config)
        check_files(files, *checksums)
        if args:
            args = (private, *args[1:])
        else:
            kwargs["pretrained_model_name_or_path"] = private
        loaded = load(*args, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
    model.config._name_or_path = os.fspath(source)
    model.name_or_path = os.fspath(source)
    return loaded
