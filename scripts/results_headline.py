"""The headline numbers of the README, and the text rules every generated results page follows.

``scripts/results_tables.py`` (the command) renders with this module:

* the headline table: accuracy and FLOPs speedup of MP's setting chosen on dev, reported on test, per dataset over
  the runs of the current defaults (mean, standard deviation and range where several seeds ran), each against the
  stronger of LTP-only and FastBERT-only; one CPU latency row against ONNX Runtime and one GPU latency row against
  HF under ``torch.compile``, the strongest dense baselines measured on each device. Every cell links the results
  files it was computed from (``HEADLINE_RUNS``);
* ``public``: a generated text without paths of the machine that made a run (absolute paths are shortened to the
  part a reader can use).
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

# (row label, glob under bench/results) of the runs of today's defaults that the headline reads.
HEADLINE_RUNS = (
    ("Rotten Tomatoes", "evaluations/rotten_tomatoes-dev2000-bf16-scales-seed*-cpu.json"),
    ("BBC News", "evaluations/bbc_news-bf16-scales-seed*-cpu.json"),
    ("conventions_2012", "evaluations/conventions_2012-bf16-scales-seed*-cpu.json"),
    ("fortunes", "evaluations/fortunes-bf16-scales-seed*-cpu.json"),
)
CPU_RUN = "e2e/e2e-cpu-ort.json"
GPU_RUN = "e2e/e2e-h200-bf16.json"
LATENCY_MODEL = "minilm"
BASELINES = {"ltp": "LTP only", "fastbert": "FastBERT only"}
LABELS = {"mp": "MP", "graph_mp": "MP (GPU engine)"}
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|root|tmp|home|Users|usr|opt|mnt|var|scratch|data)(?:/[\w.+@-]+)*")
REPO_FOLDERS = ("bench", "scripts", "mp_model", "mp_kernels", "tests", "runs", "mp_results")


def _short(match: re.Match[str]) -> str:
    """The usable part of one absolute path: from a repository folder on, after ``site-packages``, a program's name,
    else the path without its first component."""
    parts = match.group(0).strip("/").split("/")
    if "site-packages" in parts:
        return "<site-packages>/" + "/".join(parts[parts.index("site-packages") + 1 :])
    for index, part in enumerate(parts):
        if part in REPO_FOLDERS:
            return "/".join(parts[index:])
    if len(parts) > 1 and parts[-2] == "bin":
        return parts[-1]
    return "/".join(parts[1:]) or parts[0]


def public(text: str) -> str:
    """``text`` with every absolute path of a development machine shortened (``/work/runs/x`` -> ``runs/x``)."""
    return MACHINE_PATH.sub(_short, text)


def unrecorded_flags(train_config: dict[str, Any]) -> list[str]:
    """The ``mp train`` flags a recorded ``TrainConfig`` lacks: the run was made before they existed, with whatever
    the code of the time did, which today's defaults need not reproduce."""
    from mp_model.recipe.train_config import TrainConfig

    return ["--" + key.replace("_", "-") for key in TrainConfig().to_dict() if key not in train_config]


def _load(path: Path) -> dict[str, Any]:
    payload = json.loads(path.read_text())
    if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
        raise ValueError(f"{path.name}: not a results file (no records)")
    return payload


def _spread(values: list[float], unit: str = "x") -> str:
    """``mean`` for one value; ``mean ± sd (lowest to highest)`` for several; speedups as ``2.50x``, accuracy changes
    signed, in points."""
    sign, suffix, tail = ("", unit, "") if unit == "x" else ("+" if unit == "points" else "", "", unit and f" {unit}")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:{sign}.2f}{suffix}{tail}"
    spread = f"{statistics.stdev(values):.2f}"
    return f"{mean:{sign}.2f}{suffix} ± {spread} ({min(values):{sign}.2f} to {max(values):{sign}.2f}){tail}"


def _links(paths: list[Path], root: Path, base: str) -> str:
    """Markdown links to ``paths`` (relative to ``root``, prefixed by ``base``); seeds as ``seed N``."""
    links = []
    for path in paths:
        seed = re.search(r"seed(\d+)", path.stem)
        label = f"seed {seed.group(1)}" if seed and len(paths) > 1 else path.name
        links.append(f"[{label}]({base}{path.relative_to(root).as_posix()})")
    return ", ".join(links)


def reference_note(metas: list[dict[str, Any]], dense: list[float]) -> str:
    """``; minus its plain fine-tune: -0.08 points`` (a spread over several runs; ``(2 of 3 runs)`` where not all
    have one): dense (``dense``, test accuracy in percent, one per run) minus the run's plain fine-tune (``mp
    reference``) on test, over the runs whose ``mp eval`` file (``metas``: provenances) carries one; empty where none
    does."""
    differences = [
        value - 100 * meta["reference"]["accuracy"]
        for meta, value in zip(metas, dense, strict=True)
        if (meta.get("reference") or {}).get("split") == "test"
    ]
    if not differences:
        return ""
    share = "" if len(differences) == len(dense) else f" ({len(differences)} of {len(dense)} runs)"
    return f"; minus its plain fine-tune: {_spread(differences, 'points')}{share}"


def accuracy_row(label: str, paths: list[Path], root: Path, base: str) -> list[str]:
    """One headline row: MP's dev choice on test against dense and the stronger baseline, over ``paths``."""
    from mp_model.recipe.selection import within_limit

    chosen = []
    for path in paths:
        payload = _load(path)
        chosen.append(({r["method"]: r for r in payload["records"] if r.get("selected")}, payload["provenance"]))
    dense = [100 * c["dense"]["accuracy"] for c, _ in chosen]
    speedups = {m: [c[m]["flops_speedup"] for c, _ in chosen] for m in ("mp", *BASELINES)}
    changes = {m: [100 * (c[m]["accuracy"] - c["dense"]["accuracy"]) for c, _ in chosen] for m in ("mp", *BASELINES)}
    limit = sum(
        within_limit(-change / 100, meta.get("max_drop", 0.01))
        for change, (_, meta) in zip(changes["mp"], chosen, strict=True)
    )
    strongest = max(BASELINES, key=lambda m: statistics.fmean(speedups[m]))
    dense_cell = _spread(dense, "") + reference_note([meta for _, meta in chosen], dense)
    if len(paths) > 1:
        within = f"within 1 point of dense in {limit} of {len(paths)}"
    else:
        within = "within 1 point of dense" if limit else "more than 1 point below dense"
    return [
        f"{label}: FLOPs speedup and test accuracy at the setting chosen on dev",
        f"{len(paths)} seeds" if len(paths) > 1 else "1 run",
        dense_cell,
        f"{_spread(speedups['mp'])} fewer FLOPs, {_spread(changes['mp'], 'points')}; {within}",
        f"{BASELINES[strongest]}: {_spread(speedups[strongest])}, {_spread(changes[strongest], 'points')}",
        _links(paths, root, base),
    ]


def _range(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}x" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}x"


def latency_row(path: Path, root: Path, base: str, baseline: str, key: str, method: str) -> list[str]:
    """One headline row: ``method``'s measured speed over ``baseline`` (record field ``key``) for MiniLM, per batch
    size as a range over the length buckets (1 thread where the run sweeps threads)."""
    payload = _load(path)
    meta = payload["provenance"]
    records = [
        r
        for r in payload["records"]
        if r["method"] == method and r["model"] == LATENCY_MODEL and r.get("threads") in (None, 1)
    ]
    if not records:
        raise ValueError(f"{path.name}: no {method} records of {LATENCY_MODEL} at 1 thread")
    by_batch: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        by_batch.setdefault(record["batch_size"], []).append(record)
    cells = [
        f"batch {batch}: {_range([r[key] for r in cell])} ({len(cell)} buckets)"
        for batch, cell in sorted(by_batch.items())
    ]
    faster = sum(r[key] > 1 for r in records)
    kind = "GPU" if meta.get("device_type") == "cuda" else "CPU"
    threads = ", 1 thread" if kind == "CPU" else ""
    flops = _range([r["flops_speedup"] for r in records])
    return [
        f"{kind} latency, MiniLM in {meta.get('dtype', '?')}{threads} on {meta.get('device', '?')}: "
        f"{LABELS[method]}'s speed over {baseline}",
        f"1 run, {len(records)} cells",
        "-",
        "; ".join(cells) + f"; faster in {faster} of {len(records)} cells (FLOPs {flops} fewer)",
        f"{baseline}: 1.00x",
        _links([path], root, base),
    ]


def headline_table(root: Path, base: str) -> str:
    """The headline table over the results under ``root``, its links prefixed by ``base``."""
    header = ["measurement", "runs", "dense accuracy", "Magic Pyramid", "strongest baseline", "results files"]
    rows = []
    for label, pattern in HEADLINE_RUNS:
        paths = sorted(root.glob(pattern))
        if not paths:
            raise ValueError(f"no results file matches {pattern} under {root.name}")
        rows.append(accuracy_row(label, paths, root, base))
    rows.append(latency_row(root / CPU_RUN, root, base, "ONNX Runtime", "speedup_vs_ort", "mp"))
    rows.append(latency_row(root / GPU_RUN, root, base, "HF compiled", "speedup_vs_compiled", "graph_mp"))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def provenance_lines(root: Path) -> list[str]:
    """One line per results file behind the headline: its path, commit, date, device and training flags it lacks."""
    paths = [path for _, pattern in HEADLINE_RUNS for path in sorted(root.glob(pattern))]
    lines = []
    for path in paths + [root / CPU_RUN, root / GPU_RUN]:
        meta = _load(path)["provenance"]
        name = path.relative_to(root).as_posix()
        commit, date = str(meta.get("git_commit", "unknown"))[:10], str(meta.get("date", "?"))[:10]
        line = f"- [`{name}`]({name}): commit {commit}, {date}, {meta.get('device', '?')}"
        missing = unrecorded_flags(meta["train_config"]) if meta.get("train_config") else []
        if missing:
            line += "; trained before " + ", ".join(f"`{flag}`" for flag in missing) + " existed"
        if meta.get("schedule_source"):
            line += f"; untrained models replaying a fixed schedule ({meta['schedule_source']})"
        lines.append(line)
    return lines


def headline_page(root: Path) -> str:
    """``bench/results/HEADLINE.md``: the headline table and the run behind every number in it."""
    lines = [
        "# Headline results",
        "",
        "Generated by `python scripts/results_tables.py --write` from the results files it links; the README shows "
        "the same table. Accuracy rows: each method's fewest-GFLOPs setting within 1 point of dense on dev (by the "
        "rule each results file names: `mp eval`'s default, the drop plus one standard error, or before it a paired "
        "bootstrap at confidence 0.8), reported on test; mean ± standard deviation (lowest to highest) over seeds "
        "where several ran; the dense cell adds dense minus the run's plain fine-tune (`mp reference`) on test "
        "where the files carry one. Latency rows: median latency ratios in one run, ranges over the length buckets.",
        "",
        headline_table(root, ""),
        "",
        "## Runs behind each number",
        "",
        *provenance_lines(root),
    ]
    return public("\n".join(lines)) + "\n"
