"""``mp serve``: the model behind HTTP, with text-embeddings-inference's (TEI) ``/predict`` and token-budget batching.

Built on FastAPI over uvicorn (``pip install 'magic-pyramid[serve]'``): FastAPI gives the OpenAPI description
(``/openapi.json``, ``/docs``) from the request model, and the same app can be mounted by Ray Serve's
``serve.ingress``; uvicorn drains on SIGTERM (it stops accepting, finishes the requests in flight, then runs the
app's shutdown, where the batcher finishes its queue). This module holds the command (its flags, the model's
loading, warm-up on CPU and CUDA); ``serve_app`` the HTTP application; ``serve_batching`` the queue and the model's
worker thread; ``serve_worker`` the model's own process (``--model-worker process``, the default);
``serve_metrics`` the Prometheus metrics; ``serve_ray`` the same application as ``--replicas`` copies
on Ray Serve.

Endpoints: ``POST /predict`` (TEI's shapes: ``inputs`` is one text, a ``[text, text_pair]`` pair (a list of exactly
two texts, as TEI reads it), or a list of texts and pairs (a one-element list is a single text, so
``[["a"], ["b"]]`` is two texts); the answer is ``[{"label", "score"}, ...]`` sorted by score, or one such list per
input of a list; ``raw_scores`` gives logits instead of probabilities; ``truncate``; extensions ``tau`` and
``threshold_scale``), ``GET /info``, ``GET /health`` and ``GET /metrics``. Status codes as TEI's: 413 for a body over
``--max-body-bytes``, more inputs than ``--max-client-batch-size`` or a text over the model's length without
``truncate``; 422 for a body that is not UTF-8 or JSON, a wrong type, an empty list or text, a knob out of range;
424 when the model fails on a batch (only its requests); 429 beyond ``--max-concurrent-requests``; 503 while shutting
down. Errors are ``{"error": "<one line>", "error_type": "..."}``. Answers carry ``x-mp-exit-layers`` (each
text's exit layer) and ``x-inference-time`` (milliseconds from arrival to answer).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mp_model.recipe.serve_batching import Classifier

INSTALL_HINT = "mp serve needs FastAPI and uvicorn: pip install 'magic-pyramid[serve]'"


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    """The server's limits and default knobs (``mp serve``'s flags)."""

    max_batch_tokens: int = 8192
    max_batch_requests: int = 64
    max_wait_ms: float = 0.0
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 32
    max_body_bytes: int = 2_000_000
    tau: float = 0.3
    threshold_scale: float = 1.0
    model_id: str = ""


FLAG_HELP = {
    "max_batch_tokens": "padded tokens (texts x longest) a batch (default: %(default)s)",
    "max_batch_requests": "texts a batch (default: %(default)s)",
    "max_wait_ms": "longest wait of a text for its batch to fill (default: %(default)s: a batch takes what waits "
    "while the previous one runs; a wait pays where batching gains much, on a GPU)",
    "max_concurrent_requests": "requests in flight; 429 beyond (default: %(default)s)",
    "max_client_batch_size": "texts a request; 413 beyond (default: %(default)s)",
    "max_body_bytes": "bytes a request body; 413 beyond (default: %(default)s)",
    "threshold_scale": "pruning scale (>= 0) of requests without one (default: %(default)s)",
}


def configure_serve(parser: argparse.ArgumentParser) -> None:
    """``mp serve``'s flags."""
    defaults = ServeOptions()
    parser.add_argument("--run-dir", default="runs/rotten_tomatoes", help="a finished `mp train` run directory")
    parser.add_argument("--checkpoint", type=Path, help="a saved model folder instead of the run's final model")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: %(default)s)")
    parser.add_argument("--tau", type=float, default=None, help="exit threshold in [0, 1] of requests without one "
                        "(default: the model's config.exit_tau, as the model and mp predict)")  # fmt: skip
    for field in dataclasses.fields(ServeOptions):
        if field.name in FLAG_HELP:
            flag = "--" + field.name.replace("_", "-")
            kind = type(getattr(defaults, field.name))
            parser.add_argument(flag, type=kind, default=getattr(defaults, field.name), help=FLAG_HELP[field.name])
    parser.add_argument("--max-length", type=int, help="tokens a text (default: the model's limit)")
    parser.add_argument("--dense-hf", action="store_true", help="serve the dense HF twin (a baseline)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--model-worker", choices=("process", "thread"), default="process",
                        help="run the model in a process of its own, away from the event loop's interpreter lock, "
                        "or in a thread of the server's; a --replicas replica runs it in a thread of its Ray actor "
                        "(default: %(default)s)")  # fmt: skip
    replicas = "copies of the model on Ray Serve ([ray] extra), on a local Ray or the cluster at RAY_ADDRESS"
    parser.add_argument("--replicas", type=int, help=f"{replicas} (default: one process, no Ray)")
    parser.add_argument("--cpus-per-replica", type=float, help="CPUs Ray reserves for each replica (default: 1)")
    gpus = "GPUs Ray reserves for each replica (default: 1 with --device cuda, else 0)"
    parser.add_argument("--gpus-per-replica", type=float, help=gpus)


def require_serve() -> None:
    """A ``ValueError`` saying how to install FastAPI and uvicorn if either is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ValueError(INSTALL_HINT) from error


def check_flags(args: argparse.Namespace) -> Path:
    """Check ``mp serve``'s flags (a ``ValueError`` naming the first wrong one) and return the model's folder."""
    from mp_model.recipe.checks import check_float, check_int
    from mp_model.recipe.runs import FINAL_DIR

    for name in (*FLAG_HELP, "port"):
        if name not in ("max_wait_ms", "threshold_scale"):
            check_int("--" + name.replace("_", "-"), getattr(args, name))
    check_float("--max-wait-ms", args.max_wait_ms, 0.0)
    if args.tau is not None:
        check_float("--tau", args.tau, 0.0, 1.0)
    check_float("--threshold-scale", args.threshold_scale, 0.0)
    if args.replicas is None:
        for flag in ("cpus_per_replica", "gpus_per_replica"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --replicas")
    folder = args.checkpoint or Path(args.run_dir) / FINAL_DIR
    if not folder.exists():
        where = f"--checkpoint {folder}" if args.checkpoint else f"--run-dir {args.run_dir} ({FINAL_DIR}/)"
        raise ValueError(f"no model at {where}: run `mp train` first or pass --checkpoint")
    return folder


def load_classifier(args: argparse.Namespace, folder: Path) -> tuple[Classifier, ServeOptions]:
    """The ``Classifier`` of the model in ``folder`` on ``--device``, warmed up (on CUDA with the GPU engine's
    graphs captured), and the server's options: what one server process, or one Ray Serve replica, serves."""
    from mp_model.recipe.checks import check_device
    from mp_model.recipe.cli_support import quiet_transformers, use_threads
    from mp_model.recipe.data import check_max_length
    from mp_model.recipe.runs import load_checked_with_tokenizer
    from mp_model.recipe.serve_batching import Classifier, Knobs
    from mp_model.recipe.stream import bound_native_caches

    device = check_device(args.device)
    bound_native_caches()
    quiet_transformers()
    use_threads(args.threads)
    model, tokenizer, _ = load_checked_with_tokenizer(folder, device)
    model.eval()
    limit = model.config.max_position_embeddings
    max_length = check_max_length(limit if args.max_length is None else args.max_length, tokenizer, limit=limit)
    classifier = Classifier(model, tokenizer, device=device, max_length=max_length, dense=args.dense_hf)
    tau = model.config.exit_tau if args.tau is None else args.tau
    options = ServeOptions(**{name: getattr(args, name) for name in FLAG_HELP}, tau=tau, model_id=str(folder))
    classifier.warm_up(Knobs(options.tau, options.threshold_scale))
    if device.type == "cuda" and not args.dense_hf:
        sizes = [1 << k for k in range(options.max_batch_requests.bit_length()) if 1 << k <= options.max_batch_requests]
        knobs = model.resolve_knobs(threshold_scale=options.threshold_scale)
        model.graph_engine.warm_up(sizes, max_length, knobs)
    return classifier, options


def run_serve(args: argparse.Namespace) -> int:
    """``mp serve``: check the flags, load the model, and serve until SIGTERM or Ctrl-C (both drain first: no new
    connection is accepted, and every request already accepted is answered). Returns 0 after a SIGTERM. With
    ``--replicas``, ``mp_model.recipe.serve_ray`` serves the same application on Ray Serve instead."""
    require_serve()
    folder = check_flags(args)
    if args.replicas is not None:
        from mp_model.recipe.serve_ray import serve_replicas

        return serve_replicas(args, folder)
    import signal

    import uvicorn

    from mp_model.recipe.serve_app import create_app

    if args.model_worker == "process":
        from mp_model.recipe.runs import load_tokenizer
        from mp_model.recipe.serve_worker import ModelProcess

        settings = {name: value for name, value in vars(args).items() if name != "handler"}
        model = ModelProcess(settings, folder, load_tokenizer(folder))
        app = create_app(model, model.options)
    else:
        app = create_app(*load_classifier(args, folder))
    print(f"mp serve: {folder} on http://{args.host}:{args.port} (docs at /docs)", flush=True)
    # uvicorn drains on SIGTERM, then raises it again with the handler found at its start: this one, so the
    # command ends with 0 after a graceful shutdown.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
