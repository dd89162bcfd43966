"""The training-step benchmark on a CI-sized shape: both arithmetics timed per mask mode, bf16's speedup their
ratio, and the provenance says what ``precision="auto"`` resolves to on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import bench_train_step
from mp_model.recipe.train_config import TrainConfig


def test_writes_both_arithmetics_and_their_ratio(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "train-step.json"
    argv = ["--batch-size", "2", "--length", "16", "--rounds", "2", "--batches", "2", "--out", str(out)]
    assert bench_train_step.main(argv) == 0
    payload = json.loads(out.read_text())
    assert [r["mask_mode"] for r in payload["records"]] == ["none", "soft"]
    for record in payload["records"]:
        assert all(len(record["step_s_all"][name]) == 2 for name in bench_train_step.ARITHMETICS)
        assert record["bf16_speedup"] == pytest.approx(record["step_s"]["fp32"] / record["step_s"]["bf16"])
    assert payload["provenance"]["auto_resolves_to"] == TrainConfig(model="m").arithmetic
    assert {"length", "batch_size", "threads", "git_commit"} <= set(payload["provenance"])
    assert "bf16" in capsys.readouterr().out
