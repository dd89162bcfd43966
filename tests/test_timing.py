"""Specification of ``mp_model.recipe.timing``: the latency protocol of ``mp eval`` (``interleaved_timings``).

The baseline and every setting run in turn within each round, after one warm-up round, so that a change of
machine load between rounds hits all of them alike; bad repeat counts are refused.
"""

from __future__ import annotations

import pytest
import torch

from mp_model.recipe.timing import interleaved_timings


def test_every_round_runs_each_runner_once_in_turn_after_a_warm_up_round() -> None:
    calls: list[tuple[str, int]] = []
    runners = [lambda batch, name=name: calls.append((name, int(batch["x"]))) for name in ("hf", "a", "b")]
    inputs = [{"x": torch.tensor(i)} for i in range(2)]
    times = interleaved_timings(runners, inputs, torch.device("cpu"), repeats=3)
    one_round = [(name, i) for name in ("hf", "a", "b") for i in range(2)]
    assert calls == one_round * 4
    assert len(times) == 3 and all(len(row) == 3 and min(row) >= 0 for row in times)


def test_repeats_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="repeats"):
        interleaved_timings([lambda _b: None], [{}], torch.device("cpu"), repeats=0)
