"""The ``mp`` command: ``mp train``, ``mp eval``, ``mp predict`` (and ``mp quickstart``, from ``bench.quickstart``).

Subcommands are registered in ``COMMANDS`` (``register_command`` adds one); ``build_parser`` builds the parser
from it. ``mp quickstart ARGS`` passes ``ARGS`` untouched to ``bench.quickstart.main(argv)``, imported only then
(``bench`` sits next to ``mp_model`` in a source checkout and is not installed).

Errors. Flags, files and devices are checked before anything is computed. An error is one line on stderr,
``mp COMMAND: error: ...``, with exit code 2 (1 for an unexpected exception, 130 for an interruption), never a
traceback unless ``--debug`` is given; warnings are one line each, ``mp COMMAND: warning: ...``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import sys
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


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


def _quiet_transformers() -> None:
    from transformers import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _optional_int(text: str) -> int | None:
    """An integer >= 0, or ``all``/``none`` for no limit."""
    if text.lower() in ("all", "none"):
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'all', got {text}")
    return value


# ---------------------------------------------------------------- train


def _train_fields() -> list[tuple[dataclasses.Field, Any]]:
    from mp_model.training import TrainConfig

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
            parser.add_argument(flag, type=float, nargs="+", default=argparse.SUPPRESS, help=help_text)
        elif origin in (typing.Union, types.UnionType):
            parser.add_argument(flag, type=_optional_int, default=argparse.SUPPRESS, metavar="N|all", help=help_text)
        else:
            parser.add_argument(flag, type=hint, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument(
        "--stage",
        type=int,
        choices=[1, 2, 3, 4],
        help="run only this stage (1 fine-tune, 2 search + soft pruning, 3 hard pruning, 4 sub-classifiers); "
        "earlier stages must be done. Default: every stage not yet done",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def train_config_from_args(args: argparse.Namespace) -> Any:
    """The ``TrainConfig`` of ``mp train``'s flags.

    If the run directory holds a run, its saved configuration is the starting point and only the flags given
    override it, so ``mp train --run-dir D`` resumes ``D``.
    A run that completed no stage (a first attempt that failed) is not a starting point: the flags alone make the
    configuration, which then replaces the saved one.
    """
    from mp_model.training import CONFIG_FILE, TrainConfig, completed_stages

    given = {field.name: getattr(args, field.name) for field, _ in _train_fields() if hasattr(args, field.name)}
    directory = TrainConfig(**{k: v for k, v in given.items() if k in ("dataset", "run_dir", "model")}).directory
    saved_path = directory / CONFIG_FILE
    if saved_path.is_file() and completed_stages(directory):
        try:
            values = json.loads(saved_path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{saved_path} is unreadable ({error}): delete the run directory or fix it") from error
        values.update(given)
        return TrainConfig.from_dict(values)
    return TrainConfig(**given)


def _run_train(args: argparse.Namespace) -> int:
    from mp_model.training import train

    _quiet_transformers()
    config = train_config_from_args(args)
    state = train(config, None if args.stage is None else [args.stage], progress=not args.no_progress)
    print(f"run directory: {config.directory}")
    for number in sorted(state["stages_done"]):
        metrics = state[f"stage{number}"]
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        print(f"stage {number}: {shown}")
    return 0


# ---------------------------------------------------------------- eval


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{folder}: no usable tokenizer ({_one_line(error)})") from error


def _load_run(run_dir: Path, device: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The stage-1 and final models, the tokenizer and the saved TrainConfig values of a finished run."""
    from mp_model.training import CONFIG_FILE, DENSE_DIR, FINAL_DIR, finished_run_problem, load_model

    problem = finished_run_problem(run_dir)
    if problem is not None:
        raise ValueError(f"--run-dir {run_dir} is not a finished run ({problem}): run `mp train` first")
    dense = load_model(run_dir / DENSE_DIR, device).eval()
    final = load_model(run_dir / FINAL_DIR, device).eval()
    if dense.config.id2label != final.config.id2label:
        raise ValueError(f"{run_dir}: {DENSE_DIR} and {FINAL_DIR} have different labels")
    tokenizer = _load_tokenizer(run_dir / FINAL_DIR)
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text()) if (run_dir / CONFIG_FILE).exists() else {}
    except (OSError, ValueError) as error:
        raise ValueError(f"{run_dir / CONFIG_FILE} is unreadable ({error})") from error
    return dense, final, tokenizer, saved


def _model_labels(model: Any) -> list[str]:
    """A model's class names in id order (its ``id2label``)."""
    return [model.config.id2label.get(i, str(i)) for i in range(model.config.num_labels)]


def _check_output(option: str, output: Path | None, inputs: Sequence[Path] = ()) -> None:
    """Refuse, before any work, an output that is a folder, lies in a missing folder, or is one of ``inputs``."""
    if output is None:
        return
    if output.is_dir():
        raise ValueError(f"{option} {output} is a directory")
    if not output.parent.is_dir():
        raise ValueError(f"{option} {output}: the folder {output.parent} does not exist")
    for source in inputs:
        if output.resolve() == source.resolve() or (output.exists() and os.path.samefile(output, source)):
            raise ValueError(f"{option} {output} is the input file: refusing to overwrite it")


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, so an interruption leaves no half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _import_bench(module: str) -> types.ModuleType:
    """Import ``bench.<module>`` from the source checkout holding this package."""
    import importlib

    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module(f"bench.{module}")


def _configure_eval(parser: argparse.ArgumentParser) -> None:
    from mp_model.evaluation import DEFAULT_SCALES, DEFAULT_TAUS, METHODS

    parser.add_argument("--run-dir", default="runs/rotten_tomatoes", help="a finished `mp train` run directory")
    parser.add_argument("--dataset", help="dataset name or file (default: the run's)")
    parser.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split to report")
    parser.add_argument(
        "--select-split",
        default="dev",
        choices=["train", "dev", "test"],
        help="split on which each method's setting is selected (default dev; never select on the reported split)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="methods to sweep")
    parser.add_argument("--taus", nargs="+", type=float, default=list(DEFAULT_TAUS), help="exit thresholds tau")
    parser.add_argument(
        "--scales", nargs="+", type=float, default=list(DEFAULT_SCALES), help="threshold scales for pruning"
    )
    parser.add_argument("--max-drop", type=float, default=0.01, help="selection: largest accuracy drop from dense")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation and latency batch size")
    parser.add_argument("--max-length", type=int, help="truncation (default: the run's)")
    parser.add_argument(
        "--size", type=_optional_int, default=None, metavar="N|all", help="first N examples of each split"
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")
    parser.add_argument(
        "--latency",
        default="tables",
        choices=["tables", "selected", "all", "none"],
        help="which settings to time on the reported split: those the README tables show (default: the selected "
        "ones and the tau sweeps of FastBERT-only and of MP at its selected scale), the selected ones, every one, "
        "or none",
    )
    parser.add_argument("--latency-examples", type=int, default=256, help="examples timed (first N of the split)")
    parser.add_argument("--latency-repeats", type=int, default=3, help="timed passes (median) after one warm-up")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="write the records with provenance to this file")


def _format_table(records: Sequence[dict[str, Any]]) -> str:
    header = f"{'method':<9}{'tau':>6}{'scale':>7}{'acc':>8}{'GFLOPs':>9}{'FLOPs x':>9}{'ms/batch':>10}{'lat x':>7}"
    lines = [header]
    for r in records:
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"
        lat_x = "-" if r["latency_speedup"] is None else f"{r['latency_speedup']:.2f}"
        tau = "-" if r["tau"] is None else f"{r['tau']:g}"
        scale = "-" if r["threshold_scale"] is None else f"{r['threshold_scale']:g}"
        lines.append(
            f"{r['method']:<9}{tau:>6}{scale:>7}{r['accuracy']:>8.4f}{r['gflops']:>9.4f}"
            f"{r['flops_speedup']:>9.2f}{lat:>10}{lat_x:>7}"
        )
    return "\n".join(lines)


def _run_eval(args: argparse.Namespace) -> int:
    import torch

    from mp_model.data import check_max_length, encode, load_dataset
    from mp_model.evaluation import check_device, check_float, check_int, evaluate, select, setting_key, table_settings

    _quiet_transformers()
    check_device(args.device)
    for tau in args.taus:
        check_float("--taus", tau, 0.0, 1.0)
    for scale in args.scales:
        check_float("--scales", scale, 0.0)
    check_float("--max-drop", args.max_drop, 0.0, 1.0)
    for name in ("batch_size", "latency_examples", "latency_repeats"):
        check_int("--" + name.replace("_", "-"), getattr(args, name))
    if args.threads is not None:
        check_int("--threads", args.threads)
    if args.max_length is not None:
        check_max_length(args.max_length)
    _check_output("--json", args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.select_split == args.split:
        warnings.warn(f"selecting on the reported split ({args.split})", stacklevel=1)
    run_dir = Path(args.run_dir)
    dense, final, tokenizer, saved = _load_run(run_dir, args.device)
    labels = _model_labels(final)
    dataset = load_dataset(
        args.dataset or saved.get("dataset", "rotten_tomatoes"), seed=saved.get("seed", 0), labels=labels
    )
    max_length = args.max_length if args.max_length is not None else saved.get("max_length", 128)
    check_max_length(max_length, tokenizer, limit=final.config.max_position_embeddings)
    for split in dict.fromkeys((args.select_split, args.split)):
        if not dataset.split(split)[: args.size]:
            raise ValueError(f"{dataset.name}: the {split} split is empty, nothing to evaluate")
    common = dict(
        dataset=dataset.name,
        methods=args.methods,
        taus=args.taus,
        scales=args.scales,
        batch_size=args.batch_size,
        device=args.device,
    )
    pick = encode(tokenizer, dataset.split(args.select_split)[: args.size], max_length)
    chosen = select(evaluate(dense, final, pick, split=args.select_split, **common), args.max_drop)
    by_key = {setting_key(r): r for r in chosen}
    report = encode(tokenizer, dataset.split(args.split)[: args.size], max_length)
    records = evaluate(
        dense,
        final,
        report,
        split=args.split,
        latency={
            "none": None,
            "all": "all",
            "selected": list(by_key),
            "tables": table_settings(chosen, args.taus),
        }[args.latency],
        latency_examples=args.latency_examples,
        latency_repeats=args.latency_repeats,
        **common,
    )
    for record in records:
        picked = by_key.get(setting_key(record))
        record["selected"] = picked is not None
        record["selected_on"] = args.select_split
        if picked is not None:
            record[f"{args.select_split}_accuracy"] = picked["accuracy"]
            record[f"{args.select_split}_gflops"] = picked["gflops"]
    selected = [r for r in records if r["selected"]]
    print(f"{dataset.name} {args.split} ({len(report['labels'])} examples), settings selected on {args.select_split}:")
    print(_format_table(selected))
    if args.json:
        provenance = _import_bench("provenance")
        meta = provenance.provenance(args.device)
        meta |= {
            "run_dir": str(run_dir.resolve()),
            "train_config": saved,
            "selection": f"per method, fewest GFLOPs within {args.max_drop} accuracy of dense on {args.select_split}",
            "latency": "ms per padded batch, median of passes over the first latency_examples examples sorted by "
            "length, vs HF BertForSequenceClassification (sdpa) on the stage-1 weights",
            "latency_examples": args.latency_examples,
            "latency_repeats": args.latency_repeats,
            "batch_size": args.batch_size,
            "max_length": max_length,
        }
        path = provenance.write_results(args.json, records, meta)
        print(f"wrote {len(records)} records to {path}")
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
        help="CSV column or JSON key holding the second text of a pair, encoded as a BERT pair "
        "(default: a 'text_pair' column if the file has one)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="output file (.csv, else JSON lines; default: JSON lines on stdout); never the input",
    )
    parser.add_argument("--tau", type=float, default=0.3, help="exit threshold in [0, 1] (larger exits earlier)")
    parser.add_argument("--threshold-scale", type=float, default=1.0, help="multiplies the pruning thresholds (>= 0)")
    parser.add_argument("--no-prune", action="store_true", help="switch token pruning off")
    parser.add_argument("--no-exit", action="store_true", help="switch early exit off")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per padded batch")
    parser.add_argument(
        "--max-length",
        type=int,
        help="truncation in tokens, 2 to the model's max_position_embeddings (default: that limit)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")


def _run_predict(args: argparse.Namespace) -> int:
    from mp_model.data import check_input_file, check_max_length, read_texts
    from mp_model.evaluation import check_device, check_float, check_int, predict
    from mp_model.training import FINAL_DIR, load_model

    _quiet_transformers()
    check_float("--tau", args.tau, 0.0, 1.0)
    check_float("--threshold-scale", args.threshold_scale, 0.0)
    check_int("--batch-size", args.batch_size)
    if args.max_length is not None:
        check_max_length(args.max_length)
    check_device(args.device)
    check_input_file(args.input)
    _check_output("--output", args.output, [args.input])
    folder = args.checkpoint or Path(args.run_dir) / FINAL_DIR
    if not folder.exists():
        where = f"--checkpoint {folder}" if args.checkpoint else f"--run-dir {args.run_dir} ({FINAL_DIR}/)"
        raise ValueError(f"no model at {where}: run `mp train` first or pass --checkpoint")
    model = load_model(folder, args.device).eval()
    tokenizer = _load_tokenizer(folder)
    texts = read_texts(args.input, args.column, args.pair_column)
    rows = predict(
        model,
        tokenizer,
        texts,
        max_length=args.max_length,
        batch_size=args.batch_size,
        tau=args.tau,
        threshold_scale=args.threshold_scale,
        prune=not args.no_prune,
        early_exit=not args.no_exit,
        device=args.device,
    )
    output_format = "csv" if args.output is not None and args.output.suffix.lower() == ".csv" else "jsonl"
    buffer = io.StringIO()
    if output_format == "csv":
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        # ASCII escapes keep U+2028 and the like out of the output, so that no reader splits a row in two.
        buffer.writelines(json.dumps(row) + "\n" for row in rows)
    if args.output is None:
        sys.stdout.write(buffer.getvalue())
    else:
        _write_atomically(args.output, buffer.getvalue())
    return 0


# ---------------------------------------------------------------- quickstart


def _configure_quickstart(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="arguments passed to bench.quickstart")


def _run_quickstart(args: argparse.Namespace) -> int:
    try:
        quickstart = _import_bench("quickstart")
    except ModuleNotFoundError as error:
        raise SystemExit(f"mp quickstart needs bench/quickstart.py from a source checkout ({error})") from error
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
        _configure_eval,
        _run_eval,
    ),
)
register_command(
    "predict",
    Command(
        "label texts from a file; writes labels and exit layers as JSON lines or CSV", _configure_predict, _run_predict
    ),
)
register_command(
    "quickstart",
    Command(
        "a short end-to-end demo (bench/quickstart.py; `mp quickstart --help` shows its flags)",
        _configure_quickstart,
        _run_quickstart,
        passthrough=True,
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
