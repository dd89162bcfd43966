"""Specification of the end-to-end benchmark's exit and pruning schedule (``bench/e2e_schedule.py``): resampling
to another depth keeps the exit mass and the pruning curve; the threshold search reaches its target count."""

from __future__ import annotations

import pytest
import torch

from bench import e2e


def test_schedule_resampling_keeps_the_exit_mass_and_the_pruning_curve() -> None:
    schedule = e2e.DEFAULT_SCHEDULE
    for layers in (2, 6, 12, 24):
        resampled = schedule.resampled(layers)
        assert sum(resampled.exit_distribution) == pytest.approx(1.0)
        assert list(resampled.kept_ratio) == sorted(resampled.kept_ratio, reverse=True)
        assert resampled.kept_ratio[-1] == pytest.approx(schedule.kept_ratio[-1])
    twelve = schedule.resampled(12)
    assert twelve.kept_ratio[1::2] == pytest.approx(schedule.kept_ratio)
    pairs = [sum(twelve.exit_distribution[i : i + 2]) for i in range(0, 12, 2)]
    assert pairs == pytest.approx(list(schedule.exit_distribution))
    assert twelve.exit_distribution[-2:] == pytest.approx([0.0, schedule.exit_distribution[-1]])
    three = schedule.resampled(3)
    assert three.exit_distribution == pytest.approx([0.5, 0.3, 0.2])


def test_threshold_search_reaches_the_target_count() -> None:
    scores = torch.linspace(0.5, 1.5, 1001).tolist()
    calls = []

    def kept(threshold: float) -> int:
        calls.append(threshold)
        return sum(score > threshold for score in scores)

    for target in (900, 500, 37):
        calls.clear()
        threshold = e2e.find_threshold(kept, target, slack=1, guess=1.0, steps=40)
        assert abs(kept(threshold) - target) <= 1
        assert len(calls) < 25
