"""Specification of the four-stage recipe (mp_model.recipe.training) on a tiny random model and a toy dataset.

Each stage must do its job (stage 1 lowers the loss; stage 2 moves thresholds and prunes more; stage 3 keeps
thresholds and binary masks; stage 4 changes only the sub-classifiers, distilling on the whole train split from
a cache equal to the backbone's live output), a crashed run must resume to the same
weights as an uninterrupted one, and the evaluation's simulated exits must equal the packed path's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mp_model import MagicPyramidForSequenceClassification
from mp_model.recipe.data import batches, encode
from mp_model.recipe.evaluation import collect, simulate
from mp_model.recipe.fit import StageSpec, distillation_loss, fit, stage_loss
from mp_model.recipe.fit_exits import exit_targets
from mp_model.recipe.runs import CONFIG_FILE, DENSE_DIR, FINAL_DIR, PARTIAL_DIR, STATE_FILE, TrainingWarning
from mp_model.recipe.train_config import TrainConfig
from mp_model.recipe.training import Trainer, initial_thresholds, load_data, select_candidate, train
from tests.utils import write_half_copy, write_tiny_model, write_toy_dataset


def tiny_config(root: Path, run: str, **overrides: object) -> TrainConfig:
    """A CI-sized TrainConfig over the toy dataset and tiny model under ``root``."""
    values = dict(
        model=str(root / "base"),
        dataset=str(root / "toy.csv"),
        run_dir=str(root / run),
        train_size=None,
        dev_size=None,
        batch_size=8,
        eval_batch_size=16,
        max_length=48,
        lr=3e-3,
        threshold_lr=5e-2,
        exit_lr=1e-2,
        epochs_finetune=4,
        epochs_soft=2,
        epochs_hard=1,
        epochs_exits=2,
        final_thresholds=(0.8, 1.5),
        lambdas=(0.5,),
        search_epochs_soft=0.5,
        search_epochs_hard=0.5,
        checkpoint_every=5,
        precision="fp32",  # the same arithmetic on every CPU; test_bf16_autocast_training_... covers bf16
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("training")
    write_tiny_model(folder / "base")
    write_toy_dataset(folder / "toy.csv")
    return folder


@pytest.fixture(scope="module")
def finished(root: Path) -> TrainConfig:
    """An uninterrupted run of every stage."""
    config = tiny_config(root, "full")
    train(config, progress=False)
    return config


def load(path: Path) -> MagicPyramidForSequenceClassification:
    return MagicPyramidForSequenceClassification.from_pretrained(str(path)).eval()


def stage_dir(config: TrainConfig, number: int) -> Path:
    return Trainer(config, progress=False).stage_dir(number)


def mean_loss(model: MagicPyramidForSequenceClassification, config: TrainConfig) -> float:
    data = load_data(config)
    losses = []
    with torch.no_grad():
        for batch in batches(data.train, 16):
            out = model.masked_forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            losses.append(float(F.cross_entropy(out.logits, batch["labels"], reduction="sum")))
    return sum(losses) / len(data.train["labels"])


def hard_kept(model: MagicPyramidForSequenceClassification, config: TrainConfig) -> float:
    data = load_data(config)
    batch = next(batches(data.train, 1000))
    with torch.no_grad():
        out = model.masked_forward(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], mask_mode="hard"
        )
    return float(out.kept_ratio.mean())


def assert_same_weights(a: MagicPyramidForSequenceClassification, b: MagicPyramidForSequenceClassification) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def test_run_directory_holds_every_stage_and_state(finished: TrainConfig) -> None:
    directory = finished.directory
    state = json.loads((directory / STATE_FILE).read_text())
    assert state["stages_done"] == [1, 2, 3, 4]
    assert all(state[f"stage{n}"]["arithmetic"] == "fp32" for n in state["stages_done"])
    assert (directory / DENSE_DIR / "model.safetensors").exists()
    assert (directory / FINAL_DIR / "tokenizer_config.json").exists()
    assert not (directory / PARTIAL_DIR).exists()
    assert json.loads((directory / CONFIG_FILE).read_text()) == finished.to_dict()
    assert len(state["search"]["candidates"]) == len(finished.final_thresholds) * len(finished.lambdas)
    assert state["search"]["selected"] in state["search"]["candidates"].values()
    assert load(directory / FINAL_DIR).config.id2label == {0: "0", 1: "1"}


def test_stage1_lowers_the_loss(finished: TrainConfig) -> None:
    before = mean_loss(load(Path(finished.model)), finished)
    after = mean_loss(load(stage_dir(finished, 1)), finished)
    assert after < 0.7 * before
    assert json.loads((finished.directory / STATE_FILE).read_text())["stage1"]["dev_accuracy"] >= 0.75


def test_stage2_moves_thresholds_and_prunes_more(finished: TrainConfig) -> None:
    state = json.loads((finished.directory / STATE_FILE).read_text())
    selected = state["search"]["selected"]
    start = initial_thresholds(selected["final_threshold"], 3)
    soft = load(stage_dir(finished, 2))
    assert not torch.allclose(soft.thresholds, torch.tensor(start))
    initial = load(stage_dir(finished, 1))
    initial.set_thresholds(start)
    assert hard_kept(soft, finished) < hard_kept(initial, finished)
    assert state["stage2"]["lambda"] == selected["lambda"]


def test_stage3_freezes_thresholds_uses_binary_masks_and_trains_weights(finished: TrainConfig) -> None:
    soft, hard = load(stage_dir(finished, 2)), load(stage_dir(finished, 3))
    assert torch.equal(soft.thresholds, hard.thresholds)
    assert not torch.equal(
        soft.bert.encoder.layer[0].output.dense.weight, hard.bert.encoder.layer[0].output.dense.weight
    )
    batch = next(batches(load_data(finished).train, 16))
    with torch.no_grad():
        out = hard.masked_forward(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], mask_mode="hard"
        )
    assert set(out.masks.unique().tolist()) == {0.0, 1.0}
    assert float(out.kept_ratio[1:].mean()) < 1.0


def test_stage4_changes_only_the_sub_classifiers(finished: TrainConfig) -> None:
    before, after = load(stage_dir(finished, 3)).state_dict(), load(stage_dir(finished, 4)).state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith("exits.") for key in changed)
    assert {key.split(".")[1] for key in changed} == {"0", "1"}


def test_sub_classifiers_learn_to_agree_with_the_main_classifier(finished: TrainConfig) -> None:
    data = load_data(finished)
    batch = next(batches(data.train, 1000))
    losses = []
    for number in (3, 4):
        with torch.no_grad():
            out = load(stage_dir(finished, number)).masked_forward(
                batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], mask_mode="hard"
            )
        losses.append(float(distillation_loss(out.exit_logits, out.logits)))
    assert losses[1] < 0.5 * losses[0]


def test_stage4_cache_equals_the_hard_masked_backbone(finished: TrainConfig) -> None:
    model = load(stage_dir(finished, 4))
    data = load_data(finished)
    cached = exit_targets(model, data.dev, finished, progress=False)
    batch = next(batches(data.dev, 1000))
    with torch.no_grad():
        out = model.masked_forward(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], mask_mode="hard"
        )
    rows = batch["index"]
    torch.testing.assert_close(cached.features[rows], out.exit_features.transpose(0, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.teacher[rows], out.logits, rtol=1e-5, atol=1e-5)


def test_stage4_distils_on_every_training_example_and_trains_on_the_labels_of_the_labelled_subset_only(
    root: Path,
) -> None:
    config = tiny_config(root, "exit_train", train_size=16, epochs_finetune=1, final_thresholds=(0.8,))
    state = train(config, progress=False)
    assert len(load_data(config).train["labels"]) == 16
    assert state["stage4"]["distillation_examples"] == len(load_data(config).exit_train["labels"]) > 16
    assert state["stage4"]["labelled_examples"] == 16
    assert len(state["stage4"]["dev_exit_accuracy"]) == 2


def test_a_joint_stage4_trains_the_backbone_for_the_exits_and_keeps_the_thresholds(root: Path) -> None:
    config = tiny_config(root, "joint", epochs_joint=1, epochs_finetune=1, final_thresholds=(0.8,))
    state = train(config, progress=False)
    before, after = load(stage_dir(config, 3)).state_dict(), load(stage_dir(config, 4)).state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert {"bert.encoder.layer.0.output.dense.weight", "classifier.weight", "exits.0.dense.weight"} <= changed
    assert "thresholds" not in changed
    joint, dev = state["stage4"]["joint"], len(load_data(config).dev["labels"])
    assert joint["steps"] > 0
    assert state["stage4"]["dev_accuracy"] == pytest.approx(joint["dev_accuracy"], abs=1.01 / dev), "kept epoch"


class Crash(Exception):
    pass


def crash_at(event: str, **match: object):
    """A callback raising ``Crash`` at the first ``event`` whose info matches; records every event seen."""
    seen: list[tuple[str, dict]] = []

    def callback(name: str, info: dict) -> None:
        seen.append((name, info))
        if name == event and all(info.get(k) == v for k, v in match.items()):
            raise Crash(f"{name} {info}")

    return callback, seen


def recorder():
    seen: list[tuple[str, dict]] = []
    return (lambda name, info: seen.append((name, info))), seen


def test_resume_after_a_crash_between_stages_skips_done_stages(root: Path, finished: TrainConfig) -> None:
    config = tiny_config(root, "crash_between")
    callback, _ = crash_at("stage_end", stage=2)
    with pytest.raises(Crash):
        train(config, callback=callback, progress=False)
    assert json.loads((config.directory / STATE_FILE).read_text())["stages_done"] == [1, 2]
    callback, seen = recorder()
    train(config, callback=callback, progress=False)
    assert [info["stage"] for name, info in seen if name == "stage_end"] == [3, 4]
    assert not any(name == "candidate" for name, _ in seen)
    assert_same_weights(load(config.directory / FINAL_DIR), load(finished.directory / FINAL_DIR))


def test_resume_inside_a_stage_continues_from_its_checkpoint(root: Path, finished: TrainConfig) -> None:
    config = tiny_config(root, "crash_inside")
    callback, _ = crash_at("checkpoint", stage=2, step=10)
    with pytest.raises(Crash):
        train(config, callback=callback, progress=False)
    progress = json.loads((config.directory / PARTIAL_DIR / "progress.json").read_text())
    assert progress["stage"] == 2 and progress["step"] == 10
    callback, seen = recorder()
    train(config, callback=callback, progress=False)
    first_steps = [info["step"] for name, info in seen if name == "checkpoint" and info["stage"] == 2]
    assert first_steps and min(first_steps) > 10
    assert [info["stage"] for name, info in seen if name == "stage_end"] == [2, 3, 4]
    for number in (2, 4):
        assert_same_weights(load(stage_dir(config, number)), load(stage_dir(finished, number)))


def test_a_single_stage_needs_the_earlier_ones(root: Path) -> None:
    with pytest.raises(ValueError, match="needs stages"):
        train(tiny_config(root, "single"), [3], progress=False)


def test_a_changed_configuration_is_refused_in_an_existing_run(root: Path, finished: TrainConfig) -> None:
    with pytest.raises(ValueError, match="lr"):
        Trainer(tiny_config(root, "full", lr=1.0), progress=False)
    Trainer(tiny_config(root, "full", device="cpu"), progress=False)


def test_candidate_selection_prefers_fewest_flops_within_the_drop() -> None:
    candidates = [
        {"dev_accuracy": 0.90, "dev_gflops": 3.0},
        {"dev_accuracy": 0.895, "dev_gflops": 2.0},
        {"dev_accuracy": 0.85, "dev_gflops": 1.0},
    ]
    assert select_candidate(candidates, 0.90, 0.01)["dev_gflops"] == 2.0
    assert select_candidate(candidates, 0.99, 0.01)["dev_accuracy"] == 0.90


@pytest.mark.parametrize("scale", [0.0, 1.0, 1.5])
def test_simulated_exits_equal_the_packed_path(finished: TrainConfig, scale: float) -> None:
    model = load(finished.directory / FINAL_DIR)
    data = load_data(finished)
    collected = collect(model, data.train, batch_size=16, device="cpu", prune=scale > 0, threshold_scale=scale or 1.0)
    encoded = encode(data.tokenizer, data.dataset.train, finished.max_length)
    batch = next(batches(encoded, 1000))
    middle = float(collected.uncertainty[:, 0].median())
    for tau in (None, 0.0, middle, 1.0):
        predictions, exit_layer, flops = simulate(collected, tau)
        with torch.no_grad():
            out = model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["token_type_ids"],
                tau=0.0 if tau is None else tau,
                threshold_scale=scale,
                prune=scale > 0,
                early_exit=tau is not None,
                backend="torch",
            )
        assert exit_layer.tolist() == out.exit_layer.tolist(), tau
        assert flops.tolist() == out.flops.tolist(), tau
        assert predictions.tolist() == out.logits.argmax(dim=1).tolist(), tau
    assert len(set(simulate(collected, middle)[1].tolist())) > 1


# Reliability: TrainConfig's checks, damaged run directories repaired, a failed first run not blocking a rerun


def test_a_damaged_partial_checkpoint_is_discarded_and_its_stage_restarts(root: Path, finished: TrainConfig) -> None:
    config = tiny_config(root, "damaged_partial")
    callback, _ = crash_at("checkpoint", stage=1, step=10)
    with pytest.raises(Crash):
        train(config, [1], callback=callback, progress=False)
    checkpoint = config.directory / PARTIAL_DIR / "trainer.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.warns(TrainingWarning, match="discarding the partial checkpoint"):
        train(config, [1], progress=False)
    assert_same_weights(load(stage_dir(config, 1)), load(stage_dir(finished, 1)))


@pytest.mark.parametrize("damage", ["bytes", "gone", "config"])
def test_a_done_stage_whose_folder_is_damaged_or_gone_is_trained_again(
    root: Path, finished: TrainConfig, damage: str
) -> None:
    config = tiny_config(root, f"damaged_{damage}", epochs_finetune=1)
    train(config, [1], progress=False)
    folder = stage_dir(config, 1)
    before = {key: value.clone() for key, value in load(folder).state_dict().items()}  # weights may be memory-mapped
    if damage == "bytes":
        weights = folder / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-100:] = bytes(100)
        weights.write_bytes(bytes(data))
    elif damage == "gone":
        shutil.rmtree(folder)
    else:
        (folder / "config.json").write_text('{"hidden_size": 3')
    with pytest.warns(TrainingWarning, match="will be trained again"):
        state = train(config, [1], progress=False)
    assert state["stages_done"] == [1]
    after = load(folder).state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)


def test_a_failed_first_run_does_not_block_a_corrected_rerun(root: Path, tmp_path: Path) -> None:
    bad = tiny_config(root, "failed_first", dataset=str(tmp_path / "missing.csv"), lr=0.5)
    with pytest.raises(ValueError, match="missing.csv"):
        train(bad, progress=False)
    assert (bad.directory / CONFIG_FILE).exists()
    good = tiny_config(root, "failed_first")
    with pytest.warns(TrainingWarning, match="completed no stage"):
        Trainer(good, progress=False)
    assert json.loads((good.directory / CONFIG_FILE).read_text()) == good.to_dict()


def test_fit_ends_with_the_weights_of_its_best_dev_evaluation(root: Path) -> None:
    config = tiny_config(root, "best-epoch")
    data = load_data(config)
    model = load(Path(config.model))
    model.set_thresholds([0.0] * model.config.num_hidden_layers)
    scores = iter([0.6, 0.9, 0.9, 0.7])
    snapshots: list[dict[str, torch.Tensor]] = []

    def evaluate() -> dict[str, float]:
        snapshots.append({key: value.clone() for key, value in model.state_dict().items()})
        return {"dev_accuracy": next(scores)}

    stage = StageSpec(1, "finetune", 4, "none", "ce")
    metrics = fit(model, stage, data.train, config, seed=0, progress=False, evaluate=evaluate)
    assert metrics["epoch_dev_accuracy"] == [0.6, 0.9, 0.9, 0.7]
    assert metrics["best_epoch"] == 3, "ties go to the later, more trained epoch"
    final = model.state_dict()
    assert all(torch.equal(final[key], snapshots[2][key]) for key in final)
    assert not all(torch.equal(final[key], snapshots[3][key]) for key in final)


@pytest.mark.parametrize("objective", ["ce", "soft"])
@pytest.mark.parametrize("weight", [0.0, 0.4, 1.0])
def test_stage_loss_with_a_teacher_mixes_cross_entropy_and_kl_to_the_teacher(
    root: Path, objective: str, weight: float
) -> None:
    config = tiny_config(root, "unused", prune_teacher_weight=weight)
    model = load(Path(config.model))
    model.set_thresholds([0.2] * model.config.num_hidden_layers)
    batch = next(batches(load_data(config).train, 8))
    teacher = torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    stage = StageSpec(2, "soft", 1, "soft", objective, lambda_=0.3)
    out, loss = stage_loss(model, stage, batch, config, teacher)
    logits, target = out.logits.detach().double(), teacher.double().softmax(dim=-1)
    kl = (target * (target.log() - logits.log_softmax(dim=-1))).sum(dim=-1).mean()
    cross_entropy = F.cross_entropy(logits, batch["labels"])
    penalty = 0.3 * out.mask_mean.detach().double() if objective == "soft" else 0.0
    assert float(loss.detach()) == pytest.approx(float((1 - weight) * cross_entropy + weight * kl + penalty), rel=1e-5)
    _, labels_only = stage_loss(model, stage, batch, config)
    assert float(labels_only.detach()) == pytest.approx(float(cross_entropy + penalty), rel=1e-5), (
        "no teacher: labels only"
    )


def test_the_teacher_is_the_dense_models_logits_on_the_train_split(root: Path) -> None:
    labels_only = tiny_config(root, "labels-only", prune_teacher_weight=0.0)
    assert Trainer(labels_only, progress=False).teacher() is None, "weight 0: no teacher pass"
    config = tiny_config(root, "teacher", prune_teacher_weight=1.0)
    shutil.rmtree(config.directory, ignore_errors=True)
    Trainer(config, progress=False).run([1])
    trainer = Trainer(config, progress=False)
    teacher = trainer.teacher()
    dense, train_split = load(trainer.stage_dir(1)), trainer.data.train
    assert teacher.shape == (len(train_split["labels"]), 2)
    for batch in batches(train_split, 7):
        with torch.no_grad():
            out = dense.masked_forward(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        torch.testing.assert_close(teacher[batch["index"]], out.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_pure_distillation_makes_the_pruning_stages_ignore_the_labels(root: Path, weight: float) -> None:
    config = tiny_config(root, "unused", prune_teacher_weight=weight)
    data = load_data(config)
    teacher = torch.randn(len(data.train["labels"]), 2, generator=torch.Generator().manual_seed(4))
    flipped = dict(data.train, labels=[1 - label for label in data.train["labels"]])
    trained = []
    for train_split in (data.train, flipped):
        model = load(Path(config.model))
        model.set_thresholds(initial_thresholds(1.0, model.config.num_hidden_layers))
        fit(
            model,
            StageSpec(2, "soft", 1, "soft", "soft", 0.1),
            train_split,
            config,
            seed=0,
            progress=False,
            teacher=teacher,
        )
        trained.append(model)
    pairs = zip(trained[0].state_dict().values(), trained[1].state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs) == (weight == 1.0)


def test_bf16_autocast_training_keeps_the_results_contract(root: Path, device: torch.device) -> None:
    """On the test device: every stage on CUDA on a GPU machine (mp train --device cuda), the CPU elsewhere."""
    config = tiny_config(root, f"bf16-{device.type}", precision="bf16", device=device.type)
    with config.autocast():
        ones = torch.ones(2, 3, device=device), torch.ones(4, 3, device=device)
        assert torch.nn.functional.linear(*ones).dtype == torch.bfloat16
    state = train(config, progress=False)
    assert state["stages_done"] == [1, 2, 3, 4]
    assert [state[f"stage{n}"]["arithmetic"] for n in state["stages_done"]] == ["bf16"] * 4
    final = load(config.directory / FINAL_DIR)
    assert all(p.dtype == torch.float32 for p in final.parameters()), "autocast keeps fp32 weights"
    assert mean_loss(load(stage_dir(config, 1)), config) < 0.7 * mean_loss(load(Path(config.model)), config)
    assert state["stage1"]["dev_accuracy"] >= 0.75


def test_a_half_precision_checkpoint_trains_with_fp32_master_weights(root: Path, tmp_path: Path) -> None:
    """transformers 5 loads a checkpoint in its stored dtype by default; AdamW on float16 weights turns the first
    update into NaN. Stage 1 must start from fp32 weights and train as from the fp32 checkpoint."""
    from transformers import BertModel

    half = write_half_copy(root / "base", tmp_path / "half")
    hazard = {p.dtype for p in BertModel.from_pretrained(half).parameters()}
    assert hazard == {torch.float16}, "the hazard: transformers loads the weights as stored"
    config = tiny_config(root, "from-half", model=str(half))
    state = train(config, stages=[1], progress=False)
    assert all(p.dtype == torch.float32 for p in load(stage_dir(config, 1)).parameters())
    assert torch.isfinite(torch.tensor(state["stage1"]["train_loss"]))
    assert mean_loss(load(stage_dir(config, 1)), config) < 0.7 * mean_loss(load(half).float(), config)


def test_a_diverging_stage_stops_with_the_stage_and_step_named(root: Path, tmp_path: Path) -> None:
    poisoned = write_half_copy(root / "base", tmp_path / "nan", poison="classifier.weight")
    config = tiny_config(root, "diverges", model=str(poisoned))
    with pytest.raises(ValueError, match=r"stage 1 finetune: the training loss is nan at step 1 \(weights in float32"):
        train(config, stages=[1], progress=False)


def test_a_run_saved_before_a_field_existed_resumes_with_its_default(finished: TrainConfig, tmp_path: Path) -> None:
    copy = tmp_path / "older"
    shutil.copytree(finished.directory, copy)
    saved = json.loads((copy / CONFIG_FILE).read_text())
    del saved["distillation"], saved["precision"]
    (copy / CONFIG_FILE).write_text(json.dumps(saved))
    state = Trainer(tiny_config(finished.directory.parent, "unused", run_dir=str(copy)), progress=False).run()
    assert state["stages_done"] == [1, 2, 3, 4]
