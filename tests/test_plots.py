"""Specification of ``mp_model.recipe.plots``' pure parts (the figures themselves are drawn in
``test_quickstart.py`` and ``test_pipeline.py``)."""

from __future__ import annotations

from mp_model.recipe import plots


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(1.0, 80.0), (2.0, 79.0), (2.0, 85.0), (3.0, 84.0), (0.5, 70.0), (4.0, 86.0)]
    assert plots.pareto_front(points) == [(0.5, 70.0), (1.0, 80.0), (2.0, 85.0), (4.0, 86.0)]
