"""The ``mp`` command: ``mp train``, ``mp eval``, ``mp predict`` (and ``mp quickstart``, from ``bench.quickstart``).

Subcommands are registered in ``COMMANDS`` (``register_command`` adds one); ``build_parser`` builds the parser
from it. ``mp quickstart ARGS`` passes ``ARGS`` untouched to ``bench.quickstart.main(argv)``, imported only then
(``bench`` sits next to ``mp_model`` in a source checkout and is not installed).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import types
import typing
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
    """
    from mp_model.training import CONFIG_FILE, TrainConfig

    given = {field.name: getattr(args, field.name) for field, _ in _train_fields() if hasattr(args, field.name)}
    directory = TrainConfig(**{k: v for k, v in given.items() if k in ("dataset", "run_dir", "model")}).directory
    saved_path = directory / CONFIG_FILE
    if saved_path.exists():
        values = json.loads(saved_path.read_text())
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


def _load_run(run_dir: Path, device: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The stage-1 and final models, the tokenizer and the saved TrainConfig values of a finished run."""
    from transformers import AutoTokenizer

    from mp_model.modeling import MagicPyramidForSequenceClassification
    from mp_model.training import CONFIG_FILE, DENSE_DIR, FINAL_DIR

    final_dir = run_dir / FINAL_DIR
    if not final_dir.is_dir() or not (run_dir / DENSE_DIR).is_dir():
        raise SystemExit(f"mp: {run_dir} has no finished run ({DENSE_DIR}/ and {FINAL_DIR}/): run `mp train` first")
    dense = MagicPyramidForSequenceClassification.from_pretrained(str(run_dir / DENSE_DIR)).to(device).eval()
    final = MagicPyramidForSequenceClassification.from_pretrained(str(final_dir)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(final_dir))
    saved = json.loads((run_dir / CONFIG_FILE).read_text()) if (run_dir / CONFIG_FILE).exists() else {}
    return dense, final, tokenizer, saved


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

    from mp_model.data import encode, load_dataset
    from mp_model.evaluation import evaluate, select, setting_key, table_settings

    _quiet_transformers()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.select_split == args.split:
        print(f"mp: warning: selecting on the reported split ({args.split})", file=sys.stderr)
    run_dir = Path(args.run_dir)
    dense, final, tokenizer, saved = _load_run(run_dir, args.device)
    dataset = load_dataset(args.dataset or saved.get("dataset", "rotten_tomatoes"), seed=saved.get("seed", 0))
    max_length = args.max_length or saved.get("max_length", 128)
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


def read_texts(path: Path, column: str) -> list[str]:
    """Texts of a ``.txt`` (one per non-empty line), ``.csv``/``.tsv`` (column ``column``) or ``.jsonl`` file."""
    suffix = path.suffix.lower()
    content = path.read_text(encoding="utf-8-sig")
    if suffix in (".csv", ".tsv"):
        rows = list(csv.DictReader(io.StringIO(content, newline=""), delimiter="\t" if suffix == ".tsv" else ","))
        if rows and column not in rows[0]:
            raise SystemExit(f"mp: {path} has no column {column!r}; the columns are {list(rows[0])}")
        texts = [row[column] for row in rows]
    elif suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(content.splitlines(), start=1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict) or column not in record:
                    raise SystemExit(f"mp: {path}, line {number}: expected an object with key {column!r}")
                texts.append(str(record[column]))
    else:
        texts = [line for line in content.splitlines() if line.strip()]
    if not texts:
        raise SystemExit(f"mp: {path} holds no text")
    return texts


def _configure_predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, help="texts: .txt (one per line), .csv/.tsv or .jsonl (see --column)")
    parser.add_argument("--run-dir", default="runs/rotten_tomatoes", help="a finished `mp train` run directory")
    parser.add_argument("--checkpoint", type=Path, help="a saved model folder instead of the run's final model")
    parser.add_argument("--column", default="text", help="CSV column or JSON key holding the text")
    parser.add_argument("--output", type=Path, help="output file (.jsonl or .csv; default: JSON lines on stdout)")
    parser.add_argument("--tau", type=float, default=0.3, help="exit threshold in [0, 1] (larger exits earlier)")
    parser.add_argument("--threshold-scale", type=float, default=1.0, help="multiplies the pruning thresholds")
    parser.add_argument("--no-prune", action="store_true", help="switch token pruning off")
    parser.add_argument("--no-exit", action="store_true", help="switch early exit off")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per padded batch")
    parser.add_argument("--max-length", type=int, default=512, help="truncation in tokens")
    parser.add_argument("--device", default="cpu", help="torch device: cpu or cuda")


def _run_predict(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from mp_model.data import TextExample, batches, encode
    from mp_model.evaluation import backend_for
    from mp_model.modeling import MagicPyramidForSequenceClassification
    from mp_model.training import FINAL_DIR

    _quiet_transformers()
    folder = args.checkpoint or Path(args.run_dir) / FINAL_DIR
    if not folder.is_dir():
        raise SystemExit(f"mp: no model at {folder}: run `mp train` first or pass --checkpoint")
    model = MagicPyramidForSequenceClassification.from_pretrained(str(folder)).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    texts = read_texts(args.input, args.column)
    encoded = encode(tokenizer, [TextExample(text, 0) for text in texts], args.max_length)
    rows: list[dict[str, Any] | None] = [None] * len(texts)
    with torch.inference_mode():
        for batch in batches(encoded, args.batch_size, sort_by_length=True):
            out = model(
                batch["input_ids"].to(args.device),
                batch["attention_mask"].to(args.device),
                batch["token_type_ids"].to(args.device),
                tau=args.tau,
                threshold_scale=args.threshold_scale,
                prune=not args.no_prune,
                early_exit=not args.no_exit,
                backend=backend_for(args.device),
            )
            probabilities = out.logits.float().softmax(dim=-1).cpu()
            for row, index in enumerate(batch["index"].tolist()):
                label_id = int(probabilities[row].argmax())
                rows[index] = {
                    "index": index,
                    "text": texts[index],
                    "label": model.config.id2label.get(label_id, str(label_id)),
                    "label_id": label_id,
                    "confidence": round(float(probabilities[row, label_id]), 6),
                    "exit_layer": int(out.exit_layer[row]),
                    "gflops": float(out.flops[row]) / 1e9,
                }
    output_format = "csv" if args.output is not None and args.output.suffix.lower() == ".csv" else "jsonl"
    buffer = io.StringIO()
    if output_format == "csv":
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    else:
        buffer.writelines(json.dumps(row) + "\n" for row in rows)
    if args.output is None:
        sys.stdout.write(buffer.getvalue())
    else:
        args.output.write_text(buffer.getvalue())
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
    parser = argparse.ArgumentParser(
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
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mp`` command; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None and command.passthrough:
        return command.handler(argparse.Namespace(command=argv[0], argv=argv[1:]))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"mp {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
