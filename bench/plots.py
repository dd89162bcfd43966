"""Figures from results JSON (``mp_model.recipe.plots``), on the command line.

Usage::

    python -m bench.plots bench/results/e2e/e2e-cpu-ort.json runs/eval-rotten_tomatoes.json --out bench/results/plots
"""

from __future__ import annotations

import argparse

from mp_model.recipe.plots import make_plots


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m bench.plots FILE... --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="e2e and/or evaluation results JSON")
    parser.add_argument("--out", default="bench/results/plots", help="folder for the PNG files")
    args = parser.parse_args(argv)
    written = make_plots(args.files, args.out)
    if not written:
        parser.error("none of the files is an e2e or evaluation results file")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
