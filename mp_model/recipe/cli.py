"""The ``mp`` command: ``mp train``, ``mp eval``, ``mp reference``, ``mp predict`` and ``mp quickstart``.

Subcommands are registered in ``COMMANDS`` (``register_command`` adds one); ``build_parser`` builds the parser
from it. ``mp quickstart ARGS`` passes ``ARGS`` untouched to ``mp_model.recipe.quickstart.main(argv)``.

Errors. Flags, files and devices are checked before anything is computed. An error is one line on stderr,
``mp COMMAND: error: ...``, with exit code 2 (1 for an unexpected exception, 130 for an interruption), never a
traceback unless ``--debug`` is given; warnings are one line each, ``mp COMMAND: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mp_model.recipe.cli_support import (
    add_threads_flag,
    check_output,
    optional_int,
    quiet_transformers,
    threshold_scale,
    use_threads,
)
from mp_model.recipe.eval_command import configure_eval, run_eval
from mp_model.recipe.serve import configure_serve, run_serve


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, a function adding its flags, and its handler (returns the exit code).

    A ``passthrough`` command parses nothing itself: its handler gets every argument after its name as
    ``args.argv`` (its own ``--help`` included).
    """

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    passthrough: bool = False


COMMANDS: dict[str, Command] = {}


def register_command(name: str, command: Command) -> None:
    """Add (or replace) subcommand ``name``."""
    COMMANDS[name] = command


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (exit code 2)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------- train


def _train_fields() -> list[tuple[dataclasses.Field, Any]]:
    from mp_model.recipe.train_config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainConfig)]


def _configure_train(parser: argparse.ArgumentParser) -> None:
    for field, hint in _train_fields():
        flag = "--" + field.name.replace("_", "-")
        shown = "" if field.default is dataclasses.MISSING else f" (default: {field.default})"
        if isinstance(field.default, tuple):
            shown = f" (default: {' '.join(map(str, field.default))})"
        help_text = field.metadata["help"] + shown
        origin = typing.get_origin(hint)
        if origin is tuple:
            scales = type(None) in typing.get_args(typing.get_args(hint)[0])  # tuple[float | None, ...]
            parse = threshold_scale if scales else float
            parser.add_argument(flag, type=parse, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif origin in (typing.Union, types.UnionType):
            parser.add_argument(flag, type=optional_int, default=argparse.SUPPRESS, metavar="N|all", help=help_text)
        else:
            parser.add_argument(flag, type=hint, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument(
        "--stage",
        type=int,
        choices=[1, 2, 3, 4],
        help="run only this stage (1 fine-tune, 2 search + soft pruning, 3 hard pruning, 4 sub-classifiers); "
        "earlier stages must be done. Default: every stage not yet done",
    )
    add_threads_flag(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def train_config_from_args(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of ``mp train``'s flags.

    If the run directory holds a run (a completed stage, or a checkpoint of an interrupted one), its saved
    configuration is the starting point and only the flags given override it, so ``mp train --run-dir D`` resumes
    ``D``. A run with neither (a first attempt that failed before its first checkpoint) is not a starting point:
    the flags alone make the configuration, which then replaces the saved one.
    """
    from mp_model.recipe.runs import CHECKPOINT_FILE, PARTIAL_DIR, completed_stages, saved_config
    from mp_model.recipe.train_config import TrainConfig

    given = {field.name: getattr(args, field.name) for field, _ in _train_fields() if hasattr(args, field.name)}
    directory = TrainConfig(**{k: v for k, v in given.items() if k in ("dataset", "run_dir", "model")}).directory
    if completed_stages(directory) or (directory / PARTIAL_DIR / CHECKPOINT_FILE).is_file():
        try:
            values = saved_config(directory)
        except ValueError as error:
            raise ValueError(f"{error}: delete the run directory or fix it") from error
        return TrainConfig.from_dict(values | given)
    return TrainConfig(**given)


def _run_train(args: argparse.Namespace) -> int:
    from mp_model.recipe.training import train

    quiet_transformers()
    config = train_config_from_args(args)
    use_threads(args.threads)
    state = train(config, None if args.stage is None else [args.stage], progress=not args.no_progress)
    print(f"run directory: {config.directory}")
    for number in sorted(state["stages_done"]):
        metrics = state[f"stage{number}"]
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"stage {number}: {shown}")
    return 0


# ---------------------------------------------------------------- predict


def _configure_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input",
        type=Path,
        help="texts: .txt (one per line), .csv/.tsv or .jsonl (see --column); one output row per input record, "
        "in order, with its index and line; a blank line or empty text gets a row with label null",
    )
    parser.add_argument("--run-dir", default="runs/rotten_tomatoes", help="a finished `mp train` run directory")
    parser.add_argument("--checkpoint", type=Path, help="a saved model folder instead of the run's final model")
    parser.add_argument("--column", default="text", help="CSV column or JSON key holding the text")
    parser.add_argument(
        "--pair-column",
        help="CSV column or JSON key holding the second text of a pair, encoded as a BERT pair, which every record "
        "must then have (default: a 'text_pair' column or key where the file has one)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="output file (.csv, else JSON lines; default: JSON lines on stdout); never the input; written window "
        "by window, in input order",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run's --output")
    parser.add_argument(
        "--tau", type=float, help="exit threshold in [0, 1] (larger exits earlier; default: the model's exit_tau)"
    )
    parser.add_argument("--threshold-scale", type=float, default=1.0, help="multiplies the pruning thresholds (>= 0)")
    parser.add_argument("--no-prune", action="store_true", help="switch token pruning off")
    parser.add_argument("--no-exit", action="store_true", help="switch early exit off")
    parser.add_argument("--window", type=int, default=4096, help="records read, sorted by length and labelled at once")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=8192, help="padded tokens per batch (texts x longest length)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="most texts per batch")
    parser.add_argument(
        "--max-length",
        type=int,
        help="truncation in tokens, 2 to the model's max_position_embeddings (default: that limit)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda (in-process engine)")
    parser.add_argument(
        "--engine",
        default="inprocess",
        choices=["inprocess", "ray"],
        help="inprocess: this process; ray: a pool of Ray Data actors (pip install 'magic-pyramid[ray]')",
    )
    parser.add_argument("--workers", type=int, default=1, help="Ray engine: actors, each holding the model")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="Ray engine: GPUs per actor")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_predict(args: argparse.Namespace) -> int:
    from mp_model.recipe.bulk import require_ray
    from mp_model.recipe.checks import check_device, check_float, check_int
    from mp_model.recipe.data import check_max_length
    from mp_model.recipe.files import check_input_file
    from mp_model.recipe.locks import exclusive_lock
    from mp_model.recipe.runs import FINAL_DIR
    from mp_model.recipe.stream import bound_native_caches

    bound_native_caches()
    quiet_transformers()
    if args.tau is not None:
        check_float("--tau", args.tau, 0.0, 1.0)
    check_float("--threshold-scale", args.threshold_scale, 0.0)
    for name in ("batch_size", "window", "max_batch_tokens", "workers"):
        check_int("--" + name.replace("_", "-"), getattr(args, name))
    check_float("--gpus-per-worker", args.gpus_per_worker, 0.0)
    if args.max_length is not None:
        check_max_length(args.max_length)
    check_device(args.device)
    if args.engine == "ray":
        require_ray()
    check_input_file(args.input)
    check_output("--output", args.output, [args.input])
    if args.resume and args.output is None:
        raise ValueError("--resume needs --output")
    folder = args.checkpoint or Path(args.run_dir) / FINAL_DIR
    if not folder.exists():
        where = f"--checkpoint {folder}" if args.checkpoint else f"--run-dir {args.run_dir} ({FINAL_DIR}/)"
        raise ValueError(f"no model at {where}: run `mp train` first or pass --checkpoint")
    with contextlib.ExitStack() as stack:
        if args.output is not None:
            stack.enter_context(exclusive_lock(args.output, f"--output {args.output}"))
        _predict_locked(args, folder)
    return 0


def _predict_locked(args: argparse.Namespace, folder: Path) -> None:
    """``mp predict`` once its flags are checked and its output locked: load, label, write with provenance."""
    from mp_model.recipe.bulk import RayLabeller
    from mp_model.recipe.files import open_texts
    from mp_model.recipe.predict import predict, row_fields, window_labeller
    from mp_model.recipe.runs import load_checked_with_tokenizer
    from mp_model.recipe.stream import file_identity, stream_predict

    model, tokenizer, identity = load_checked_with_tokenizer(folder, args.device)
    model.eval()
    texts = open_texts(args.input, args.column, args.pair_column)
    tau = model.config.exit_tau if args.tau is None else args.tau
    max_length = model.config.max_position_embeddings if args.max_length is None else args.max_length
    knobs = {"tau": tau, "threshold_scale": args.threshold_scale, "max_length": max_length}
    knobs |= {"prune": not args.no_prune, "early_exit": not args.no_exit}
    predict(model, tokenizer, [], pairs=texts.pairs, batch_size=args.batch_size, device=args.device, **knobs)  # checks
    recorded = knobs | {"column": args.column, "pair_column": args.pair_column}
    provenance = {"model": identity, "knobs": recorded, "input": file_identity(args.input)}
    window = args.window
    if args.engine == "ray":
        knobs |= {"batch_tokens": args.max_batch_tokens, "gpus_per_worker": args.gpus_per_worker}
        expect = {key: identity[key] for key in ("config_sha256", "weights_sha256", "tokenizer_sha256")}
        label = RayLabeller(
            folder, pairs=texts.pairs, block_size=args.window, workers=args.workers, expect=expect, **knobs
        )
        window = args.window * max(16, 4 * args.workers)  # one Ray dataset (and actor pool) per chunk of windows
    else:
        knobs |= {"batch_size": args.batch_size, "batch_tokens": args.max_batch_tokens, "device": args.device}
        label = window_labeller(model, tokenizer, pairs=texts.pairs, **knobs)
    fields = row_fields(texts.pairs)
    options = {"window": window, "resume": args.resume, "progress": not args.no_progress}
    stream_predict(label, texts, args.output, fields, provenance=provenance, **options)


# ---------------------------------------------------------------- reference


def _configure_reference(parser: argparse.ArgumentParser) -> None:
    """``mp reference``'s flags."""
    parser.add_argument("--run-dir", type=Path, required=True, help="a run directory holding train_config.json")
    parser.add_argument("--lrs", type=float, nargs="+", help="learning rates to try (default: the run's lr)")
    add_threads_flag(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _run_reference(args: argparse.Namespace) -> int:
    from mp_model.recipe.reference import run_reference

    quiet_transformers()
    return run_reference(args)


# ---------------------------------------------------------------- quickstart


def _configure_quickstart(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="arguments passed to mp_model.recipe.quickstart")


def _run_quickstart(args: argparse.Namespace) -> int:
    from mp_model.recipe import quickstart

    return int(quickstart.main(args.argv) or 0)


register_command(
    "train",
    Command(
        "train the four stages (fine-tune, soft pruning after a small search, hard pruning, sub-classifiers)",
        _configure_train,
        _run_train,
    ),
)
register_command(
    "eval",
    Command(
        "accuracy, GFLOPs and latency of dense, LTP, FastBERT and MP over tau and threshold-scale sweeps",
        configure_eval,
        run_eval,
    ),
)
register_command(
    "reference",
    Command(
        "fine-tune plain HF BertForSequenceClassification with a run's data and budget (the dense reference "
        "`mp eval` reports)",
        _configure_reference,
        _run_reference,
    ),
)
register_command(
    "predict",
    Command(
        "label texts from a file; writes labels and exit layers as JSON lines or CSV", _configure_predict, _run_predict
    ),
)
register_command(
    "serve",
    Command(
        "serve the model over HTTP (TEI's /predict, token-budget batching, /metrics); needs the [serve] extra",
        configure_serve,
        run_serve,
    ),
)
register_command(
    "quickstart",
    Command(
        "train, evaluate and plot in one short run (`mp quickstart --help` shows its flags)",
        _configure_quickstart,
        _run_quickstart,
        passthrough=True,
    ),
)


# ---------------------------------------------------------------- export


def _configure_export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="a saved Magic Pyramid model folder (a run's stage4_exits)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (new or empty)")


def _run_export(args: argparse.Namespace) -> int:
    from mp_model.export import to_bert

    quiet_transformers()
    out = to_bert(args.checkpoint, args.out)
    print(f"wrote {out}: BertForSequenceClassification with the tokenizer, loads without mp_model (dense model)")
    return 0


register_command(
    "export",
    Command(
        "write a saved model's dense weights as a plain BertForSequenceClassification checkpoint (no pruning or "
        "early exit; loads with transformers alone)",
        _configure_export,
        _run_export,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``mp`` parser with one subparser per entry of ``COMMANDS``."""
    parser = _Parser(
        prog="mp",
        description="Magic Pyramid: BERT classifiers with learned token pruning and early exit. "
        "Defaults train and evaluate the embedded all-MiniLM-L6-v2 on rotten_tomatoes on the CPU.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(
            name,
            help=command.help,
            description=command.help,
            add_help=not command.passthrough,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter
            if name in ("eval", "predict")
            else argparse.HelpFormatter,
        )
        command.configure(sub)
        if not command.passthrough:
            sub.add_argument("--debug", action="store_true", help="on an error, show the full Python traceback")
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mp`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None and command.passthrough:
        return command.handler(argparse.Namespace(command=argv[0], argv=argv[1:]))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed as one line
        return exit_.code if isinstance(exit_.code, int) else 2
    prefix = f"mp {args.command}"

    def show_warning(message: Warning | str, category: type[Warning], *_rest: object, **_kwargs: object) -> None:
        print(f"{prefix}: warning: {_one_line(message)}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show_warning
        try:
            return args.handler(args)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted (mp train resumes when rerun)", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - every failure becomes one line; --debug shows the traceback
            if args.debug:
                traceback.print_exc()
            expected = isinstance(error, ValueError | OSError)
            shown = _one_line(error) if expected else f"{type(error).__name__}: {_one_line(error)}"
            hint = "" if args.debug else " (--debug shows the traceback)"
            print(f"{prefix}: error: {shown}{'' if expected else hint}", file=sys.stderr)
            return 2 if expected else 1


if __name__ == "__main__":
    sys.exit(main())
