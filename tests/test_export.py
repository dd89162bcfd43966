"""Specification of ``mp_model.export`` and ``mp export``: a Magic Pyramid model's dense weights written as a plain
``BertForSequenceClassification`` folder that loads with transformers alone (no ``mp_model`` import) and gives
the logits of ``model(..., prune=False, early_exit=False)``; bad arguments are refused before anything is
written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification

from mp_model import MagicPyramidForSequenceClassification
from mp_model.export import bert_config, to_bert
from mp_model.recipe.cli import main
from tests.utils import minilm_tokenizer, write_tiny_model

TEXTS = ["great wonderful superb lovely film", "awful", "the movie was a film with plot and actors in it"]
LABELS = {0: "negative", 1: "positive"}
MAGIC_PYRAMID_FIELDS = ("prune_thresholds", "use_pruning", "use_early_exit", "exit_tau", "exit_hidden_size")

# Run by a fresh interpreter in which importing mp_model fails: loads the exported folder with transformers' Auto
# classes and prints the class, the config's model type and labels, and the logits of TEXTS (a padded batch).
PLAIN_LOAD = """
import json, sys
sys.modules["mp_model"] = None  # any import of mp_model or its modules now raises ImportError
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, texts = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
inputs = AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**inputs).logits
print(json.dumps({
    "class": type(model).__name__,
    "model_type": model.config.model_type,
    "labels": model.config.id2label,
    "logits": logits.tolist(),
    "mp_modules": [name for name in sys.modules if name.startswith("mp_model.")],
}))
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny saved model with named labels and non-zero thresholds (so its default forward prunes)."""
    folder = write_tiny_model(tmp_path_factory.mktemp("model"))
    model = MagicPyramidForSequenceClassification.from_pretrained(folder)
    model.set_thresholds([1.0] * model.config.num_hidden_layers)
    model.config.id2label = LABELS
    model.config.label2id = {name: index for index, name in LABELS.items()}
    model.save_pretrained(folder)
    return folder


def dense_logits(folder: Path) -> torch.Tensor:
    """The Magic Pyramid model's own dense logits on ``TEXTS`` (pruning and early exit off)."""
    model = MagicPyramidForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(
            **minilm_tokenizer()(TEXTS, padding=True, return_tensors="pt"), prune=False, early_exit=False
        ).logits


def test_the_export_loads_without_mp_model_and_gives_the_dense_logits(folder: Path, tmp_path: Path) -> None:
    out = to_bert(folder, tmp_path / "bert")
    assert out == tmp_path / "bert"
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "bert" and saved["architectures"] == ["BertForSequenceClassification"]
    assert not set(MAGIC_PYRAMID_FIELDS) & set(saved)
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, str(out), json.dumps(TEXTS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    loaded = json.loads(done.stdout.splitlines()[-1])
    assert loaded["class"] == "BertForSequenceClassification" and loaded["model_type"] == "bert"
    assert loaded["mp_modules"] == []
    assert {int(key): name for key, name in loaded["labels"].items()} == LABELS
    torch.testing.assert_close(torch.tensor(loaded["logits"]), dense_logits(folder), rtol=1e-5, atol=1e-5)


def test_a_model_object_exports_with_the_tokenizer_given_or_without_one(folder: Path, tmp_path: Path) -> None:
    model = MagicPyramidForSequenceClassification.from_pretrained(folder)
    bare = to_bert(model, tmp_path / "bare")
    assert sorted(path.name for path in bare.iterdir()) == ["config.json", "model.safetensors"]
    with_tokenizer = to_bert(model, tmp_path / "with", tokenizer=minilm_tokenizer())
    assert (with_tokenizer / "tokenizer_config.json").exists()
    bert = BertForSequenceClassification.from_pretrained(bare).eval()
    with torch.no_grad():
        logits = bert(**minilm_tokenizer()(TEXTS, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(logits, dense_logits(folder), rtol=1e-5, atol=1e-5)


def test_bert_config_keeps_berts_fields_and_drops_magic_pyramids(folder: Path) -> None:
    config = MagicPyramidForSequenceClassification.from_pretrained(folder).config
    plain = bert_config(config)
    assert plain.model_type == "bert"
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings"):
        assert getattr(plain, name) == getattr(config, name), name
    assert plain.id2label == LABELS
    assert not any(hasattr(plain, name) for name in MAGIC_PYRAMID_FIELDS)


def test_bad_arguments_are_refused_before_anything_is_written(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="model"):
        to_bert(42, tmp_path / "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not exist"):
        to_bert(tmp_path / "missing", tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="out .* not an empty folder"):
        to_bert(folder, tmp_path / "full")
    no_tokenizer = tmp_path / "weights_only"
    MagicPyramidForSequenceClassification.from_pretrained(folder).save_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        to_bert(no_tokenizer, tmp_path / "c")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["full", "weights_only"]
    assert [path.name for path in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_mp_export_writes_the_folder_and_reports_errors_in_one_line(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bert"
    assert main(["export", "--checkpoint", str(folder), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert BertForSequenceClassification.from_pretrained(out).config.id2label == LABELS
    assert main(["export", "--checkpoint", str(folder), "--out", str(out)]) == 2  # not an empty folder
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "other")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("mp export: error: ") for line in errors)
    assert "not an empty folder" in errors[0] and "does not exist" in errors[1]
