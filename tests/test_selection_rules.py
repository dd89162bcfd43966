"""Specification of ``mp_model.recipe.selection_rules``: the exact 2-D monotone (isotonic) fit of a grid of drops,
its threshold shortcut, and every candidate rule's contract (``select``'s: one record per method, the fewest GFLOPs
among the qualifying, ties to the more accurate, the most accurate when nothing qualifies)."""

from __future__ import annotations

import itertools

import pytest
import torch

from mp_model.recipe.selection import select
from mp_model.recipe.selection_rules import (
    candidate_rules,
    exceeding_cells,
    isotonic_grid,
    parse_rule,
    select_else_point,
    select_normal_bound,
    select_smoothed,
)
from tests.test_selection import flipped, outcome_record, steady_and_noisy


def brute_force_isotonic(values: torch.Tensor) -> torch.Tensor:
    """The min-max formula of isotonic regression over all upper and lower sets of a small grid (Robertson, Wright
    and Dykstra 1988, Theorem 1.4.4): fit(x) = max over upper sets U holding x of min over lower sets L holding x of
    the mean of U & L."""
    rows, cols = values.shape
    cells = [(a, b) for a in range(rows) for b in range(cols)]
    uppers = []
    for bits in itertools.product((False, True), repeat=len(cells)):
        upper = {cell for cell, taken in zip(cells, bits, strict=True) if taken}
        if all((c, d) in upper for a, b in upper for c, d in cells if c >= a and d >= b):
            uppers.append(upper)
    lowers = [set(cells) - upper for upper in uppers]
    fit = torch.empty(rows, cols, dtype=torch.float64)
    for cell in cells:
        fit[cell] = max(
            min(sum(float(values[c]) for c in upper & lower) / len(upper & lower) for lower in lowers if cell in lower)
            for upper in uppers
            if cell in upper
        )
    return fit


def test_a_monotone_grid_is_its_own_fit() -> None:
    grid = torch.tensor([[0.0, 0.1, 0.3], [0.05, 0.2, 0.3], [0.4, 0.5, 0.9]])
    assert torch.equal(isotonic_grid(grid), grid.double())


def test_a_single_violation_is_pooled_with_its_neighbour() -> None:
    fit = isotonic_grid(torch.tensor([[0.0, 0.3, 0.1, 0.5]]))
    assert fit.flatten().tolist() == pytest.approx([0.0, 0.2, 0.2, 0.5])


def test_a_violation_across_both_axes_pools_the_cells_that_break_the_order() -> None:
    # (0, 1) sits above (1, 1) below it and above (0, 2) to its right: the three pool to their mean.
    fit = isotonic_grid(torch.tensor([[0.0, 0.6, 0.3], [0.1, 0.3, 0.7]]))
    assert fit.flatten().tolist() == pytest.approx([0.0, 0.4, 0.4, 0.1, 0.4, 0.7])


@pytest.mark.parametrize("shape", [(2, 3), (3, 3), (1, 5), (3, 2)])
def test_the_fit_equals_the_min_max_formula_on_random_grids(shape: tuple[int, int]) -> None:
    generator = torch.Generator().manual_seed(sum(shape))
    for trial in range(12):
        values = torch.rand(shape, generator=generator, dtype=torch.float64)
        if trial % 2:  # drops are multiples of 1 / examples: ties everywhere
            values = torch.randint(0, 5, shape, generator=generator).double() / 7
        assert isotonic_grid(values) == pytest.approx(brute_force_isotonic(values), abs=1e-12)


def test_the_threshold_shortcut_marks_exactly_the_cells_whose_fit_exceeds_the_limit() -> None:
    generator = torch.Generator().manual_seed(5)
    grids = torch.randint(0, 9, (40, 4, 5), generator=generator).double() / 40
    fits = torch.stack([isotonic_grid(grid) for grid in grids])
    for limit in (0.02, 0.05, 0.1, 0.125):
        assert torch.equal(exceeding_cells(grids, limit + 1e-9), fits > limit + 1e-9)


@pytest.mark.parametrize("values", [torch.zeros(0, 3), torch.zeros(3), torch.tensor([[0.0, float("nan")]])])
def test_isotonic_grid_refuses_what_is_not_a_finite_grid(values: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="values"):
        isotonic_grid(values)


def grid_records(dense: torch.Tensor, drops: dict[tuple[float, float], int], method: str = "mp") -> list[dict]:
    """Dense plus one record per (tau, scale) whose answers lose ``drops[key]`` of dense's right answers; GFLOPs fall
    with tau and scale (a larger knob is cheaper)."""
    records = [outcome_record("dense", dense, 10.0)]
    for index, ((tau, scale), lost) in enumerate(sorted(drops.items())):
        correct = flipped(dense, to_wrong=lost, to_right=0, seed=index)
        record = outcome_record(method, correct, 5.0 - tau - scale, scale=scale)
        records.append(record | {"tau": tau})
    return records


def test_smoothing_refuses_a_noisy_dip_below_the_limit() -> None:
    dense = torch.arange(400) % 5 != 0
    # Drops in examples of 400 (the limit, 1 point, is 4): at scale 1, tau 0.6 dips to 3 after 6 at tau 0.4, a dip
    # the monotone fit pools to 4.5, over the limit; every scale-2 setting is over it.
    lost = {(0.2, 1.0): 0, (0.4, 1.0): 6, (0.6, 1.0): 3, (0.8, 1.0): 10, (0.2, 2.0): 5, (0.4, 2.0): 8}
    lost |= {(0.6, 2.0): 8, (0.8, 2.0): 12}
    records = grid_records(dense, lost)
    plain = {r["method"]: r for r in select(records, 0.01)}["mp"]
    smooth = {r["method"]: r for r in select_smoothed(records, 0.01)}["mp"]
    assert (plain["tau"], plain["threshold_scale"]) == (0.6, 1.0), "the plain rule takes the dip"
    assert (smooth["tau"], smooth["threshold_scale"]) == (0.2, 1.0)


def test_smoothing_needs_a_full_grid() -> None:
    dense = torch.arange(100) % 4 != 0
    records = grid_records(dense, {(0.2, 1.0): 0, (0.4, 1.0): 1, (0.2, 2.0): 1})
    with pytest.raises(ValueError, match="full grid"):
        select_smoothed(records, 0.01)


def test_the_normal_bound_refuses_a_drop_within_the_limit_by_luck_alone() -> None:
    records = steady_and_noisy()
    assert select_normal_bound(records, 0.01, k=0.0)[1]["gflops"] == 1.0, "k = 0 is the point estimate"
    # The noisy one's standard error is sqrt(78 / 400) / 20 = 2.2 points: half of it takes it over the limit.
    assert select_normal_bound(records, 0.01, k=0.5)[1]["gflops"] == 2.0


def test_where_no_setting_meets_the_bound_the_point_estimate_chooses_not_the_most_accurate() -> None:
    dense = torch.arange(200) % 10 != 0  # 90 % on 200 examples: one point is two examples
    two_lost = flipped(dense, to_wrong=2, to_right=0, seed=1)  # drop 1.0 point: within, its bound is not
    one_lost = flipped(dense, to_wrong=1, to_right=0, seed=2)  # drop 0.5, bound 0.5 + 0.5 = 1.0: within
    records = [outcome_record("dense", dense, 8.0)]
    swapped = flipped(dense, to_wrong=3, to_right=2, seed=3)  # drop 0.5, but bound 0.5 + 1.1: over
    records += [outcome_record("mp", two_lost, 1.0, scale=2.0), outcome_record("mp", swapped, 6.0, scale=1.0)]
    records += [outcome_record("ltp", two_lost, 1.0, scale=2.0), outcome_record("ltp", one_lost, 3.0, scale=1.0)]
    normal = candidate_rules()["normal k=1"]
    by_method = {r["method"]: r for r in normal(records, 0)}
    assert by_method["mp"]["gflops"] == 6.0 and not by_method["mp"]["met_rule"], "the bound alone: most accurate"
    assert by_method["ltp"]["gflops"] == 3.0 and by_method["ltp"]["met_rule"]
    chosen = {r["method"]: r for r in select_else_point(records, normal, 0, 0.01)}
    assert chosen["mp"]["gflops"] == 1.0 and chosen["mp"]["met_rule"], "no bound fits: the cheapest within, on dev"
    assert chosen["ltp"]["gflops"] == 3.0, "a method whose bound fits keeps the bound's choice"
    assert chosen["dense"]["gflops"] == 8.0
    assert [r["method"] for r in chosen.values()] == ["dense", "ltp", "mp"]


@pytest.mark.parametrize("name", list(candidate_rules()))
def test_every_rule_returns_one_record_per_method_ties_to_the_more_accurate(name: str) -> None:
    dense = torch.arange(300) % 4 != 0
    same = dense.clone()
    worse = flipped(dense, to_wrong=30, to_right=0, seed=3)
    records = [outcome_record("dense", dense, 8.0)]
    records += [outcome_record("ltp", same, 4.0, scale=1.0), outcome_record("ltp", same, 2.0, scale=2.0)]
    less_worse = flipped(dense, to_wrong=20, to_right=0, seed=5)
    records += [outcome_record("fastbert", worse, 1.0) | {"tau": 0.5}]
    records += [outcome_record("fastbert", less_worse, 3.0) | {"tau": 0.3}]
    tied = flipped(dense, to_wrong=1, to_right=0, seed=4)
    records += [outcome_record("mp", tied, 2.0, scale=1.0) | {"tau": 0.5}, outcome_record("mp", same, 2.0, scale=1.0)]
    records += [outcome_record("mp", worse, 0.5, scale=2.0), outcome_record("mp", worse, 0.5, scale=2.0) | {"tau": 0.5}]
    chosen = candidate_rules()[name](records, 0)
    by_method = {r["method"]: r for r in chosen}
    assert [r["method"] for r in chosen] == ["dense", "ltp", "fastbert", "mp"]
    assert by_method["ltp"]["gflops"] == 2.0, "the cheapest setting within the limit"
    assert by_method["fastbert"]["gflops"] == 3.0, "none within: the most accurate, then the cheaper"
    assert by_method["mp"]["gflops"] == 2.0 and by_method["mp"]["accuracy"] == by_method["dense"]["accuracy"]
    assert chosen == candidate_rules()[name](records, 0), "deterministic for a seed"


RULES_WITH_OUTCOMES = {
    "smoothed bootstrap": lambda records, max_drop: select_smoothed(records, max_drop, confidence=0.6),
    "normal bound": lambda records, max_drop: select_normal_bound(records, max_drop, k=0.5),
}


@pytest.mark.parametrize("name", list(RULES_WITH_OUTCOMES))
def test_the_rules_refuse_a_bad_limit_and_records_without_outcomes(name: str) -> None:
    rule = RULES_WITH_OUTCOMES[name]
    records = [outcome_record("dense", torch.ones(4, dtype=torch.bool), 1.0)]
    with pytest.raises(ValueError, match="max_drop"):
        rule(records, float("nan"))
    bare = [{key: value for key, value in r.items() if key != "outcome"} for r in records]
    with pytest.raises(ValueError, match="per-example outcomes"):
        rule(bare, 0.01)


@pytest.mark.parametrize(
    ("spec", "name"),
    [("normal:1", "normal k=1"), ("bootstrap:0.8", "bootstrap 0.8"), ("Smoothed:0.9", "smoothed bootstrap 0.9"),
     ("smoothed", "smoothed point"), ("point", "point")],
)  # fmt: skip
def test_a_rule_spec_names_the_candidate_rule_that_chooses_alike(spec: str, name: str) -> None:
    parsed_name, rule = parse_rule(spec)
    assert parsed_name == name
    dense, steady, noisy = steady_and_noisy()
    records = [dense, steady | {"threshold_scale": 1.0}, noisy | {"threshold_scale": 2.0}]  # a 2 x 1 grid
    assert rule(records, 3) == candidate_rules()[name](records, 3)


MALFORMED = ["normal", "normal:x", "bootstrap", "point:1", "median:1", "", "normal:-1", "smoothed:2"]


@pytest.mark.parametrize("spec", MALFORMED)
def test_a_malformed_rule_spec_is_a_value_error(spec: str) -> None:
    with pytest.raises(ValueError, match="rule"):
        parse_rule(spec)
