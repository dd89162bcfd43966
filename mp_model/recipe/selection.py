"""Choosing each method's setting on one split and reporting it on another, with the dev split's noise accounted for.

Rule (``select``): per method, the setting with the fewest GFLOPs whose accuracy drop from dense is within
``max_drop``. With ``confidence=None`` the drop is the point estimate on the selection split (the strict protocol's
plain rule). With ``confidence=c`` a setting qualifies only if, in a *paired bootstrap* over the selection split's
examples (``resamples`` draws with replacement, the same draws for every setting and for dense), the drop is within
``max_drop`` in at least a share ``c`` of the draws: a one-sided ``c`` confidence bound. Pairing matters: dense and a
setting disagree on few examples, so the drop's spread is far smaller than either accuracy's (about one point on
1,275 examples).

How often does a rule keep its promise? ``selection_reliability`` pools the selection and report splits' examples
(every setting's per-example correctness and FLOPs), splits the pool at random ``splits`` times into parts of the
two original sizes, selects on the first part and measures the drop on the second: the share of splits whose drop
stays within ``max_drop`` and the median FLOPs speedup, per method. The model itself is not retrained (its
training saw the dev split for checkpoint and search choices), so this measures the selection's noise, not the
training's.

Other rules (``mp_model.recipe.selection_rules``) share ``select``'s contract through ``select_with``: a rule says
which settings qualify, ``select_with`` picks each method's cheapest qualifying one. ``selection_reliability``
measures any such ``Rule``.

``select_and_report`` is what ``mp eval`` and ``mp quickstart`` run: select on one split (dev), report every
setting on another (test).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from mp_model.modeling import MagicPyramidForSequenceClassification
from mp_model.recipe.checks import check_float, check_int
from mp_model.recipe.data import TextDataset, encode
from mp_model.recipe.evaluation import DEFAULT_SCALES, DEFAULT_TAUS, METHODS, SettingKey, evaluate

LATENCY_CHOICES = ("tables", "selected", "all", "none")
DEFAULT_CONFIDENCE = 0.8
RESAMPLES = 1000
ROUNDING = 1e-9  # accuracies are multiples of 1 / examples, far coarser: only float rounding is forgiven

Rule = Callable[[Sequence[dict[str, Any]], int], list[dict[str, Any]]]
"""A selection rule: ``(records of one split, seed) -> chosen records``, with ``select``'s contract."""
Qualifier = Callable[[list[dict[str, Any]], dict[str, Any]], Sequence[bool]]
"""Which of one dataset's records (the dense one given apart too) may be chosen: one bool per record."""


def within_limit(drop: Any, max_drop: float) -> Any:
    """Whether an accuracy drop from dense (a float or a tensor of them, fractions) is within ``max_drop``."""
    return drop <= max_drop + ROUNDING


def setting_key(record: dict[str, Any]) -> SettingKey:
    """``(method, tau, threshold_scale)`` of a record."""
    return record["method"], record["tau"], record["threshold_scale"]


def table_settings(chosen: Sequence[dict[str, Any]], taus: Sequence[float]) -> list[SettingKey]:
    """The settings the README tables show: the ``chosen`` (selected) ones, FastBERT-only at every tau, and MP at
    every tau at its chosen threshold scale (the paper's Table 3), without repeats."""
    keys = [setting_key(r) for r in chosen]
    keys += [("fastbert", float(t), None) for t in taus]
    keys += [("mp", float(t), r["threshold_scale"]) for r in chosen if r["method"] == "mp" for t in taus]
    return list(dict.fromkeys(keys))


def bootstrap_weights(count: int, resamples: int = RESAMPLES, seed: int = 0) -> torch.Tensor:
    """``(resamples, count)`` float32: how often each example is drawn in each bootstrap resample of ``count``."""
    check_int("count", count)
    check_int("resamples", resamples)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(count, (resamples, count), generator=generator)
    return torch.zeros(resamples, count).scatter_add_(1, draws, torch.ones(resamples, count))


def within_limit_share(
    dense: torch.Tensor, candidates: torch.Tensor, max_drop: float, weights: torch.Tensor
) -> torch.Tensor:
    """Share of bootstrap resamples in which each candidate's accuracy is at most ``max_drop`` below dense's.

    ``dense`` ``(N,)`` and ``candidates`` ``(S, N)`` per-example correctness (bool), ``weights`` from
    ``bootstrap_weights(N)``; returns ``(S,)`` float64.
    """
    count = dense.numel()
    dense_accuracy = weights @ dense.float() / count
    accuracy = weights @ candidates.float().T / count
    drop = dense_accuracy[:, None].double() - accuracy.double()
    return within_limit(drop, max_drop).double().mean(dim=0)


def check_rule(max_drop: float, confidence: float | None) -> None:
    """A ``ValueError`` naming ``max_drop`` or ``confidence`` if either is out of range (NaN included)."""
    check_float("max_drop", max_drop, 0.0)
    if confidence is not None:
        check_float("confidence", confidence, 0.0, 1.0)


def select_with(records: Sequence[dict[str, Any]], qualifies: Qualifier) -> list[dict[str, Any]]:
    """Per dataset and method, the record with the fewest GFLOPs among those ``qualifies`` accepts.

    ``qualifies(rows, dense)`` gets one dataset's records and its dense record. Ties go to the more accurate
    setting. A method with no qualifying setting contributes its most accurate record (check ``accuracy`` against
    dense's). Each is returned as a copy with ``met_rule`` added: whether the rule accepted it (False: that
    fallback). Returned in the order of ``METHODS``, per dataset.
    """
    chosen = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        rows = [r for r in records if r["dataset"] == dataset]
        dense = [r for r in rows if r["method"] == "dense"]
        if not dense:
            raise ValueError(f"{dataset}: select needs the dense record")
        accepted = list(qualifies(rows, dense[0]))
        eligible_rows = [r for r, ok in zip(rows, accepted, strict=True) if ok]
        for method in METHODS:
            candidates = [r for r in rows if r["method"] == method]
            if not candidates:
                continue
            eligible = [r for r in eligible_rows if r["method"] == method]
            if eligible:
                pick = min(eligible, key=lambda r: (r["gflops"], -r["accuracy"]))
            else:
                pick = max(candidates, key=lambda r: (r["accuracy"], -r["gflops"]))
            chosen.append(pick | {"met_rule": bool(eligible)})
    return chosen


def fallback_note(selected: Sequence[dict[str, Any]], select_split: str) -> str | None:
    """The line that says which of the ``selected`` records (``select_and_report``'s, with ``met_rule``) no
    setting of their method qualified for, so that each is its method's most accurate on ``select_split`` rather
    than a setting within the limit; None when every method had a qualifying setting."""
    missed = [r["method"] for r in selected if r.get("met_rule") is False]
    if not missed:
        return None
    return (
        f"no setting of {', '.join(missed)} met the rule on {select_split}: "
        f"{'its row shows' if len(missed) == 1 else 'their rows show'} the most accurate on {select_split}, "
        "which may be over the limit"
    )


def outcome_matrix(rows: Sequence[dict[str, Any]]) -> torch.Tensor:
    """``(S, N)`` bool: the per-example correctness of ``rows`` (a ``ValueError`` if one lacks ``outcome``)."""
    missing = [setting_key(r) for r in rows if "outcome" not in r]
    if missing:
        raise ValueError(f"this selection rule needs per-example outcomes; {missing[0]} has none")
    return torch.stack([r["outcome"]["correct"] for r in rows])


def select(
    records: Sequence[dict[str, Any]],
    max_drop: float = 0.01,
    *,
    confidence: float | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per dataset and method, the record with the fewest GFLOPs within ``max_drop`` accuracy of dense.

    ``records`` come from one split; each dataset needs its ``dense`` record. With ``confidence`` the limit must
    hold in that share of paired bootstrap resamples (records need ``outcome``: ``evaluate(keep_outcomes=True)``),
    and each candidate gets ``within_limit_share``. Ties go to the more accurate setting. A method with no setting
    within the limit contributes its most accurate record (check ``accuracy`` against dense's). Returned in the
    order of ``METHODS``.
    """
    check_rule(max_drop, confidence)

    def qualifies(rows: list[dict[str, Any]], dense: dict[str, Any]) -> list[bool]:
        if confidence is None:
            return [bool(within_limit(dense["accuracy"] - r["accuracy"], max_drop)) for r in rows]
        correct = outcome_matrix(rows)
        weights = bootstrap_weights(correct.shape[1], resamples, seed)
        shares = within_limit_share(dense["outcome"]["correct"], correct, max_drop, weights)
        for record, share in zip(rows, shares.tolist(), strict=True):
            record["within_limit_share"] = share
        return [r["within_limit_share"] >= confidence - 1e-12 for r in rows]

    return select_with(records, qualifies)


def outcome_record(dataset: str, key: SettingKey, correct: torch.Tensor, flops: torch.Tensor) -> dict[str, Any]:
    """The record of setting ``key`` on ``dataset`` from its per-example ``(N,)`` bool ``correct`` and float64
    ``flops``: ``dataset, method, tau, threshold_scale, accuracy, gflops, outcome``."""
    method, tau, scale = key
    return {
        "dataset": dataset,
        "method": method,
        "tau": tau,
        "threshold_scale": scale,
        "accuracy": float(correct.double().mean()),
        "gflops": float(flops.mean()) / 1e9,
        "outcome": {"correct": correct, "flops": flops},
    }


def _part(records: Sequence[dict[str, Any]], rows: torch.Tensor) -> list[dict[str, Any]]:
    """``records`` restricted to the pooled examples ``rows`` (accuracy, GFLOPs and outcome recomputed)."""
    return [
        outcome_record(r["dataset"], setting_key(r), r["outcome"]["correct"][rows], r["outcome"]["flops"][rows])
        for r in records
    ]


def selection_reliability(
    select_records: Sequence[dict[str, Any]],
    report_records: Sequence[dict[str, Any]],
    max_drop: float = 0.01,
    *,
    confidence: float | None = None,
    splits: int = 200,
    seed: int = 0,
    resamples: int = 200,
    rule: Rule | None = None,
) -> dict[str, dict[str, float]]:
    """Per method, how often the rule's choice stays within ``max_drop`` of dense on unseen examples (see above).

    ``select_records`` and ``report_records`` are ``evaluate(keep_outcomes=True)`` records of the same settings on
    two splits of one dataset. The rule is ``select`` at ``confidence`` (``resamples`` draws), or ``rule``, called
    with ``seed + split`` on each re-split. Returns ``{method: {"within_limit", "median_drop",
    "median_flops_speedup"}}`` over ``splits`` random re-partitions of the pooled examples.
    """
    check_rule(max_drop, confidence)
    check_int("splits", splits)
    keys = [setting_key(r) for r in select_records]
    by_key = {setting_key(r): r for r in report_records}
    if sorted(map(str, keys)) != sorted(map(str, by_key)):
        raise ValueError("selection_reliability needs the same settings on both splits")
    pooled = []
    for r in select_records:
        other = by_key[setting_key(r)]["outcome"]
        outcome = {name: torch.cat([r["outcome"][name], other[name]]) for name in ("correct", "flops")}
        pooled.append({**r, "outcome": outcome})
    first = select_records[0]["outcome"]["correct"].numel()
    total = pooled[0]["outcome"]["correct"].numel()
    dense_index = next(i for i, r in enumerate(pooled) if r["method"] == "dense")
    index = {setting_key(r): i for i, r in enumerate(pooled)}
    generator = torch.Generator().manual_seed(seed)
    results: dict[str, list[tuple[float, float]]] = {}
    for split in range(splits):
        order = torch.randperm(total, generator=generator)
        part = _part(pooled, order[:first])
        if rule is None:
            chosen = select(part, max_drop, confidence=confidence, resamples=resamples, seed=seed + split)
        else:
            chosen = rule(part, seed + split)
        held_out = _part(pooled, order[first:])
        dense = held_out[dense_index]
        for record in chosen:
            if record["method"] == "dense":
                continue
            unseen = held_out[index[setting_key(record)]]
            results.setdefault(record["method"], []).append(
                (dense["accuracy"] - unseen["accuracy"], dense["gflops"] / unseen["gflops"])
            )
    summary = {}
    for method, rows in results.items():
        drops = torch.tensor([d for d, _ in rows], dtype=torch.float64)
        speedups = torch.tensor([s for _, s in rows], dtype=torch.float64)
        summary[method] = {
            "within_limit": float(within_limit(drops, max_drop).double().mean()),
            "median_drop": float(drops.median()),
            "median_flops_speedup": float(speedups.median()),
        }
    return summary


def select_and_report(
    dense_model: MagicPyramidForSequenceClassification,
    model: MagicPyramidForSequenceClassification,
    tokenizer: Any,
    dataset: TextDataset,
    *,
    max_length: int,
    select_split: str = "dev",
    split: str = "test",
    size: int | None = None,
    max_drop: float = 0.01,
    confidence: float | None = DEFAULT_CONFIDENCE,
    methods: Sequence[str] = METHODS,
    taus: Sequence[float] = DEFAULT_TAUS,
    scales: Sequence[float] = DEFAULT_SCALES,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    latency: str = "tables",
    latency_examples: int = 256,
    latency_repeats: int = 3,
    reliability_splits: int = 0,
    rule: tuple[str, Rule] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Select each method's setting on ``select_split`` and report every setting of the sweep on ``split``.

    The rule is ``select``'s at ``max_drop`` and ``confidence``, or ``rule``, a ``(name, Rule)`` pair such as
    ``selection_rules.parse_rule`` gives (then ``confidence`` is unused).

    Both splits are cut to their first ``size`` examples (None: whole) and encoded at ``max_length``. ``latency``
    names the settings timed on ``split``: ``"tables"`` (the selected ones and the tau sweeps of ``table_settings``),
    ``"selected"``, ``"all"`` or ``"none"``. Returns ``evaluate``'s records on ``split``, each with ``selected``
    and ``selected_on`` (``select_split``) added, and the same setting's ``<select_split>_accuracy``,
    ``<select_split>_gflops`` (and ``within_limit_share`` or ``drop_bound`` where the rule set it), so that the
    choice can be checked from the records alone, and the selected ones ``met_rule`` (``select_with``); and a dict
    of the selection: its rule, and with ``reliability_splits > 0`` ``selection_reliability`` of this rule and of
    the point estimate.

    Raises:
        ValueError: for an empty split, an unknown ``latency`` or a rule out of range, before anything is computed.
    """
    if latency not in LATENCY_CHOICES:
        raise ValueError(f"latency must be one of {LATENCY_CHOICES}, got {latency!r}")
    check_rule(max_drop, confidence)
    check_int("reliability_splits", reliability_splits, 0)
    for name in dict.fromkeys((select_split, split)):
        if not dataset.split(name)[:size]:
            raise ValueError(f"{dataset.name}: the {name} split is empty, nothing to evaluate")
    common = dict(dataset=dataset.name, methods=methods, taus=taus, scales=scales, batch_size=batch_size, device=device)
    pick = encode(tokenizer, dataset.split(select_split)[:size], max_length)
    picked_records = evaluate(dense_model, model, pick, split=select_split, keep_outcomes=True, **common)
    chosen = select(picked_records, max_drop, confidence=confidence) if rule is None else rule[1](picked_records, 0)
    chosen_keys = [setting_key(r) for r in chosen]
    met_rule = {setting_key(r): r["met_rule"] for r in chosen}
    timed = {"none": None, "all": "all", "selected": chosen_keys, "tables": table_settings(chosen, taus)}[latency]
    report = encode(tokenizer, dataset.split(split)[:size], max_length)
    records = evaluate(
        dense_model,
        model,
        report,
        split=split,
        latency=timed,
        latency_examples=latency_examples,
        latency_repeats=latency_repeats,
        keep_outcomes=reliability_splits > 0,
        **common,
    )
    if rule is None:
        name = "point estimate" if confidence is None else f"paired bootstrap, {RESAMPLES} resamples, confidence"
        rules = {"point estimate": (None, None), f"confidence {confidence}": (confidence, None)}
        if confidence is None:
            rules.pop(f"confidence {confidence}")
    else:
        name, rules = rule[0], {"point estimate": (None, None)}
        if name != "point":  # the point rule is the point estimate: its re-splits would run twice
            rules[name] = (None, rule[1])
    selection: dict[str, Any] = {"max_drop": max_drop, "confidence": confidence if rule is None else None}
    selection |= {"rule": name, "on": select_split, "examples": len(pick["labels"])}
    if reliability_splits > 0:
        selection["reliability"] = {
            label: selection_reliability(
                picked_records, records, max_drop, confidence=c, splits=reliability_splits, rule=custom
            )
            for label, (c, custom) in rules.items()
        }
    on_pick = {setting_key(r): r for r in picked_records}
    for record in records:
        record.pop("outcome", None)
        key = setting_key(record)
        picked = on_pick[key]
        record["selected"] = key in chosen_keys
        record["selected_on"] = select_split
        record[f"{select_split}_accuracy"] = picked["accuracy"]
        record[f"{select_split}_gflops"] = picked["gflops"]
        if record["selected"]:
            record["met_rule"] = met_rule[key]
        for name in ("within_limit_share", "drop_bound"):  # what the rule read, so that its choice can be checked
            if name in picked:
                record[name] = picked[name]
    return records, selection
