"""Specification of the HF integration: after ``import mp_model`` a saved Magic Pyramid folder opens with
transformers' Auto classes and ``pipeline("text-classification")``, which labels texts as the model itself and
``mp predict`` do; the serve-time knobs are the config's defaults, set through the pipeline's ``model_kwargs``;
``save_pretrained`` round-trips."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, pipeline

import mp_model
from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification
from mp_model.recipe.cli import main
from tests.utils import minilm_tokenizer, write_tiny_model

TEXTS = [
    "great wonderful superb lovely film",
    "awful terrible boring",
    "the movie was a film with plot and actors",
    "dull poor clumsy story about people",
    "brilliant moving",
    "x",
    "this story about people in it was great",
    "actors plot awful",
]
LABELS = {0: "negative", 1: "positive"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny saved model whose labels vary over ``TEXTS``, which prunes tokens and, at ``tau=0.5``, exits early
    for some texts (large random weights: the default initialisation gives one label to every text)."""
    folder = write_tiny_model(tmp_path_factory.mktemp("served"))
    model = MagicPyramidForSequenceClassification.from_pretrained(folder)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    model.set_thresholds([1.0] * model.config.num_hidden_layers)
    model.config.id2label = LABELS
    model.config.label2id = {name: index for index, name in LABELS.items()}
    model.save_pretrained(folder)
    return folder


def own_labels(folder: Path, **knobs: object) -> tuple[list[str], torch.Tensor]:
    """The label names and top softmax probabilities the saved model gives ``TEXTS`` when called directly."""
    model = MagicPyramidForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(**minilm_tokenizer()(TEXTS, padding=True, return_tensors="pt"), **knobs)
    probabilities = out.logits.softmax(dim=-1)
    return [LABELS[int(i)] for i in probabilities.argmax(dim=-1)], probabilities.max(dim=-1).values


def classify(folder: Path, **model_kwargs: object) -> list[dict]:
    """``pipeline("text-classification")`` over ``TEXTS``, one text a call, loaded with ``model_kwargs``."""
    pipe = pipeline(
        "text-classification", model=str(folder), tokenizer=str(folder), device="cpu", model_kwargs=model_kwargs
    )
    return pipe(TEXTS)


def test_auto_classes_open_a_saved_folder_as_magic_pyramid(folder: Path) -> None:
    assert type(AutoConfig.from_pretrained(folder)) is MagicPyramidConfig
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(model) is MagicPyramidForSequenceClassification
    assert model.dtype == torch.float32
    importlib.reload(mp_model)  # registering again is harmless
    assert type(AutoModelForSequenceClassification.from_config(model.config)) is MagicPyramidForSequenceClassification


@pytest.mark.parametrize(
    ("model_kwargs", "knobs"),
    [
        ({}, {}),
        ({"exit_tau": 0.0}, {"tau": 0.0}),
        ({"exit_tau": 1.0}, {"tau": 1.0}),
        ({"use_pruning": False, "use_early_exit": False}, {"prune": False, "early_exit": False}),
        ({"threshold_scale": 0.5}, {"threshold_scale": 0.5}),
    ],
)
def test_pipeline_labels_as_the_model_does_with_the_knobs_given_as_model_kwargs(
    folder: Path, model_kwargs: dict, knobs: dict
) -> None:
    labels, scores = own_labels(folder, **knobs)
    assert len(set(labels)) == 2 or knobs.get("tau") == 1.0  # the texts get both labels: the comparison means something
    if knobs:  # the knobs change the scores: the pipeline matching them shows that they reach the model
        assert scores != pytest.approx(own_labels(folder)[1], abs=1e-3)
    results = classify(folder, **model_kwargs)
    assert [result["label"] for result in results] == labels
    assert torch.tensor([result["score"] for result in results]) == pytest.approx(scores, abs=1e-5)


def test_a_knob_out_of_range_is_a_value_error_naming_it(folder: Path) -> None:
    with pytest.raises(ValueError, match="tau"):
        classify(folder, exit_tau=1.5)


def test_pipeline_labels_equal_mp_predicts(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    code = main(["predict", str(source), "--checkpoint", str(folder), "--tau", "0.5", "--no-progress"])
    assert code == 0
    predicted = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    assert predicted == own_labels(folder, tau=0.5)[0]
    # the tokenizer found in the model's folder; padded batches of 3 texts
    pipe = pipeline("text-classification", model=str(folder), device="cpu", model_kwargs={"exit_tau": 0.5})
    assert [result["label"] for result in pipe(TEXTS, batch_size=3)] == predicted


def test_save_pretrained_round_trips_through_the_auto_classes(folder: Path, tmp_path: Path) -> None:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(again) is MagicPyramidForSequenceClassification
    assert again.config.to_diff_dict() | {"_name_or_path": None} == model.config.to_diff_dict() | {
        "_name_or_path": None
    }
    assert torch.equal(again.thresholds, model.thresholds)
    inputs = minilm_tokenizer()(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        first, second = model(**inputs, tau=0.5), again(**inputs, tau=0.5)
    for name in ("logits", "exit_layer", "kept_tokens", "flops"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_a_threshold_scale_out_of_range_in_the_config_is_refused() -> None:
    for scale in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="threshold_scale"):
            MagicPyramidConfig(threshold_scale=scale)


def test_saved_weights_get_the_process_normal_permissions(folder: Path, tmp_path: Path) -> None:
    from mp_model.permissions import umask_mode

    MagicPyramidForSequenceClassification.from_pretrained(folder).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").stat().st_mode & 0o777 == umask_mode()
