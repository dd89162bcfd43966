"""A run directory: its layout, the one owner of it, and loading a finished run (``load_run``).

Run directory::

    train_config.json     the TrainConfig (a rerun must agree with it but for device and run_dir)
    state.json            stages done, metrics, search candidates, the selected (delta_L, lambda)
    stage1_finetune/      save_pretrained folders with the tokenizer, one per completed stage
    stage2_soft/ stage3_hard/ stage4_exits/
    partial/              trainer.pt (weights, optimizers, schedulers, RNG, step) of an interrupted stage

Damage is found, never trusted: ``model_folder_problem`` says why a stage folder cannot be loaded (no config, no
weights, a damaged ``model.safetensors``, files that do not match their ``checksums.json`` or a checksum recorded in
``state.json``), ``read_state`` starts an unreadable ``state.json`` over with a ``TrainingWarning`` (training only:
loading a stage folder of a run whose ``state.json`` is missing or damaged is refused, ``recorded_checksums``),
``finished_run_problem`` says why a folder is not a finished run.
Every file is written atomically (``write_json``; a temporary file, then ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from mp_model.checkpoint import load_snapshot, load_snapshot_tokenizer, read_snapshot
from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.recipe.checks import check_device
from mp_model.saved_files import CONFIG_FILE as MODEL_CONFIG_FILE
from mp_model.saved_files import (
    MANIFEST_FILE,
    STAGES,
    STATE_FILE,
    WEIGHTS_FILE,
    manifest_problem,
    read_run_state,
    recorded_checksums,
)

DENSE_DIR = "stage1_finetune"
FINAL_DIR = "stage4_exits"
CONFIG_FILE = "train_config.json"
PARTIAL_DIR = "partial"
CHECKPOINT_FILE = "trainer.pt"
PROGRESS_FILE = "progress.json"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class TrainingWarning(UserWarning):
    """A damaged run directory was repaired (a checkpoint discarded, a stage to train again, a config replaced)."""


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` atomically (temporary file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_folder_problem(
    folder: Path, checksum: str | None = None, config_checksum: str | None = None, *, hashes: bool = True
) -> str | None:
    """Why ``folder`` cannot be a saved model, or ``None`` if it looks whole.

    It must hold a ``config.json`` object and weights (``model.safetensors``, sharded safetensors or
    ``pytorch_model.bin``); a ``model.safetensors`` must have a whole header covering the file and, if
    ``checksum`` is given, that SHA-256; ``config.json`` must have ``config_checksum`` if it is given; both must
    match the folder's ``checksums.json`` if it has one (files of one save). ``hashes`` False: no file is hashed
    (a caller that reads the files whole checks the bytes it read, ``mp_model.checkpoint.check_files``).
    """
    if not folder.is_dir():
        return "no such folder" if not folder.exists() else "not a folder"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "no config.json"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"config.json is unreadable ({error})"
    if not isinstance(config, dict):
        return "config.json does not hold an object"
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        return f"no weights ({', '.join(WEIGHT_FILES)})"
    if weights.name == "model.safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights), "pt") as file:
                file.keys()
        except (SafetensorError, OSError) as error:
            return f"model.safetensors is damaged ({error})"
        if hashes and checksum is not None and sha256(weights) != checksum:
            return "model.safetensors does not match its recorded SHA-256"
    if not hashes:
        return None
    if config_checksum is not None and sha256(folder / "config.json") != config_checksum:
        return "config.json does not match its recorded SHA-256"
    return _manifest_problem(folder)


def _manifest_problem(folder: Path) -> str | None:
    """Why the files of ``folder`` do not match its ``checksums.json`` (not from one save), or ``None``."""
    if not (folder / MANIFEST_FILE).is_file():
        return None
    names = (MODEL_CONFIG_FILE, WEIGHTS_FILE)
    hashes = {name: sha256(folder / name) for name in names if (folder / name).is_file()}
    try:
        return manifest_problem((folder / MANIFEST_FILE).read_bytes(), hashes)
    except OSError as error:
        return f"{MANIFEST_FILE} is unreadable ({error})"


def load_checked(folder: str | Path, device: torch.device | str = "cpu", *, tokenizer: bool = False) -> tuple:
    """The model saved in ``folder`` on ``device``, read whole into memory first (``mp_model.checkpoint``: no file
    mapping that another process's write can change, label names from the same snapshot as the weights) and
    checked against its ``checksums.json`` and the SHA-256 its run records (``recorded_checksums``; a stage folder of a
    run whose ``state.json`` is missing or damaged is refused), and its identity: ``folder``, ``config_sha256``,
    ``weights_sha256``, ``tokenizer_sha256``. A ``ValueError`` naming the folder if it is missing, damaged or
    changed. ``tokenizer``: also build the tokenizer from the same snapshot (``load_checked_with_tokenizer``)."""
    folder = Path(folder)
    device = check_device(device)
    problem = model_folder_problem(folder, hashes=False)  # read_snapshot checks the bytes it reads
    if problem is not None:
        raise ValueError(f"{folder} is not a saved model: {problem}")
    snapshot = read_snapshot(folder, *recorded_checksums(folder))
    identity = {
        "folder": str(folder),
        "config_sha256": snapshot.config_sha256,
        "weights_sha256": snapshot.weights_sha256,
        "tokenizer_sha256": snapshot.tokenizer_sha256,
    }
    model = load_snapshot(snapshot).to(device)
    return (model, load_snapshot_tokenizer(snapshot), identity) if tokenizer else (model, identity)


def load_checked_with_tokenizer(
    folder: str | Path, device: torch.device | str = "cpu"
) -> tuple[MagicPyramidForSequenceClassification, Any, dict[str, str]]:
    """``load_checked`` plus the tokenizer, read with the weights through one handle on the folder (so a folder
    replaced meanwhile cannot pair one model's tokenizer with another's weights): ``(model, tokenizer, identity)``,
    the identity's ``tokenizer_sha256`` covering the tokenizer's files."""
    return load_checked(folder, device, tokenizer=True)


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> MagicPyramidForSequenceClassification:
    """The model saved in ``folder``, on ``device`` (``load_checked`` without the identity)."""
    return load_checked(folder, device)[0]


def read_state(directory: str | Path) -> dict[str, Any]:
    """The ``state.json`` of a run directory (empty state if there is none); an unreadable one starts the run over
    with a ``TrainingWarning``."""
    path = Path(directory) / STATE_FILE
    fresh: dict[str, Any] = {"stages_done": [], "search": {}}
    if not path.exists():
        return fresh
    try:
        state = read_run_state(directory)
    except ValueError as error:
        warnings.warn(f"{error}: the run starts over", TrainingWarning, stacklevel=3)
        return fresh
    return fresh | state


def finished_run_problem(directory: str | Path) -> str | None:
    """Why ``directory`` is not a finished run (every stage done by ``state.json``, its stage-1 and final folders
    whole and matching their checksums), with what to do, or ``None`` if it is one. Reads only; repairs nothing."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is not a folder"
    if not (directory / STATE_FILE).is_file():
        return f"{directory} holds no {STATE_FILE}: run `mp train` first"
    try:
        state = read_run_state(directory)
    except ValueError as error:
        return f"{error}: `mp train` would start this run over"
    missing = [n for n in STAGES if n not in state.get("stages_done", [])]
    if missing:
        return f"{directory}: stage(s) {', '.join(map(str, missing))} not done: run `mp train` first"
    for number, name in ((1, DENSE_DIR), (4, FINAL_DIR)):
        recorded = (state.get(key, {}).get(str(number)) for key in ("checksums", "config_checksums"))
        problem = model_folder_problem(directory / name, *recorded)
        if problem is not None:
            return f"{directory / name}: {problem}: `mp train` would train it again"
    return None


def completed_stages(directory: str | Path) -> list[int]:
    """The stages that ``state.json`` of ``directory`` records as done (none if it is missing or unreadable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrainingWarning)
        return sorted(read_state(directory)["stages_done"])


def stage_dir(directory: str | Path, number: int) -> Path:
    """The folder of stage ``number``'s model in the run directory ``directory``."""
    return Path(directory) / f"stage{number}_{STAGES[number]}"


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer saved in ``folder``; a ``ValueError`` naming the folder if there is none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{folder}: no usable tokenizer ({' '.join(str(error).split())})") from error


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; a ``ValueError`` naming the file if it is unreadable, not JSON or not an object."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is unreadable ({' '.join(str(error).split())})") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} is damaged: it holds a JSON {type(values).__name__}, not an object")
    return values


def saved_config(directory: str | Path) -> dict[str, Any]:
    """The ``train_config.json`` values of the run directory ``directory`` (empty if there is none); a
    ``ValueError`` naming the file if it is unreadable or not a JSON object."""
    path = Path(directory) / CONFIG_FILE
    return read_json_object(path) if path.exists() else {}


def load_run(
    directory: str | Path, device: torch.device | str = "cpu"
) -> tuple[MagicPyramidForSequenceClassification, MagicPyramidForSequenceClassification, Any, dict[str, Any]]:
    """The stage-1 (dense) and final models in eval mode on ``device``, the tokenizer and the saved training
    configuration values (``train_config.json``) of the finished run in ``directory``.

    Raises:
        ValueError: if ``directory`` is not a finished run (naming why), its two models have different labels, or
            its tokenizer or configuration is unreadable.
    """
    directory = Path(directory)
    problem = finished_run_problem(directory)
    if problem is not None:
        raise ValueError(f"--run-dir {directory} is not a finished run: {problem}")
    dense = load_model(directory / DENSE_DIR, device).eval()
    final = load_model(directory / FINAL_DIR, device).eval()
    if dense.config.id2label != final.config.id2label:
        raise ValueError(f"{directory}: {DENSE_DIR} and {FINAL_DIR} have different labels")
    return dense, final, load_tokenizer(directory / FINAL_DIR), saved_config(directory)
