"""Specification of ``bench.compile_check``: every Triton kernel the GPU engine launches compiles for an H100 (sm_90)
with the tiles a GPU would get, within an H100's shared memory and registers, checked on a CPU-only machine.

On a CUDA machine the kernels compile for real in the other tests, so these are skipped there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import compile_check
from bench.compile_check import FATAL, MAX_SHARED_BYTES, REGISTERS_PER_SM, Compiled, flags, gpu_planners, parse_shapes

ROOT = Path(__file__).resolve().parents[1]
GEMMS = {"_rows_linear_kernel", "_linear_add_layer_norm_kernel"}

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine compiles the kernels for real")


@pytest.mark.slow
def test_every_engine_kernel_compiles_for_sm90_within_an_h100s_limits(tmp_path):
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # kernels must be JITFunctions
    command = [sys.executable, "-m", "bench.compile_check", "--models", "bert-base,minilm", "--shapes", "1x64,64x512"]
    result = subprocess.run([*command, "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads(out.read_text())
    records = data["records"]
    assert data["provenance"]["target"] == {"backend": "cuda", "arch": 90, "warp_size": 32}
    shapes = {(r["model"], r["batch"], r["width"]) for r in records}
    assert shapes == {(m, b, w) for m in ("bert-base", "minilm") for b, w in ((1, 64), (64, 512))}
    for shape in shapes:
        assert GEMMS <= {r["kernel"] for r in records if (r["model"], r["batch"], r["width"]) == shape}, shape
    for r in records:
        name = f"{r['model']} {r['batch']}x{r['width']} {r['kernel']} {r['constexprs']}"
        assert r["error"] is None, name
        assert 0 <= r["shared_bytes"] <= MAX_SHARED_BYTES, name
        assert r["registers"] * r["num_warps"] * 32 <= REGISTERS_PER_SM, name
        assert r["spill_stores"] >= 0 and r["spill_loads"] >= 0, name  # spills are reported, not yet asserted
        assert not set(r["flags"]) & set(FATAL), name
    assert "spill st/ld" in result.stdout
    assert f"{len({r['key'] for r in records})} kernel specialisations compiled for sm_90" in result.stdout


def test_planners_see_an_h100_inside_and_the_interpreter_after():
    from mp_kernels._triton import attention_config, rows_linear

    interpreter = attention_config.forward_config(64, torch.bfloat16, 512)
    with gpu_planners(sm_count=132):
        assert rows_linear.device_traits(torch.device("cpu")) == (132, compile_check.H100_NAME)
        assert attention_config.choose_head_groups(1, 12, torch.device("cpu")) == 12
        assert attention_config.forward_config(64, torch.bfloat16, 512, slots=8 * 12).block_m == 128
        assert attention_config.forward_config(64, torch.bfloat16, 512, slots=12).block_m == 64, "fills the SMs"
        assert torch.cuda.get_device_properties(0).multi_processor_count == 132
    assert attention_config.forward_config(64, torch.bfloat16, 512) == interpreter
    assert rows_linear.device_traits(torch.device("cpu")) == (
        rows_linear.INTERPRETER_SM_COUNT,
        rows_linear.INTERPRETER_DEVICE,
    )
    assert attention_config.choose_head_groups(1, 12, torch.device("cpu")) == 1


def test_flags_name_what_fails_on_an_h100():
    def entry(**fields):
        base = {"registers": 64, "spill_stores": 0, "spill_loads": 0, "shared_bytes": 1024}
        return Compiled("k", {}, [], num_warps=4, num_stages=3, **(base | fields))

    assert flags(entry()) == []
    assert flags(entry(shared_bytes=MAX_SHARED_BYTES)) == []
    assert flags(entry(shared_bytes=MAX_SHARED_BYTES + 1)) == ["shared > 227 KB"]
    assert flags(entry(spill_loads=4)) == ["spills"]
    assert flags(Compiled("k", {}, [], 16, 3, registers=255)) == ["registers"]  # 255 x 512 threads > 64K
    assert flags(Compiled("k", {}, [], 4, 3, error="CompilationError: x")) == ["compile error"]


@pytest.mark.parametrize("text", ["", "1", "1x", "0x64", "1x64x2", "ax64", "1x64,"])
def test_bad_shapes_raise_naming_the_option(text):
    with pytest.raises(ValueError, match="--shapes"):
        parse_shapes(text)


def test_shapes_parse():
    assert parse_shapes("1x64,64x512") == [(1, 64), (64, 512)]
