"""Markdown results tables, generated from the committed JSON under ``bench/results/``.

Reads every ``*.json`` of a folder (``{"provenance": ..., "records": [...]}``) and renders:

* end-to-end files (``bench.e2e``, ``provenance.benchmark == "e2e"``): latency and FLOPs speedups against HF and
  the strongest baselines (``scripts/results_e2e.py``);
* evaluation files (``mp eval --json``, records with ``accuracy`` and ``selected``): per dataset, each method's
  selected setting with accuracy, GFLOPs, FLOPs and latency speedups and the FLOPs speedup per length bucket
  (the paper's Table 2), then accuracy and FLOPs speedup over the ``tau`` sweep for FastBERT-only and for MP at
  its selected threshold scale (the paper's Table 3), under the ``mp train`` and ``mp eval`` commands that made
  them.

and, apart from them, a summary of every evaluation file, a row each: dense accuracy and GFLOPs, each method's
setting chosen on dev as it lands on test (accuracy, drop from dense, FLOPs speedup), and MP's setting chosen on
test itself. Other results files are listed by name only. ``--write`` regenerates the pages a reader opens:
``bench/results/README.md`` (every folder's tables, the archive's summary), ``bench/results/HEADLINE.md`` and the
README's headline table (``scripts/results_headline.py``), with no path of the machine that made a run. Usage::

    python scripts/results_tables.py                    # print the markdown of the top-level JSON files of --results
    python scripts/results_tables.py --write            # regenerate the pages; --check: fail naming stale ones
    python scripts/results_tables.py --update FILE      # replace the text between each pair of markers in FILE
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def _sibling(name: str) -> ModuleType:
    """The module ``scripts/<name>.py`` (scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


headline = _sibling("results_headline")
e2e = _sibling("results_e2e")
LABELS, e2e_table, _source, _speedup = e2e.LABELS, e2e.e2e_table, e2e._source, e2e._speedup
unrecorded_flags = headline.unrecorded_flags
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS = REPO_ROOT / "bench" / "results"
HEADLINE_BEGIN = "<!-- headline:begin -->"
HEADLINE_END = "<!-- headline:end -->"
FOLDERS = {
    "evaluations": "`mp eval --json` runs of today's recipe (its defaults and the alternatives compared with them) "
    "and their plain fine-tune references (`bench.reference_report`)",
    "e2e": "end-to-end timings: inference against the HF and ONNX Runtime baselines (`bench.e2e`), bulk labelling "
    "(`bench.bench_bulk`), a training step (`bench.bench_train_step`), the host work of a call "
    "(`bench.host_overhead`)",
    "kernels": "kernel microbenchmarks (`bench.bench_attention`, `bench.bench_compaction`, `bench.gpu_gemm`)",
    "sweeps": "stage-4 sweeps over the exit loss and the threshold scales of its inputs (`bench.exit_loss_sweep`)",
    "gpu": "GPU window summaries (`bench.gpu_suite`), one folder per window",
    "plots": "figures (`bench.plots`)",
    "archive": "superseded runs, in the same folders",
}
ARCHIVE_RULE = (
    "A run moves to `archive/` once a later run replaces it. Evaluations: a run trained under a recipe that a later "
    "default replaced (fp32 training, which covers the older lr and epoch defaults, pruning stages trained on the "
    "labels, stage 4 on mixed labels or by reverse KL, the teacher runs, the 340-article BBC News dev split, and "
    "`bbc_news-all-cpu` with its plain fine-tune `bbc_news-reference-cpu`, replaced by three seeds of today's "
    "defaults), or "
    "whose stage 4 was retrained on three threshold scales in a later file of the same models "
    "(`rotten_tomatoes-dev2000-bf16-seed{0,1,2}` by `...-bf16-scales-seed{0,1,2}`), or whose setting was chosen "
    "by a selection rule that a later default replaced (paired bootstrap at confidence 0.8, replaced by the normal "
    "bound k=1 in #42: `rotten_tomatoes-dev2000-bf16-scales-seed{0..5}` and `conventions_2012-bf16-scales-seed{0,1,"
    "2}`; the same models, evaluated again where their runs were at hand). End to end: a run on the same "
    "device from an older commit whose cells a later full run re-measured; `(bert-base, mixed, 32)`, "
    "`(minilm, long, 32)` and `(minilm, mixed, 32)` exist only in the archived runs of commit a77389c."
)
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
SUMMARY_BEGIN = "<!-- summary:begin -->"
SUMMARY_END = "<!-- summary:end -->"
EVAL_METHODS = ("dense", "ltp", "fastbert", "mp")


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
    """A short name of an ``mp eval`` selection rule: ``dev, 0.8`` for a paired-bootstrap confidence, ``dev, normal
    k=1`` for a normal bound, else ``dev``."""
    confidence = re.search(r"confidence ([0-9.]+)|bootstrap ([0-9.]+)", selection)
    if confidence:
        return f"dev, {confidence.group(1) or confidence.group(2)}"
    bound = re.search(r"normal k=[0-9.]+", selection)
    return f"dev, {bound.group(0)}" if bound else "dev"


def missed_rule(record: dict[str, Any], max_drop: float) -> bool:
    """Whether a selected record is its method's fallback, no setting having met the file's rule on dev: its
    ``met_rule``, or for files written before that field, a normal bound (``drop_bound``) over ``max_drop``."""
    from mp_model.recipe.selection import within_limit

    if "met_rule" in record:
        return not record["met_rule"]
    return "drop_bound" in record and not within_limit(record["drop_bound"], max_drop)


def _choice(record: dict[str, Any] | None, dense: dict[str, Any], max_drop: float, selected: bool = True) -> str:
    """``accuracy (change in points), speedup``, marked ``†`` where the drop exceeds ``max_drop`` and, for a
    ``selected`` record, ``‡`` where no setting of its method met the rule (``missed_rule``)."""
    from mp_model.recipe.selection import within_limit

    if record is None:
        return "-"
    change = record["accuracy"] - dense["accuracy"]
    mark = "" if within_limit(-change, max_drop) else " †"
    mark += " ‡" if selected and missed_rule(record, max_drop) else ""
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
        row.append(_choice(on_test.get("mp"), dense, max_drop, selected=False))
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Each cell: accuracy on the reported split (points from dense), FLOPs speedup; † more than "
        "1 point below dense; ‡ no setting of the method met the rule on dev, so the cell is its most accurate "
        "(files that record the rule's numbers). "
        '"chosen on": dev by the drop plus one standard error (normal k=1, the default of `mp eval`), at a '
        "paired-bootstrap confidence of 0.8 (the default before), or by the point estimate (older runs).",
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
        return f"No results files under {results_dir.name}/."
    return "\n\n".join(sections)


def render_summary(results_dir: Path) -> str:
    """The summary table of every evaluation file under ``results_dir``, by dataset then name."""
    files = [(path, payload) for path, payload in _payloads(results_dir) if _is_eval(payload)]
    files.sort(key=lambda item: (item[1]["records"][0]["dataset"], item[0].name))
    return summary_table(files) if files else f"No evaluation files under {results_dir.name}/."


def _files(folder: Path, base: str) -> str:
    """Links to every file under ``folder`` (recursively), relative to ``base``'s folder."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    return ", ".join(f"[`{p.relative_to(folder).as_posix()}`]({base}{p.relative_to(folder).as_posix()})" for p in paths)


def results_page(root: Path) -> str:
    """``bench/results/README.md``: the folders, the archive rule, each folder's tables, the archive's summary."""
    lines = [
        "# Results",
        "",
        "Generated by `python scripts/results_tables.py --write` from the JSON files in these folders (rerun it; never "
        "edit results by hand). The numbers the README shows, and the run behind each: [HEADLINE.md](HEADLINE.md).",
        "",
        "| folder | what |",
        "|---|---|",
        *(f"| `{name}/` | {what} |" for name, what in FOLDERS.items()),
        "",
        ARCHIVE_RULE,
        "",
        "## Evaluations",
        "",
        render_summary(root / "evaluations"),
        "",
        render(root / "evaluations"),
        "",
        "## End to end",
        "",
        render(root / "e2e"),
    ]
    for name, title in (("kernels", "Kernels"), ("sweeps", "Sweeps"), ("gpu", "GPU windows"), ("plots", "Plots")):
        if (root / name).is_dir():
            lines += ["", f"## {title}", "", f"`{name}/`: " + _files(root / name, f"{name}/") + "."]
    lines += ["", "## Archive", "", render_summary(root / "archive" / "evaluations"), ""]
    lines += [
        "Per-run tables of the archived evaluations: `python scripts/results_tables.py --results "
        "bench/results/archive/evaluations`. Files: " + _files(root / "archive", "archive/") + "."
    ]
    return headline.public("\n".join(lines)) + "\n"


def replaced(text: str, sections: dict[tuple[str, str], str], name: str) -> str:
    """``text`` with the text between each ``(begin, end)`` marker pair replaced by its markdown."""
    for (begin, end), markdown in sections.items():
        start, stop = text.find(begin), text.find(end)
        if start < 0 or stop < start:
            raise SystemExit(f"{name}: no {begin} ... {end} markers (in that order)")
        text = text[: start + len(begin)] + "\n" + markdown + "\n" + text[stop:]
    return text


def update(readme: Path, sections: dict[tuple[str, str], str]) -> None:
    """Replace the text between each ``(begin, end)`` marker pair in ``readme`` with its markdown."""
    readme.write_text(replaced(readme.read_text(), sections, readme.name))


def pages(root: Path, readme: Path) -> dict[Path, str]:
    """Every generated page and its text: the results README, the headline file, the README with its headline."""
    table = headline.public(headline.headline_table(root, root.relative_to(readme.parent).as_posix() + "/"))
    return {
        root / "README.md": results_page(root),
        root / "HEADLINE.md": headline.headline_page(root),
        readme: replaced(readme.read_text(), {(HEADLINE_BEGIN, HEADLINE_END): table}, readme.name),
    }


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--update", type=Path, default=None, help="file whose marked section to replace")
    parser.add_argument("--write", action="store_true", help="regenerate the results pages and the README headline")
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated page is out of date")
    args = parser.parse_args(argv)
    if args.write or args.check:
        generated = pages(args.results, REPO_ROOT / "README.md")
        stale = [path for path, text in generated.items() if not path.exists() or path.read_text() != text]
        if args.check:
            for path in stale:
                print(f"{path.relative_to(REPO_ROOT)} is out of date: run python scripts/results_tables.py --write")
            return 1 if stale else 0
        for path in stale:
            path.write_text(generated[path])
            print(f"wrote {path.relative_to(REPO_ROOT)}", file=sys.stderr)
        return 0
    sections = {(SUMMARY_BEGIN, SUMMARY_END): render_summary(args.results), (BEGIN, END): render(args.results)}
    if args.update is None:
        print(headline.public("\n\n".join(sections.values())))
    else:
        update(args.update, {key: headline.public(text) for key, text in sections.items()})
        print(f"updated {args.update}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
