"""The files of a saved model and of a run, read whole and checked: ``read_files``, ``check_files``,
``write_manifest``, ``recorded_checksums``.

What ties the files of one save together: ``save_pretrained`` writes ``checksums.json`` last (``write_manifest``:
the SHA-256 of ``config.json`` and ``model.safetensors``, replaced atomically), and every read checks the files
against it when it is there (``check_files``), so a folder copied over in several commands (weights, then config) is
refused while it is half-copied instead of pairing one model's label names with another's weights. A run's stage
folder is also checked against the SHA-256 its run's ``state.json`` records for its weights and config
(``recorded_checksums``; a run whose ``state.json`` is missing or damaged is refused, never read unchecked). Folders
saved before the manifest existed still load. The files are read through one handle on the folder (a folder moved
or replaced meanwhile is either read whole, as it was, or not found), each checked not to have changed while it was
read. This module reads bytes only: ``mp_model.checkpoint`` and ``mp_model.loading`` build models from them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
MANIFEST_FILE = "checksums.json"
STAGES = {1: "finetune", 2: "soft", 3: "hard", 4: "exits"}  # a run's stage folders: stage{n}_{name}
STATE_FILE = "state.json"
RUN_CONFIG_FILE = "train_config.json"


def _read_whole(directory: int, name: str, folder: Path) -> bytes:
    """The bytes of ``name`` in the folder open as ``directory``; a ``ValueError`` if it is missing or changed
    (size, time or inode) while it was read."""
    try:
        handle = os.open(name, os.O_RDONLY, dir_fd=directory)
    except FileNotFoundError as error:
        raise ValueError(f"{folder} is not a saved model: no {name}") from error
    except OSError as error:
        raise ValueError(f"{folder / name} is unreadable ({error.strerror})") from error
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise ValueError(f"{folder / name} is not a file")
    with os.fdopen(handle, "rb") as file:
        before = os.fstat(file.fileno())
        try:
            data = file.read()
        except OSError as error:
            raise ValueError(f"{folder / name} is unreadable ({error.strerror})") from error
        after = os.fstat(file.fileno())
    changed = (before.st_size, before.st_mtime_ns, before.st_ino) != (after.st_size, after.st_mtime_ns, after.st_ino)
    if changed or len(data) != after.st_size:
        raise ValueError(f"{folder / name} changed while it was read (another process is writing it): try again")
    return data


@dataclasses.dataclass(frozen=True)
class SavedFiles:
    """The bytes of a saved model's files, read at one time (``read_files``): its parsed ``config``, the bytes of
    ``config.json``, ``model.safetensors``, the tokenizer files present and ``checksums.json`` (``None`` if absent)."""

    folder: Path
    config: dict[str, Any]
    config_bytes: bytes
    weight_bytes: bytes
    tokenizer_files: dict[str, bytes]
    manifest: bytes | None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_problem(manifest: bytes, hashes: dict[str, str]) -> str | None:
    """Why files with SHA-256 ``hashes`` (``{file name: hex}``) are not those that the bytes of a
    ``checksums.json`` list (damaged, or not from one save), or ``None`` if every listed one matches."""
    try:
        recorded = json.loads(manifest)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{MANIFEST_FILE} is damaged ({error})"
    if not isinstance(recorded, dict) or not all(isinstance(value, str) for value in recorded.values()):
        return f"{MANIFEST_FILE} is damaged: not an object of SHA-256 strings"
    differ = [name for name in hashes if name in recorded and recorded[name] != hashes[name]]
    return not_one_save(differ) if differ else None


def not_one_save(differ: list[str]) -> str:
    """What to say of a folder whose files ``differ`` from its ``checksums.json``."""
    return (
        f"its files are not from one save ({', '.join(differ)} differ from {MANIFEST_FILE}): the folder is being "
        f"replaced or was copied in part; try again (after editing a file by hand, delete {MANIFEST_FILE} or save "
        "the model again)"
    )


def read_files(folder: str | os.PathLike[str]) -> SavedFiles:
    """Read ``config.json``, ``model.safetensors``, the tokenizer files and ``checksums.json`` of ``folder`` whole,
    through one handle on the folder (``check_files`` then checks them against their checksums).

    Raises:
        ValueError: naming the folder or file, if it or a file is missing, a file changed while it was read, or the
            config is not a JSON object.
    """
    folder = Path(folder)
    try:
        directory = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError as error:
        raise ValueError(f"{folder} is not a saved model: no such folder") from error
    except NotADirectoryError as error:
        raise ValueError(f"{folder} is not a saved model: not a folder") from error
    try:
        present = set(os.listdir(directory))
        manifest = _read_whole(directory, MANIFEST_FILE, folder) if MANIFEST_FILE in present else None
        config_bytes = _read_whole(directory, CONFIG_FILE, folder)
        weight_bytes = _read_whole(directory, WEIGHTS_FILE, folder)
        tokenizer_files = {name: _read_whole(directory, name, folder) for name in TOKENIZER_FILES if name in present}
    finally:
        os.close(directory)
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{folder / CONFIG_FILE} does not hold a JSON object")
    return SavedFiles(folder, config, config_bytes, weight_bytes, tokenizer_files, manifest)


def check_files(files: SavedFiles, checksum: str | None = None, config_checksum: str | None = None) -> None:
    """Check ``files`` against their ``checksums.json`` (if any: files of one save) and the recorded checksums.

    Args:
        files: what ``read_files`` read.
        checksum: the SHA-256 (hex) recorded for its ``model.safetensors`` (a run's ``state.json``), or ``None``.
        config_checksum: the SHA-256 recorded for its ``config.json``, or ``None``.

    Raises:
        ValueError: naming the folder or file, if the files do not match ``checksums.json`` (not from one save),
            ``checksum`` or ``config_checksum``.
    """
    hashes = {CONFIG_FILE: _sha256(files.config_bytes), WEIGHTS_FILE: _sha256(files.weight_bytes)}
    for name, expected in ((WEIGHTS_FILE, checksum), (CONFIG_FILE, config_checksum)):
        if expected is not None and hashes[name] != expected:
            raise ValueError(f"{files.folder / name} does not match its recorded SHA-256 (changed or damaged)")
    problem = None if files.manifest is None else manifest_problem(files.manifest, hashes)
    if problem is not None:
        raise ValueError(f"{files.folder}: {problem}")


def write_manifest(folder: str | os.PathLike[str]) -> None:
    """Write ``checksums.json`` in a folder just saved: the SHA-256 of its ``config.json`` and
    ``model.safetensors``, atomically (a temporary file, then ``os.replace``), so that it is the last file of the save
    to change. A folder without ``model.safetensors`` (weights saved another way) loses any older manifest."""
    folder = Path(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        (folder / MANIFEST_FILE).unlink(missing_ok=True)
        return
    hashes = {name: _sha256((folder / name).read_bytes()) for name in (CONFIG_FILE, WEIGHTS_FILE)}
    temporary = folder / (MANIFEST_FILE + ".tmp")
    temporary.write_text(json.dumps(hashes, indent=2) + "\n")
    os.replace(temporary, folder / MANIFEST_FILE)


def _state_problem(state: Any) -> str | None:
    """Why ``state`` (a parsed ``state.json``) is not a run state, or ``None``."""
    if not isinstance(state, dict):
        return f"it holds a JSON {type(state).__name__}, not an object"
    done = state.get("stages_done", [])
    if not isinstance(done, list) or not all(isinstance(n, int) and n in STAGES for n in done):
        return "stages_done is not a list of stages"
    for key in ("checksums", "config_checksums"):
        recorded = state.get(key, {})
        if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
            return f"{key} is not an object of SHA-256 strings"
    return None


def read_run_state(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``state.json`` of the run directory ``directory``: the stages done and the SHA-256 of each stage
    folder's ``model.safetensors`` (``checksums``) and ``config.json`` (``config_checksums``).

    Raises:
        ValueError: naming ``state.json``, if it is missing, unreadable or not a run state.
    """
    path = Path(directory) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ValueError(f"{path} is missing") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        problem: str | None = " ".join(str(error).split())
    else:
        problem = _state_problem(state)
    if problem is not None:
        raise ValueError(f"{path} is damaged ({problem})")
    return state


def recorded_checksums(folder: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """The SHA-256 of ``model.safetensors`` and of ``config.json`` that its run's ``state.json`` records for a run's
    stage folder (``stage{n}_{name}`` in a folder holding ``state.json`` or ``train_config.json``), each ``None``
    where none is recorded; ``(None, None)`` for any other folder.

    Raises:
        ValueError: naming ``state.json``, if the folder is a run's stage folder and ``state.json`` is missing or
            damaged (its models would otherwise load unverified).
    """
    folder = Path(os.path.abspath(folder))
    numbers = [n for n, name in STAGES.items() if folder.name == f"stage{n}_{name}"]
    run = folder.parent
    if not numbers or not ((run / STATE_FILE).exists() or (run / RUN_CONFIG_FILE).exists()):
        return None, None
    try:
        state = read_run_state(run)
    except ValueError as error:
        raise ValueError(f"{error}: the checksums of {folder.name} cannot be verified without it") from error
    key = str(numbers[0])
    return state.get("checksums", {}).get(key), state.get("config_checksums", {}).get(key)
