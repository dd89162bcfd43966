"""Specification of the README results tables (``scripts/results_tables.py``) for ``mp eval --json`` files.

Each table names the ``mp train`` and ``mp eval`` commands that reproduce it, shows each method's selected
setting, the paper-style reading (selected on the reported split itself), and the tau sweep of FastBERT-only
and of MP at its selected threshold scale.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from mp_model.recipe.train_config import TrainConfig

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "results_tables.py"


def tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(method: str, tau: float | None, scale: float | None, accuracy: float, speedup: float, **extra) -> dict:
    return {
        "dataset": extra.pop("dataset", "toy"),
        "split": "test",
        "examples": 10,
        "method": method,
        "tau": tau,
        "threshold_scale": scale,
        "accuracy": accuracy,
        "gflops": 1.0 / speedup,
        "flops_speedup": speedup,
        "latency_speedup": None,
        "buckets": {},
        "selected": False,
        **extra,
    }


def test_train_command_lists_only_the_fields_that_differ_from_the_defaults() -> None:
    config = TrainConfig(
        dataset="bbc_news", run_dir="runs/bbc", train_size=2000, dev_size=None, lambdas=(0.1,), lr=1e-4
    )
    command = tables().train_command(config.to_dict())
    assert command == "mp train --dataset bbc_news --run-dir runs/bbc --train-size 2000 --lr 0.0001 --lambdas 0.1"


def test_a_run_recorded_before_a_flag_existed_says_so_beside_its_command() -> None:
    config = TrainConfig(dataset="toy.csv").to_dict()
    del config["exit_label_weight"]
    assert tables().unrecorded_flags(config) == ["--exit-label-weight"]
    meta = {"command": "mp eval --run-dir runs/toy", "train_config": config}
    text = tables().eval_table(
        Path("toy-cpu.json"), {"provenance": meta, "records": [record("dense", None, None, 0.9, 1.0)]}
    )
    assert "Train: `mp train --dataset toy.csv` (recorded before `--exit-label-weight` existed" in text
    assert tables().unrecorded_flags(TrainConfig().to_dict()) == []


def test_summary_has_a_row_per_run_with_each_dev_choice_on_test_and_marks_the_ones_outside_the_limit() -> None:
    records = [
        record("dense", None, None, 0.90, 1.0, selected=True),
        record("ltp", 0.0, 1.0, 0.905, 1.2, selected=True),
        record("fastbert", 0.1, None, 0.885, 2.0, selected=True),
        record("fastbert", 0.5, None, 0.80, 4.0),
        record("mp", 0.3, 2.0, 0.87, 3.0, selected=True),
        record("mp", 0.1, 2.0, 0.895, 2.5),
    ]
    meta = {"selection": "per method, fewest GFLOPs within 0.01 accuracy of dense on dev at confidence 0.8"}
    older = [dict(r, dataset="other") for r in records[:1]]
    normal = {"selection": "per method, fewest GFLOPs within 0.01 accuracy of dense on dev at normal k=1"}
    text = tables().summary_table(
        [
            (Path("toy-cpu.json"), {"provenance": meta, "records": records}),
            (Path("old-cpu.json"), {"provenance": {"selection": "on dev"}, "records": older}),
            (Path("new-cpu.json"), {"provenance": normal, "records": older}),
        ]
    )
    rows = text.splitlines()
    assert rows[0] == "| run | dataset | chosen on | dense | LTP only | FastBERT only | MP | MP, chosen on test |"
    assert rows[2] == (
        "| `toy-cpu` | toy | dev, 0.8 | 90.00 / 1.000 | 90.50 (+0.50), 1.20x | 88.50 (-1.50), 2.00x † "
        "| 87.00 (-3.00), 3.00x † | 89.50 (-0.50), 2.50x |"
    )
    assert rows[3] == "| `old-cpu` | other | dev | 90.00 / 1.000 | - | - | - | - |"
    assert rows[4] == "| `new-cpu` | other | dev, normal k=1 | 90.00 / 1.000 | - | - | - | - |"


def test_eval_table_names_its_commands_and_sweeps_tau_at_the_selected_scale() -> None:
    records = [
        record("dense", None, None, 0.9, 1.0, selected=True),
        record("fastbert", 0.1, None, 0.9, 1.5, selected=True),
        record("fastbert", 0.5, None, 0.8, 3.0),
        record("mp", 0.1, 2.0, 0.9, 2.5, selected=True),
        record("mp", 0.5, 2.0, 0.85, 4.0, latency_speedup=2.5),
        record("mp", 0.5, 1.0, 0.88, 3.5),
    ]
    meta = {
        "command": "/usr/bin/mp eval --run-dir runs/toy --json out.json",
        "train_config": TrainConfig(dataset="toy.csv").to_dict(),
    }
    text = tables().eval_table(Path("toy-cpu.json"), {"provenance": meta, "records": records})
    assert "Train: `mp train --dataset toy.csv`" in text
    assert "Evaluate: `mp eval --run-dir runs/toy --json out.json`" in text
    assert "| toy | MP | 0.1 | 2 | 90.00 | 0.400 | 2.50x |" in text
    assert "| 0.5 | 80.00 | 3.00x | - | 85.00 | 4.00x | 2.50x |" in text
    assert "88.00" not in text, "the tau sweep keeps MP at its selected scale"
    assert (
        "as the paper's Table 2 does: FastBERT only 1.50x at 90.00 (tau 0.1); MP 2.50x at 90.00 (tau 0.1, scale 2)."
        in text
    )


def test_eval_details_name_the_reference_and_each_rules_reliability() -> None:
    reliability = {"within_limit": 0.9, "median_flops_speedup": 2.3, "median_drop": 0.002}
    meta = {
        "reference": {
            "model_class": "transformers.BertForSequenceClassification",
            "lr": 5e-5,
            "lrs": [5e-5, 1e-4],
            "epoch": 3,
            "accuracy": 0.8512,
            "split": "test",
        },
        "selection_details": {"reliability": {"point estimate": {"mp": reliability}, "confidence 0.8": {}}},
    }
    text = "\n".join(tables().details(meta))
    assert "best of lr 5e-05, 0.0001 and epoch on dev: lr 5e-05, epoch 3): 85.12 on the test split" in text
    assert "| rule | MP |" in text
    assert "| point estimate | 90% (2.30x) |" in text and "| confidence 0.8 | - |" in text
    assert tables().details({}) == []


def test_a_gpu_e2e_file_gets_a_table_against_the_compiled_baseline() -> None:
    def cell(method: str, bucket: str, ms: float, vs_compiled: float, flops: float) -> dict[str, object]:
        return {"model": "minilm", "bucket": bucket, "batch_size": 64, "method": method, "median_ms": ms,
                "latency_speedup": 6.0 / ms, "flops_speedup": flops, "speedup_vs_compiled": vs_compiled}  # fmt: skip

    records = [
        cell("hf_sdpa", "long", 6.0, 0.6, 1.0),
        cell("hf_compiled", "long", 4.0, 1.0, 1.0),
        cell("graph_mp", "long", 2.0, 2.0, 2.9),
        cell("hf_sdpa", "short", 6.0, 0.2, 1.0),  # no compiled run in this cell: no row
    ]
    payload = {"provenance": {"device": "NVIDIA H200", "device_type": "cuda", "dtype": "bfloat16"}, "records": records}
    text = tables().e2e_table(Path("e2e-h200-bf16.json"), payload)
    table = text.split("Against HF compiled")[1]
    assert "| model | bucket | batch | compiled ms | compiled vs HF sdpa | MP (GPU engine) |" in table
    assert "| minilm | long | 64 | 4.00 | 1.50x | 2.00x / 2.90x |" in table
    assert "| minilm | short |" not in table
    assert "LTP only (GPU engine)" not in table, "only the engine's methods that ran"


def test_a_choice_no_setting_met_the_rule_for_is_marked_from_met_rule_or_else_its_normal_bound() -> None:
    missed = tables().missed_rule
    assert missed({"met_rule": False}, 0.01) and not missed({"met_rule": True, "drop_bound": 0.5}, 0.01)
    assert missed({"drop_bound": 0.0153}, 0.01), "written before met_rule: the recorded bound decides"
    assert not missed({"drop_bound": 0.01}, 0.01) and not missed({"within_limit_share": 0.1}, 0.01)
    records = [
        record("dense", None, None, 0.90, 1.0, selected=True),
        record("ltp", 0.0, 1.0, 0.905, 1.2, selected=True, met_rule=False),
        record("mp", 0.3, 2.0, 0.87, 3.0, selected=True, drop_bound=0.02),
    ]
    normal = {"selection": "per method, fewest GFLOPs within 0.01 accuracy of dense on dev at normal k=1"}
    row = tables().summary_table([(Path("toy-cpu.json"), {"provenance": normal, "records": records})]).splitlines()[2]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4:7] == ["90.50 (+0.50), 1.20x ‡", "-", "87.00 (-3.00), 3.00x † ‡"]
    assert cells[7] == "87.00 (-3.00), 3.00x †", "the choice read on test is the paper's reading: no rule, no ‡"
