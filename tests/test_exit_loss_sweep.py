"""The stage-4 loss sweep on a finished tiny run: one record per variant, each with both selection rules; the
variant equal to the run's configuration reproduces the run's heads, and the cached passes match the packed path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import exit_loss_sweep
from mp_model.recipe.train_config import TrainConfig
from mp_model.recipe.training import train
from tests.utils import write_tiny_model, write_toy_dataset


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    config = TrainConfig(
        model=str(write_tiny_model(root / "base")),
        dataset=str(write_toy_dataset(root / "toy.csv")),
        run_dir=str(root / "run"),
        batch_size=8,
        eval_batch_size=16,
        max_length=48,
        lr=3e-3,
        exit_lr=1e-2,
        epochs_finetune=2,
        epochs_exits=2,
        final_thresholds=(1.0,),
        lambdas=(0.5,),
        search_epochs_soft=0.5,
        search_epochs_hard=0.5,
        precision="fp32",
    )
    train(config, progress=False)
    return config.directory


def test_every_variant_is_scored_under_both_rules_and_the_runs_own_loss_reproduces_its_heads(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep.json"
    argv = ["--run-dir", str(run_dir), "--out", str(out), "--taus", "0.2", "0.6", "--scales", "1.0", "2.0"]
    assert exit_loss_sweep.main([*argv, "--reliability-splits", "3", "--threads", "1"]) == 0
    payload = json.loads(out.read_text())
    names = [r["variant"] for r in payload["records"]]
    assert names == [name for name, _ in exit_loss_sweep.VARIANTS]
    saved = json.loads((run_dir / "train_config.json").read_text())
    own = {
        name for name, changes in exit_loss_sweep.VARIANTS if all(saved[key] == value for key, value in changes.items())
    }
    assert len(own) == 1
    assert {r["variant"] for r in payload["records"] if r["reproduces_run"]} == own
    for record in payload["records"]:
        for rule in record["rules"].values():
            assert set(rule["chosen"]) == {"ltp", "fastbert", "mp"}
            assert 0.0 <= rule["reliability"]["mp"]["within_limit"] <= 1.0
    checks = payload["provenance"]["pass_checks"]
    assert set(checks) == {f"{split} {scale}" for split in ("dev", "test") for scale in (None, 1.0, 2.0)}
    assert all(c["max_exit_logit_error"] < 1e-4 and c["exit_argmax_agreement"] == 1.0 for c in checks.values())
    assert payload["provenance"]["git_commit"]
    assert "MP" in capsys.readouterr().out
    assert payload["provenance"]["cache_arithmetic"] == "fp32"


def test_chosen_variants_on_a_cache_in_another_arithmetic_and_at_other_scales(run_dir: Path, tmp_path: Path) -> None:
    """``--cache-precision bf16`` caches the distillation examples under bf16 autocast (as a bf16 run's stage 4
    does), so no variant reproduces the fp32 run's heads; only the chosen losses are trained, on the run's scales
    and on ``--cache-scales``, at the run's epochs and at ``--epochs-exits``."""
    out = tmp_path / "sweep.json"
    argv = ["--run-dir", str(run_dir), "--out", str(out), "--taus", "0.2", "--scales", "1.0", "--threads", "1"]
    extra = ["--variants", "forward KL", "CE", "--epochs-exits", "1", "--cache-precision", "bf16"]
    assert exit_loss_sweep.main([*argv, *extra, "--cache-scales", "1.0", "--reliability-splits", "2"]) == 0
    payload = json.loads(out.read_text())
    names = [r["variant"] for r in payload["records"]]
    assert names == [
        "forward KL",
        "CE",
        "forward KL, 1 epochs",
        "CE, 1 epochs",
        "forward KL, scales 1",
        "CE, scales 1",
        "forward KL, scales 1, 1 epochs",
        "CE, scales 1, 1 epochs",
    ]
    run_scales = json.loads((run_dir / "train_config.json").read_text())["exit_scales"]
    assert [r["cache_scales"] for r in payload["records"]] == [run_scales] * 4 + [[1.0]] * 4
    assert payload["provenance"]["exit_scales"] == run_scales
    assert payload["provenance"]["cache_arithmetic"] == "bf16"
    assert not any(r["reproduces_run"] for r in payload["records"])
    for record in payload["records"]:
        for accuracies in record["exit_accuracy"].values():
            assert len(accuracies) == 2 and all(0.0 <= a <= 1.0 for a in accuracies)  # 3 layers: 2 exits
