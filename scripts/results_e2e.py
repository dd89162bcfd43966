"""Markdown tables of one ``bench.e2e`` results file (end-to-end latency), for ``scripts/results_tables.py``.

Per model, length bucket, batch size (and thread count, when the file sweeps them): HF sdpa's median latency and
each method's speedup over it, measured and in FLOPs (dense FLOPs of the unpadded inputs over the method's), side by
side; where the ONNX Runtime baseline ran (method ``ort``), each packed method's measured speedup over ORT next to its
FLOPs speedup; where HF under ``torch.compile`` ran (``hf_compiled``), the GPU engine's speedups over it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

E2E_METHODS = ("hf_eager", "dense", "ltp", "fastbert", "mp")
ORT_METHODS = ("dense", "ltp", "fastbert", "mp")
GRAPH_METHODS = ("graph_dense", "graph_ltp", "graph_fastbert", "graph_mp")
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
