"""``mp serve --replicas N``: the same application as ``mp serve``, as a Ray Serve deployment of ``N`` replicas.

Each replica is a Ray actor that loads the model once (``serve.load_classifier``: device, warm-up and, on CUDA, the
GPU engine's graphs) and builds ``serve_app.create_app`` on it, with its own batcher: the deployment is
``serve.ingress(builder)``, where ``builder`` runs on the replica (Ray Serve >= 2.47). Ray reserves
``ray_actor_options`` of ``--cpus-per-replica`` CPUs and ``--gpus-per-replica`` GPUs for each. Ray Serve's HTTP
proxy listens on ``--host:--port`` (on every node of a cluster) and hands each request to the less loaded of two
replicas; the ASGI app answers it, so shapes, status codes and headers are those of ``mp serve``.

Limits are per replica: ``--max-concurrent-requests`` bounds each replica's requests in flight, and Ray lets up to
twice as many through to a replica (``max_ongoing_requests``), so that requests beyond the limit get the app's 429
at once instead of waiting in Ray's queue. ``/info``, ``/health`` and ``/metrics`` describe the replica that
answered; Ray Serve's own metrics cover the deployment.

Without ``RAY_ADDRESS`` the command starts a new local Ray instance (``ray.init("local")``, no dashboard), which
ends with it; with ``RAY_ADDRESS`` it deploys the application ``mp-serve`` on that cluster and deletes it on exit.
On a cluster, every node needs magic-pyramid installed and the model folder at the same path. SIGTERM or Ctrl-C
stops the replicas gracefully (Ray Serve waits for their requests in flight), then the command returns 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

APP_NAME = "mp-serve"
RAY_HINT = "mp serve --replicas needs Ray Serve (ray[serve] >= 2.47): pip install 'magic-pyramid[ray]'"


def require_ray_serve() -> None:
    """A ``ValueError`` saying how to install Ray Serve if it is missing or older than 2.47 (builder ingress)."""
    try:
        import ray
        import ray.serve  # noqa: F401
    except ImportError as error:
        raise ValueError(RAY_HINT) from error
    if tuple(int(part) for part in ray.__version__.split(".")[:2]) < (2, 47):
        raise ValueError(f"{RAY_HINT} (found ray {ray.__version__})")


def replica_resources(args: argparse.Namespace) -> dict[str, float]:
    """``ray_actor_options`` of one replica: ``--cpus-per-replica`` (default 1) and ``--gpus-per-replica`` (default 1
    with ``--device cuda``, else 0); a ``ValueError`` for a count out of range or a device the GPUs do not fit."""
    from mp_model.recipe.checks import check_float, check_int

    check_int("--replicas", args.replicas)
    cuda = str(args.device).startswith("cuda")
    cpus = check_float("--cpus-per-replica", 1.0 if args.cpus_per_replica is None else args.cpus_per_replica, 0.0)
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else float(cuda)
    gpus = check_float("--gpus-per-replica", gpus, 0.0)
    if cuda and str(args.device) not in ("cuda", "cuda:0"):
        raise ValueError(f"--device {args.device}: with --replicas use --device cuda (Ray gives each replica its GPUs)")
    if cuda and gpus == 0:
        raise ValueError("--device cuda needs --gpus-per-replica > 0 (Ray hides the GPUs from replicas without one)")
    if not cuda and gpus > 0:
        raise ValueError(f"--gpus-per-replica {gpus:g} needs --device cuda (the replicas would not use the GPUs)")
    return {"num_cpus": cpus, "num_gpus": gpus}


def build_deployment(args: argparse.Namespace, folder: Path, resources: dict[str, float]) -> Any:
    """The bound Ray Serve application: ``--replicas`` replicas, each running ``mp serve``'s app on its own model."""
    from ray import serve

    settings = {name: value for name, value in vars(args).items() if name != "handler"}

    def build_app() -> Any:
        """Runs on each replica: load the model and build the app around it."""
        from mp_model.recipe.serve import load_classifier
        from mp_model.recipe.serve_app import create_app

        return create_app(*load_classifier(argparse.Namespace(**settings), folder))

    deployment = serve.deployment(
        serve.ingress(build_app)(),
        name=APP_NAME,
        num_replicas=args.replicas,
        ray_actor_options=resources,
        max_ongoing_requests=2 * args.max_concurrent_requests,
    )
    return deployment.bind()


def check_room(args: argparse.Namespace, resources: dict[str, float]) -> None:
    """A ``ValueError`` if the local Ray instance lacks the CPUs or GPUs of the replicas (Ray would wait forever)."""
    import ray

    have = ray.cluster_resources()
    for name, per_replica in (("CPU", resources["num_cpus"]), ("GPU", resources["num_gpus"])):
        need, present = per_replica * args.replicas, have.get(name, 0.0)
        if need > present:
            raise ValueError(
                f"--replicas {args.replicas} x --{name.lower()}s-per-replica {per_replica:g} need {need:g} {name}s, "
                f"this machine has {present:g}: lower either, or start a cluster and set RAY_ADDRESS"
            )


def wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def run_application(args: argparse.Namespace, folder: Path, resources: dict[str, float], where: str) -> None:
    """Deploy the replicas on the running Ray Serve, announce the address, serve until SIGTERM or Ctrl-C, then delete
    the application (Ray Serve lets each replica answer its requests in flight, then stops it)."""
    from ray import serve

    quiet = {"log_level": "WARNING", "enable_access_log": False}
    try:
        serve.run(build_deployment(args, folder, resources), name=APP_NAME, route_prefix="/", logging_config=quiet)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raise ValueError(f"Ray Serve could not start the replicas: {lines[-1] if lines else error}") from error
    try:
        url = f"http://{args.host}:{args.port}"
        print(f"mp serve: {folder}, {args.replicas} replicas on {where}, on {url} (docs at /docs)", flush=True)
        wait_for_signal()
    finally:
        serve.delete(APP_NAME)


def serve_replicas(args: argparse.Namespace, folder: Path) -> int:
    """``mp serve --replicas``: start (or join, with ``RAY_ADDRESS``) Ray, deploy the replicas, serve HTTP on
    ``--host:--port`` until SIGTERM or Ctrl-C, then stop the replicas gracefully. Returns 0."""
    resources = replica_resources(args)
    require_ray_serve()
    import ray
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address, logging_level=logging.WARNING)
    else:
        ray.init("local", include_dashboard=False, logging_level=logging.WARNING)
    try:
        if not address:
            check_room(args, resources)
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
        run_application(args, folder, resources, f"the Ray cluster at {address}" if address else "a local Ray instance")
    finally:
        ray.shutdown()
    return 0
