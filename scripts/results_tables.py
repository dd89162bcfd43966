"""Markdown results tables for the README, generated from the committed JSON under ``bench/results/``.

Reads every ``*.json`` there (``{"provenance": ..., "records": [...]}``) and renders:

* end-to-end files (``bench.e2e``, ``provenance.benchmark == "e2e"``): per model, length bucket, batch size (and
  thread count, when the file sweeps them), HF sdpa's median latency and each method's speedup over it, measured
  and in FLOPs (dense FLOPs of the unpadded inputs over the method's), side by side; where the ONNX Runtime
  baseline ran (method ``ort``), a second table of each method's measured speedup over ORT next to its FLOPs
  speedup;
* evaluation files (``mp eval --json``, records with ``accuracy`` and ``selected``): per dataset, each method's
  selected setting with accuracy, GFLOPs, FLOPs and latency speedups and the FLOPs speedup per length bucket
  (the paper's Table 2), then accuracy and FLOPs speedup over the ``tau`` sweep for FastBERT-only and for MP at
  its selected threshold scale (the paper's Table 3), under the ``mp train`` and ``mp eval`` commands that made
  them.

and, apart from them, a summary of every evaluation file, a row each: dense accuracy and GFLOPs, each method's
setting chosen on dev as it lands on test (accuracy, drop from dense, FLOPs speedup), and MP's setting chosen on
test itself. Other results files are listed by name only. Usage::

    python scripts/results_tables.py                    # print the markdown
    python scripts/results_tables.py --update README.md # replace the text between each pair of markers
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
SUMMARY_BEGIN = "<!-- summary:begin -->"
SUMMARY_END = "<!-- summary:end -->"
E2E_METHODS = ("hf_eager", "dense", "ltp", "fastbert", "mp")
ORT_METHODS = ("dense", "ltp", "fastbert", "mp")
GRAPH_METHODS = ("graph_dense", "graph_ltp", "graph_fastbert", "graph_mp")
EVAL_METHODS = ("dense", "ltp", "fastbert", "mp")
LABELS = {
    "hf_eager": "HF eager",
    "hf_sdpa": "HF sdpa",
    "dense": "dense (packed)",
    "ltp": "LTP only",
    "fastbert": "FastBERT only",
    "mp": "MP",
    "graph_dense": "dense (GPU engine)",
    "graph_ltp": "LTP only (GPU engine)",
    "graph_fastbert": "FastBERT only (GPU engine)",
    "graph_mp": "MP (GPU engine)",
}
BUCKET_ORDER = {"short": 0, "middle": 1, "long": 2, "mixed": 3}


def _speedup(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _source(path: Path, meta: dict[str, Any]) -> str:
    """One line naming the file, device, commit and date of a results file."""
    commit = str(meta.get("git_commit", "unknown"))[:10]
    dirty = " (uncommitted changes)" if meta.get("git_dirty") else ""
    return (
        f"`{path.name}`: {meta.get('device', '?')}, torch {meta.get('torch', '?')}, commit {commit}{dirty}, "
        f"{meta.get('date', '?')}"
    )


def _cells(records: list[dict[str, Any]]) -> list[tuple[tuple[str, str, int, int | None], dict[str, dict[str, Any]]]]:
    """Records grouped per (model, bucket, batch size, threads), sorted by model, batch size, threads and bucket."""
    cells: dict[tuple[str, str, int, int | None], dict[str, dict[str, Any]]] = {}
    for record in records:
        key = (record["model"], record["bucket"], record["batch_size"], record.get("threads"))
        cells.setdefault(key, {})[record["method"]] = record
    return sorted(
        cells.items(), key=lambda item: (item[0][0], item[0][2], item[0][3] or 0, BUCKET_ORDER.get(item[0][1], 9))
    )


def e2e_table(path: Path, payload: dict[str, Any]) -> str:
    """The markdown of one ``bench.e2e`` results file (and its ONNX Runtime table when ``ort`` ran)."""
    meta = payload["provenance"]
    records = payload["records"]
    lines = [
        f"#### End to end, {meta.get('device_type', '?')} {meta.get('dtype', '')}",
        "",
        _source(path, meta) + ".",
        "Each cell: speedup over HF BERT with sdpa attention on the padded batch, measured / in FLOPs.",
    ]
    if meta.get("schedule_source"):
        lines.append(f"Schedule replayed on untrained models: {meta['schedule_source']}.")
    for name, model in meta.get("models", {}).items():
        lines.append(f"`{name}`: {model.get('path')} ({model.get('layers')} layers, {model.get('mode')}).")
    cells = _cells(records)
    threads = len({key[3] for key, _ in cells}) > 1
    header = ["model", "bucket", "batch"] + (["threads"] if threads else []) + ["HF sdpa ms"]
    header += [LABELS[m] for m in E2E_METHODS]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, bucket, batch, count), methods in cells:
        baseline = methods.get("hf_sdpa")
        row = [model, bucket, str(batch)] + ([str(count)] if threads else [])
        row.append(f"{baseline['median_ms']:.1f}" if baseline else "-")
        for method in E2E_METHODS:
            record = methods.get(method)
            if record is None:
                row.append("-")
            elif method == "hf_eager":
                row.append(_speedup(record.get("latency_speedup")))
            else:
                row.append(f"{_speedup(record.get('latency_speedup'))} / {_speedup(record['flops_speedup'])}")
        lines.append("| " + " | ".join(row) + " |")
    if any(r["method"] == "ort" for r in records):
        lines += ["", ort_table(cells)]
    if any(r["method"] == "hf_compiled" for r in records):
        lines += ["", compiled_table(cells)]
    return "\n".join(lines)


def compiled_table(cells: list[tuple[tuple[str, str, int, int | None], dict[str, dict[str, Any]]]]) -> str:
    """Speedups over the compiled HF baseline (``speedup_vs_compiled``) of the GPU engine's methods present, per
    cell that ran ``hf_compiled``."""
    present = [m for m in GRAPH_METHODS if any(m in methods for _, methods in cells)]
    lines = [
        "Against HF compiled (`torch.compile` of the same HF model, one graph per batch size and padded width; "
        "the strongest dense baseline on a GPU): its speedup over HF sdpa, then each GPU-engine method's measured "
        "speedup over it / its FLOPs speedup; cells the run's time limit left out are absent.",
        "",
    ]
    header = ["model", "bucket", "batch", "compiled ms", "compiled vs HF sdpa"] + [LABELS[m] for m in present]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, bucket, batch, _threads), methods in cells:
        compiled = methods.get("hf_compiled")
        if compiled is None:
            continue
        row = [model, bucket, str(batch), f"{compiled['median_ms']:.2f}", _speedup(compiled.get("latency_speedup"))]
        for method in present:
            record = methods.get(method)
            row.append(
                "-"
                if record is None
                else f"{_speedup(record.get('speedup_vs_compiled'))} / {_speedup(record['flops_speedup'])}"
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def ort_table(cells: list[tuple[tuple[str, str, int, int | None], dict[str, dict[str, Any]]]]) -> str:
    """Speedups over ONNX Runtime (``speedup_vs_ort``) of the packed methods, per cell that ran ``ort``."""
    lines = [
        "Against ONNX Runtime (HF model exported to ONNX, ORT transformer optimizer, same threads; "
        "`bench/e2e_ort.py`): ORT's speedup over HF sdpa, then each method's measured speedup over ORT / its FLOPs "
        "speedup; last column: MP's measured speedup over ORT divided by its FLOPs speedup.",
        "",
    ]
    header = ["model", "bucket", "batch", "threads", "ORT ms", "ORT vs HF sdpa"]
    header += [LABELS[m] for m in ORT_METHODS] + ["MP measured / FLOPs"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, bucket, batch, threads), methods in cells:
        ort = methods.get("ort")
        if ort is None:
            continue
        row = [model, bucket, str(batch), str(threads or "-"), f"{ort['median_ms']:.1f}"]
        row.append(_speedup(ort.get("latency_speedup")))
        for method in ORT_METHODS:
            record = methods.get(method)
            cell = "-" if record is None else f"{_speedup(record.get('speedup_vs_ort'))} / "
            row.append(cell if record is None else cell + _speedup(record["flops_speedup"]))
        mp = methods.get("mp")
        ratio = None if mp is None or mp.get("speedup_vs_ort") is None else mp["speedup_vs_ort"] / mp["flops_speedup"]
        row.append("-" if ratio is None else f"{ratio:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def unrecorded_flags(train_config: dict[str, Any]) -> list[str]:
    """The ``mp train`` flags a recorded ``TrainConfig`` lacks: the run was made before they existed, with whatever
    the code of the time did, which today's defaults need not reproduce."""
    from mp_model.recipe.train_config import TrainConfig

    return ["--" + key.replace("_", "-") for key in TrainConfig().to_dict() if key not in train_config]


def train_command(train_config: dict[str, Any]) -> str:
    """The ``mp train`` command of a recorded ``TrainConfig`` (fields at their defaults left out)."""
    from mp_model.recipe.train_config import TrainConfig

    defaults = TrainConfig().to_dict()
    parts = ["mp train"]
    for key, value in train_config.items():
        if key == "device" or value == defaults.get(key):
            continue
        flag = "--" + key.replace("_", "-")
        if value is None:
            parts.append(f"{flag} all")
        elif isinstance(value, list):
            parts.append(f"{flag} " + " ".join(f"{v:g}" for v in value))
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def _eval_command(meta: dict[str, Any]) -> str:
    """The recorded evaluation command, as a user types it (``mp eval ...``)."""
    command = str(meta.get("command", "?"))
    marker = " eval "
    return "mp eval " + command.split(marker, 1)[1] if marker in command else command


def tau_table(records: list[dict[str, Any]]) -> list[str]:
    """Markdown rows of accuracy, FLOPs and latency speedups over the tau sweep (FastBERT; MP at its selected
    scale); ``-`` where a setting was not timed."""
    chosen = {r["method"]: r for r in records if r.get("selected")}
    if "mp" not in chosen and "fastbert" not in chosen:
        return []
    scale = chosen["mp"]["threshold_scale"] if "mp" in chosen else None
    rows: dict[float, dict[str, dict[str, Any]]] = {}
    for r in records:
        if r["method"] == "fastbert" or (r["method"] == "mp" and r["threshold_scale"] == scale):
            rows.setdefault(r["tau"], {})[r["method"]] = r
    header = ["tau", "FastBERT only: accuracy", "x FLOPs", "x latency"]
    header += [f"MP (scale {scale:g}): accuracy", "x FLOPs", "x latency"]
    lines = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for tau in sorted(rows):
        row = [f"{tau:g}"]
        for method in ("fastbert", "mp"):
            r = rows[tau].get(method)
            if r is None:
                row += ["-", "-", "-"]
            else:
                row += [f"{100 * r['accuracy']:.2f}", _speedup(r["flops_speedup"]), _speedup(r.get("latency_speedup"))]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def on_reported_split(records: list[dict[str, Any]], max_drop: float) -> str:
    """One line: each method's fewest-GFLOPs setting within ``max_drop`` of dense read on the reported split
    itself, as the paper's Table 2 selects (the table above selects on dev, a held-out choice)."""
    from mp_model.recipe.selection import select

    if not any(r["method"] == "dense" for r in records):
        return ""
    parts = []
    for r in select(records, max_drop):
        if r["method"] == "dense":
            continue
        knobs = ", ".join(
            f"{name} {value:g}" for name, value in (("tau", r["tau"]), ("scale", r["threshold_scale"])) if value
        )
        parts.append(f"{LABELS[r['method']]} {_speedup(r['flops_speedup'])} at {100 * r['accuracy']:.2f} ({knobs})")
    split = records[0].get("split", "reported")
    return f"Selected on the {split} split itself, as the paper's Table 2 does: " + "; ".join(parts) + "."


def _rule(selection: str) -> str:
    """A short name of an ``mp eval`` selection rule: ``dev, 0.8`` for a paired-bootstrap confidence, else ``dev``."""
    confidence = re.search(r"confidence ([0-9.]+)", selection)
    return f"dev, {confidence.group(1)}" if confidence else "dev"


def _choice(record: dict[str, Any] | None, dense: dict[str, Any], max_drop: float) -> str:
    """``accuracy (change in points), speedup``, marked ``†`` where the drop exceeds ``max_drop``."""
    from mp_model.recipe.selection import within_limit

    if record is None:
        return "-"
    change = record["accuracy"] - dense["accuracy"]
    mark = "" if within_limit(-change, max_drop) else " †"
    return f"{100 * record['accuracy']:.2f} ({100 * change:+.2f}), {_speedup(record['flops_speedup'])}{mark}"


def summary_table(files: list[tuple[Path, dict[str, Any]]]) -> str:
    """One row per evaluation file (a dataset each): dense accuracy / GFLOPs on the reported split, each method's
    setting as chosen by the file's rule, and MP's fewest-GFLOPs setting within the limit on the reported split
    itself (the paper's reading)."""
    from mp_model.recipe.selection import select

    header = ["run", "dataset", "chosen on", "dense", "LTP only", "FastBERT only", "MP", "MP, chosen on test"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path, payload in files:
        meta = payload["provenance"]
        max_drop = meta.get("max_drop", 0.01)
        chosen = {r["method"]: r for r in payload["records"] if r.get("selected")}
        dense = chosen["dense"]
        on_test = {r["method"]: r for r in select(payload["records"], max_drop)}
        row = [f"`{path.stem}`", dense["dataset"], _rule(meta.get("selection", ""))]
        row.append(f"{100 * dense['accuracy']:.2f} / {dense['gflops']:.3f}")
        row += [_choice(chosen.get(method), dense, max_drop) for method in ("ltp", "fastbert", "mp")]
        row.append(_choice(on_test.get("mp"), dense, max_drop))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Each cell: accuracy on the reported split (points from dense), FLOPs speedup; † more than "
        '1 point below dense. "chosen on": dev at a paired-bootstrap confidence of 0.8, or dev by the point '
        "estimate (older runs).",
    ]
    return "\n".join(lines)


def details(meta: dict[str, Any]) -> list[str]:
    """Lines on the run's plain fine-tune reference and on how often each selection rule stays within the limit on
    re-split held-out examples (``mp eval``'s ``reference`` and ``selection_details``), where the file has them."""
    lines = []
    reference = meta.get("reference")
    if reference:
        grid = reference.get("lrs") or [reference["lr"]]
        lines += [
            "",
            f"Plain fine-tune reference ({reference['model_class']}, same examples and epochs, best of lr "
            f"{', '.join(f'{lr:g}' for lr in grid)} and epoch on dev: lr {reference['lr']:g}, epoch "
            f"{reference['epoch']}): "
            f"{100 * reference['accuracy']:.2f} on the {reference['split']} split.",
        ]
    reliability = (meta.get("selection_details") or {}).get("reliability")
    if reliability:
        lines += [
            "",
            "How often the selected setting stays within the limit on unseen examples (dev and test pooled, "
            "re-split at random; median FLOPs speedup in brackets):",
            "",
        ]
        methods = [m for m in EVAL_METHODS if any(m in rule for rule in reliability.values())]
        lines += ["| rule | " + " | ".join(LABELS[m] for m in methods) + " |", "|" + "---|" * (len(methods) + 1)]
        for rule, values in reliability.items():
            cells = [
                f"{100 * values[m]['within_limit']:.0f}% ({values[m]['median_flops_speedup']:.2f}x)"
                if m in values
                else "-"
                for m in methods
            ]
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    return lines


def eval_table(path: Path, payload: dict[str, Any]) -> str:
    """The markdown of one evaluation results file (selected settings only)."""
    meta = payload["provenance"]
    records = [r for r in payload["records"] if r.get("selected")]
    lines = [f"#### Accuracy and speedup, {path.stem}", "", _source(path, meta) + "."]
    if meta.get("selection"):
        lines.append(f"Selection: {meta['selection']}.")
    split = records[0].get("split", "?") if records else "?"
    lines.append(f"Reported on the {split} split ({records[0].get('examples', '?') if records else '?'} examples).")
    if meta.get("train_config"):
        lines += ["", f"Train: `{train_command(meta['train_config'])}`"]
        missing = unrecorded_flags(meta["train_config"])
        if missing:
            lines[-1] += (
                f" (recorded before {', '.join(f'`{flag}`' for flag in missing)} existed: today's default need not be "
                "what ran; bench/NOTES.md says what did)"
            )
    lines += ["", f"Evaluate: `{_eval_command(meta)}`"]
    header = ["dataset", "method", "tau", "scale", "accuracy", "GFLOPs", "x FLOPs", "x latency"]
    header += ["x FLOPs short", "x FLOPs middle", "x FLOPs long"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {m: i for i, m in enumerate(EVAL_METHODS)}
    for record in sorted(records, key=lambda r: (r["dataset"], order.get(r["method"], 9))):
        buckets = record.get("buckets", {})
        row = [
            record["dataset"],
            LABELS.get(record["method"], record["method"]),
            "-" if record["tau"] is None else f"{record['tau']:g}",
            "-" if record["threshold_scale"] is None else f"{record['threshold_scale']:g}",
            f"{100 * record['accuracy']:.2f}",
            f"{record['gflops']:.3f}",
            _speedup(record["flops_speedup"]),
            _speedup(record.get("latency_speedup")),
        ]
        row += [_speedup(buckets[b]["flops_speedup"]) if b in buckets else "-" for b in ("short", "middle", "long")]
        lines.append("| " + " | ".join(row) + " |")
    lines += details(meta)
    paper_style = on_reported_split(payload["records"], meta.get("max_drop", 0.01))
    if paper_style:
        lines += ["", paper_style]
    tau_rows = tau_table(payload["records"])
    if tau_rows:
        lines += ["", f"Speedup over the tau sweep, {path.stem} (the paper's Table 3):"] + tau_rows
    return "\n".join(lines)


def _payloads(results_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every results file under ``results_dir`` with a list of records, sorted by name."""
    files = []
    for path in sorted(results_dir.glob("*.json")):
        payload = json.loads(path.read_text())
        if isinstance(payload, dict) and isinstance(payload.get("records"), list):
            files.append((path, payload))
    return files


def _is_eval(payload: dict[str, Any]) -> bool:
    records = payload["records"]
    return bool(records) and all("accuracy" in r and "selected" in r for r in records)


def render(results_dir: Path) -> str:
    """The markdown of every results file under ``results_dir``."""
    sections = []
    others = []
    for path, payload in _payloads(results_dir):
        if payload.get("provenance", {}).get("benchmark") == "e2e":
            sections.append(e2e_table(path, payload))
        elif _is_eval(payload):
            sections.append(eval_table(path, payload))
        else:
            others.append(f"`{path.name}`")
    if others:
        sections.append("Other results files (see bench/README.md): " + ", ".join(others) + ".")
    if not sections:
        return f"No results files under {results_dir}."
    return "\n\n".join(sections)


def render_summary(results_dir: Path) -> str:
    """The summary table of every evaluation file under ``results_dir``, by dataset then name."""
    files = [(path, payload) for path, payload in _payloads(results_dir) if _is_eval(payload)]
    files.sort(key=lambda item: (item[1]["records"][0]["dataset"], item[0].name))
    return summary_table(files) if files else f"No evaluation files under {results_dir}."


def update(readme: Path, sections: dict[tuple[str, str], str]) -> None:
    """Replace the text between each ``(begin, end)`` marker pair in ``readme`` with its markdown."""
    text = readme.read_text()
    for (begin, end), markdown in sections.items():
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise SystemExit(f"{readme}: no {begin} ... {end} markers (in that order)")
        text = text[: start + len(begin)] + "\n" + markdown + "\n" + text[stop:]
    readme.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--update", type=Path, default=None, help="file whose marked section to replace")
    args = parser.parse_args(argv)
    sections = {(SUMMARY_BEGIN, SUMMARY_END): render_summary(args.results), (BEGIN, END): render(args.results)}
    if args.update is None:
        print("\n\n".join(sections.values()))
    else:
        update(args.update, sections)
        print(f"updated {args.update}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
