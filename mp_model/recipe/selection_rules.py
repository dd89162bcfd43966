"""Candidate selection rules beside ``select``'s, for issue #42: keep more of the achievable speedup without leaving
the accuracy limit more often. Each is a ``Rule`` (``select``'s contract, through ``select_with``) and none needs
retraining; ``bench/selection_study.py`` measures them all.

Monotone smoothing. A method's accuracy drop from dense should not fall when ``tau`` rises (more examples exit
early) nor when ``threshold_scale`` rises (more tokens are pruned); on a small dev split it often does, by noise,
and a noisy dip below the limit is what a plain rule then picks. ``isotonic_grid`` fits the drops of a method's
``(scale, tau)`` grid by the least-squares fit that is non-decreasing along both axes (every cell weighted
equally), exactly: it splits the grid where the fit crosses a block's mean (``exceeding_cells``) until no block
splits. Only whether a cell's fit exceeds the limit matters for a choice, and that is one exact step on its own
(the threshold theorem of isotonic regression: the cells whose fit exceeds ``c`` are the smallest non-decreasing
"upper" set that maximises the sum of ``drop - c`` over it, a staircase found by dynamic programming across the
grid's rows), so the bootstrap version smooths every resample at once. A 1-D method (LTP-only, FastBERT-only) is a
grid of one row.

Normal bound. A setting qualifies if its paired drop plus ``k`` standard errors of it (the plug-in error of the
mean of the per-example differences ``dense correct - setting correct``) is within the limit: the bootstrap
rule's normal approximation, without resampling noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mp_model.recipe.checks import check_float, check_int
from mp_model.recipe.selection import (
    RESAMPLES,
    ROUNDING,
    Rule,
    bootstrap_weights,
    check_rule,
    outcome_matrix,
    select,
    select_with,
    within_limit,
)

TIE = 1e-12  # sums of at most a few hundred drops: their float error is far below this
BOOTSTRAP_CONFIDENCES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
SMOOTHED_CONFIDENCES = (0.6, 0.7, 0.8, 0.9)
NORMAL_BOUNDS = (0.25, 0.5, 1.0, 1.5)


def exceeding_cells(values: torch.Tensor, limit: float | torch.Tensor) -> torch.Tensor:
    """Which cells' non-decreasing 2-D least-squares fit exceeds ``limit``, without computing the fit.

    ``values`` ``(..., A, B)`` (a batch of grids, non-decreasing wanted along both last axes), ``limit`` a float or a
    tensor broadcasting to ``values``. Returns a bool tensor of ``values``' shape: per grid the smallest upper set
    (closed under moving to a larger index on either axis) that maximises the sum of ``values - limit`` over it.
    """
    gains = values.double() - limit
    *batch, rows, cols = gains.shape
    # row_gain[..., a, t]: the gain of taking columns t.. of row a (t == cols: none of it).
    zero = gains.new_zeros(*batch, rows, 1)
    row_gain = torch.cat([gains.flip(-1).cumsum(-1).flip(-1), zero], dim=-1)
    # best[a][..., t]: the best total of rows 0..a with row a taken from column t (rows above take no more).
    best = [row_gain[..., 0, :]]
    for a in range(1, rows):
        best.append(row_gain[..., a, :] + _suffix_max(best[-1]))
    columns = torch.arange(cols + 1)
    start = torch.full(batch, 0, dtype=torch.int64)
    starts = [start] * rows
    for a in range(rows - 1, -1, -1):
        allowed = columns >= start[..., None]
        totals = best[a].masked_fill(~allowed, -math.inf)
        top = totals.amax(dim=-1, keepdim=True)
        start = torch.where(allowed & (totals >= top - TIE), columns, -1).amax(dim=-1)
        starts[a] = start
    return torch.arange(cols) >= torch.stack(starts, dim=-1)[..., None]


def _suffix_max(values: torch.Tensor) -> torch.Tensor:
    """``(..., T)``: the running maximum from the right (position t: the maximum over t..T-1)."""
    return values.flip(-1).cummax(dim=-1).values.flip(-1)


def isotonic_grid(values: torch.Tensor) -> torch.Tensor:
    """The least-squares fit of the ``(A, B)`` grid ``values`` that is non-decreasing along both axes, float64.

    Exact up to float rounding: a block (first the whole grid) whose cells' fit exceeds the block's mean in some
    upper part is split there and both parts are fitted on their own (each is a block of the grid's order); a block
    that does not split takes its mean. A 1-D fit is a grid of one row.
    """
    if values.dim() != 2 or values.numel() == 0:
        raise ValueError(f"values must be a non-empty (A, B) grid, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError("values must be finite")
    values = values.double()
    fit = torch.empty_like(values)
    blocks = [torch.ones_like(values, dtype=torch.bool)]
    while blocks:
        block = blocks.pop()
        mean = values[block].mean()
        # Cells outside the block weigh nothing: taking them or not changes no sum.
        upper = exceeding_cells(torch.where(block, values, mean), mean) & block
        if upper.any() and not torch.equal(upper, block):
            blocks += [upper, block & ~upper]
        else:
            fit[block] = mean
    return fit


def _grid(rows: Sequence[dict[str, Any]]) -> tuple[int, int, torch.Tensor]:
    """The ``(scales, taus)`` grid of one method's records: its shape and each record's flat cell index."""
    scales = sorted({r["threshold_scale"] for r in rows}, key=lambda v: -math.inf if v is None else v)
    taus = sorted({r["tau"] for r in rows}, key=lambda v: -math.inf if v is None else v)
    cells = [scales.index(r["threshold_scale"]) * len(taus) + taus.index(r["tau"]) for r in rows]
    if len(rows) != len(scales) * len(taus) or len(set(cells)) != len(cells):
        raise ValueError(f"{rows[0]['method']}: smoothing needs one record per (threshold_scale, tau) of a full grid")
    return len(scales), len(taus), torch.tensor(cells)


def smoothed_within_limit(drops: torch.Tensor, rows: Sequence[dict[str, Any]], max_drop: float) -> torch.Tensor:
    """``(R, S)`` bool: whether each of ``rows``' smoothed drops (``drops`` ``(R, S)``, R resamples or R = 1) is
    within ``max_drop``, each method's grid smoothed on its own (``exceeding_cells``)."""
    result = torch.zeros(drops.shape, dtype=torch.bool)
    for method in dict.fromkeys(r["method"] for r in rows):
        members = torch.tensor([i for i, r in enumerate(rows) if r["method"] == method])
        scales, taus, cells = _grid([rows[i] for i in members])
        grid = drops.new_zeros(drops.shape[0], scales * taus)
        grid[:, cells] = drops[:, members].double()
        over = exceeding_cells(grid.view(-1, scales, taus), max_drop + ROUNDING).view(-1, scales * taus)
        result[:, members] = ~over[:, cells]
    return result


def select_smoothed(
    records: Sequence[dict[str, Any]],
    max_drop: float = 0.01,
    *,
    confidence: float | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """``select`` on monotone-smoothed drops: per method, the fewest-GFLOPs setting whose smoothed drop from dense is
    within ``max_drop`` (with ``confidence``: in that share of paired bootstrap resamples, each smoothed on its
    own; records need ``outcome``). Same contract as ``select``."""
    check_rule(max_drop, confidence)

    def qualifies(rows: list[dict[str, Any]], dense: dict[str, Any]) -> list[bool]:
        if confidence is None:
            drops = torch.tensor([[dense["accuracy"] - r["accuracy"] for r in rows]], dtype=torch.float64)
            return smoothed_within_limit(drops, rows, max_drop)[0].tolist()
        correct = outcome_matrix(rows).double()
        weights = bootstrap_weights(correct.shape[1], resamples, seed).double()
        drops = (weights @ (dense["outcome"]["correct"].double()[:, None] - correct.T)) / correct.shape[1]
        shares = smoothed_within_limit(drops, rows, max_drop).double().mean(dim=0)
        return (shares >= confidence - 1e-12).tolist()

    return select_with(records, qualifies)


def select_normal_bound(records: Sequence[dict[str, Any]], max_drop: float = 0.01, *, k: float) -> list[dict[str, Any]]:
    """``select`` with a setting qualifying if its drop plus ``k`` standard errors of the paired per-example
    difference from dense is within ``max_drop`` (records need ``outcome``; each gets that sum as ``drop_bound``).
    Same contract as ``select``."""
    check_float("max_drop", max_drop, 0.0)
    check_float("k", k, 0.0)

    def qualifies(rows: list[dict[str, Any]], dense: dict[str, Any]) -> list[bool]:
        correct = outcome_matrix(rows).double()
        differences = dense["outcome"]["correct"].double()[None, :] - correct
        error = differences.std(dim=1, correction=0) / math.sqrt(differences.shape[1])
        bounds = differences.mean(dim=1) + k * error
        for record, bound in zip(rows, bounds.tolist(), strict=True):
            record["drop_bound"] = bound
        return within_limit(bounds, max_drop).tolist()

    return select_with(records, qualifies)


def select_else_point(
    records: Sequence[dict[str, Any]], rule: Rule, seed: int, max_drop: float = 0.01
) -> list[dict[str, Any]]:
    """``rule``'s choice, except for a method for which no setting met it (``met_rule`` False): that method takes
    ``select``'s point-estimate choice at ``max_drop`` instead of its most accurate setting. For a dev split so
    small that no setting's bound fits under the limit, the cheapest setting within it is the better guess (#42:
    BBC News, 212 dev examples). Same contract as ``select``."""
    chosen = rule(records, seed)  # first: a rule may annotate the records (``drop_bound``) that the copies carry
    point = {(r["dataset"], r["method"]): r for r in select(records, max_drop)}
    return [c if c["met_rule"] else point[(c["dataset"], c["method"])] for c in chosen]


def candidate_rules(max_drop: float = 0.01, resamples: int = RESAMPLES) -> dict[str, Rule]:
    """Every candidate rule by name, at ``max_drop``, bootstraps drawing ``resamples`` (a rule's seed seeds them):
    ``point``, ``bootstrap C`` (``select`` at confidence C, today's ``mp eval`` at 0.8), ``smoothed point``,
    ``smoothed bootstrap C``, ``normal k=K`` and ``normal k=1 else point`` (``select_else_point``)."""
    check_float("max_drop", max_drop, 0.0)
    check_int("resamples", resamples)
    rules: dict[str, Rule] = {"point": lambda records, seed: select(records, max_drop)}
    for c in BOOTSTRAP_CONFIDENCES:
        rules[f"bootstrap {c:g}"] = lambda records, seed, c=c: select(
            records, max_drop, confidence=c, resamples=resamples, seed=seed
        )
    rules["smoothed point"] = lambda records, seed: select_smoothed(records, max_drop)
    for c in SMOOTHED_CONFIDENCES:
        rules[f"smoothed bootstrap {c:g}"] = lambda records, seed, c=c: select_smoothed(
            records, max_drop, confidence=c, resamples=resamples, seed=seed
        )
    for k in NORMAL_BOUNDS:
        rules[f"normal k={k:g}"] = lambda records, seed, k=k: select_normal_bound(records, max_drop, k=k)
    normal = rules["normal k=1"]
    rules["normal k=1 else point"] = lambda records, seed: select_else_point(records, normal, seed, max_drop)
    return rules


RULE_SPECS = "normal:K, bootstrap:C, smoothed:C, smoothed or point"


def parse_rule(spec: str, max_drop: float = 0.01, resamples: int = RESAMPLES) -> tuple[str, Rule]:
    """The rule ``spec`` names and its name as ``candidate_rules`` spells it: ``normal:K`` (``select_normal_bound``,
    ``K`` >= 0), ``bootstrap:C`` (``select`` at confidence ``C`` in [0, 1]), ``smoothed:C`` (``select_smoothed`` at
    ``C``), ``smoothed`` (its point estimate) or ``point`` (``select``'s). A ``ValueError`` for any other text."""
    name, _, value = spec.strip().lower().partition(":")
    if name == "point" and not value:
        return "point", lambda records, seed: select(records, max_drop)
    if name == "smoothed" and not value:
        return "smoothed point", lambda records, seed: select_smoothed(records, max_drop)
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"rule must be one of {RULE_SPECS}, got {spec!r}") from None
    if name == "normal":
        check_float("rule's K", number, 0.0)
        return f"normal k={number:g}", lambda records, seed: select_normal_bound(records, max_drop, k=number)
    if name in ("bootstrap", "smoothed"):
        check_float("rule's C", number, 0.0, 1.0)
        chosen = select if name == "bootstrap" else select_smoothed
        label = "bootstrap" if name == "bootstrap" else "smoothed bootstrap"
        return f"{label} {number:g}", lambda records, seed: chosen(
            records, max_drop, confidence=number, resamples=resamples, seed=seed
        )
    raise ValueError(f"rule must be one of {RULE_SPECS}, got {spec!r}")
