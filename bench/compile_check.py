"""Compile every Triton kernel the GPU engine launches for an H100 (sm_90) on a CPU-only machine, and report each
kernel's resources.

``python -m bench.compile_check --out bench/results/kernels/compile-sm90.json`` builds the GPU engine's forward
(``mp_model.graph_engine.GraphEngine._static_forward``, pruning in every layer and early exit on) for BERT-base and
a MiniLM-sized model in bfloat16 at several ``(batch, width)`` buckets, with

* the planners seeing an H100: every ``triton_interpreting`` bound in ``mp_kernels`` returns False (the dispatch's
  own returns True, so that ``backend="triton"`` is accepted on CPU tensors), ``torch.cuda.get_device_properties``
  answers for a 132-SM ``"NVIDIA H100 80GB HBM3"``, and the planners that test ``device.type == "cuda"``
  (``DEVICE_PLANNERS``) are handed ``cuda:0``;
* every Triton launch recorded (kernel, grid, arguments, keyword arguments) and nothing executed: outputs are
  ``torch.empty`` on the CPU, never written.

Launches are then deduplicated by (kernel, specialisation, options) exactly as ``JITFunction.run`` keys its cache
(binder of the ``sm_90`` backend: tensor alignment, integer divisibility, constexprs), each is compiled with
``triton.compile`` for ``GPUTarget("cuda", 90, 32)``, and its PTX goes through ``ptxas -v`` (the one Triton uses for
sm_90) for registers and spills; shared memory and warps come from Triton's metadata. Flags: a compile error,
shared memory over ``MAX_SHARED_BYTES`` (227 KB, the per-block opt-in maximum), spills, and one block's registers
over the ``REGISTERS_PER_SM`` of an SM. It prints one table per model and shape and writes JSON with provenance.

It must run without ``TRITON_INTERPRET`` (kernels are then ``JITFunction`` objects that ``triton.compile`` takes;
no GPU is needed since nothing launches). It uses Triton internals that triton 3.6 and 3.9 both have:
``create_function_from_signature``, ``JITFunction._pack_args``/``params``, ``triton.knobs``,
``triton.backends.nvidia.compiler.get_ptxas`` (3.9 assembles sm_90 with its CUDA 13 ``ptxas-blackwell``, 3.6 with
``ptxas``, so register counts may differ a little from the GPU machine's). The exit status is 1 when a kernel has a
``FATAL`` flag (it would not compile or launch on an H100); spills are reported only.
"""

from __future__ import annotations

import argparse
import importlib
import math
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from bench.provenance import provenance, write_results

H100_SMS = 132
H100_NAME = "NVIDIA H100 80GB HBM3"
SM90 = GPUTarget("cuda", 90, 32)
MAX_SHARED_BYTES = 227 * 1024
REGISTERS_PER_SM = 64 * 1024
MODELS: dict[str, dict[str, int]] = {
    "bert-base": {},
    "minilm": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
}
SHAPES = ((1, 64), (1, 512), (8, 128), (64, 512))
# Planners that answer for the interpreter whenever ``device.type != "cuda"``: called with ``cuda:0`` instead.
DEVICE_PLANNERS = (
    ("mp_kernels._triton.rows_linear", "device_traits"),
    ("mp_kernels._triton.attention_config", "choose_head_groups"),
)
LAUNCH_OPTIONS = ("num_warps", "num_stages")
FATAL = ("compile error", "shared > 227 KB", "registers")


@dataclass
class Launch:
    """One recorded Triton launch: the kernel, its grid, positional and keyword arguments (constexprs and
    ``num_warps``/``num_stages`` included)."""

    kernel: JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Compiled:
    """One compiled specialisation for sm_90: resources from Triton's metadata and ``ptxas -v``, or the error."""

    kernel: str
    constexprs: dict[str, Any]
    unaligned: list[str]
    num_warps: int
    num_stages: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    compile_s: float = 0.0
    error: str | None = None
    flags: list[str] = field(default_factory=list)


def _all_kernel_modules() -> list[Any]:
    """Every module of ``mp_kernels`` and ``mp_model`` loaded, after importing all of ``mp_kernels._triton``."""
    import mp_kernels._triton

    for info in pkgutil.iter_modules(mp_kernels._triton.__path__):
        importlib.import_module(f"mp_kernels._triton.{info.name}")
    return [m for name, m in list(sys.modules.items()) if name.split(".")[0] in ("mp_kernels", "mp_model")]


def _on_gpu(planner: Callable[..., Any]) -> Callable[..., Any]:
    """``planner`` (its uncached function, so no CPU answer is cached) with every ``torch.device`` argument
    replaced by ``cuda:0``."""
    inner = getattr(planner, "__wrapped__", planner)
    gpu = torch.device("cuda", 0)

    def planned(*args: Any, **kwargs: Any) -> Any:
        args = tuple(gpu if isinstance(a, torch.device) else a for a in args)
        kwargs = {k: gpu if isinstance(v, torch.device) else v for k, v in kwargs.items()}
        return inner(*args, **kwargs)

    return planned


@contextmanager
def gpu_planners(sm_count: int = H100_SMS, device_name: str = H100_NAME) -> Iterator[None]:
    """Make the kernels' planners choose as on a CUDA device of ``sm_count`` SMs named ``device_name`` (see the
    module docstring); everything is restored on exit."""
    import mp_kernels.dispatch as dispatch

    modules = _all_kernel_modules()
    replacements: dict[int, tuple[Any, Any]] = {}
    original = dispatch.triton_interpreting
    replacements[id(original)] = (original, lambda: False)
    for module_name, name in DEVICE_PLANNERS:
        planner = getattr(importlib.import_module(module_name), name)
        replacements[id(planner)] = (planner, _on_gpu(planner))
    saved: list[tuple[Any, str, Any]] = []
    properties = SimpleNamespace(name=device_name, multi_processor_count=sm_count, major=9, minor=0)
    try:
        for module in modules:
            for attribute, value in list(vars(module).items()):
                if id(value) in replacements and replacements[id(value)][0] is value:
                    saved.append((module, attribute, value))
                    setattr(module, attribute, replacements[id(value)][1])
        saved.append((dispatch, "triton_interpreting", dispatch.triton_interpreting))
        dispatch.triton_interpreting = lambda: True  # choose_backend: backend="triton" on CPU tensors
        saved.append((torch.cuda, "get_device_properties", torch.cuda.get_device_properties))
        torch.cuda.get_device_properties = lambda device=None: properties
        yield
    finally:
        for module, attribute, value in reversed(saved):
            setattr(module, attribute, value)


@contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Yield a list that fills with every ``JITFunction`` launch inside the block; none of them runs."""
    launches: list[Launch] = []
    original = JITFunction.run

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        if callable(grid):
            raise ValueError(f"{self.__name__}: a callable grid cannot be recorded")
        launches.append(Launch(self, tuple(grid), args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def build_model(name: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A randomly initialised ``MagicPyramidForSequenceClassification`` of ``MODELS[name]`` on the CPU."""
    from mp_model.config import MagicPyramidConfig
    from mp_model.modeling import MagicPyramidForSequenceClassification

    torch.manual_seed(0)
    return MagicPyramidForSequenceClassification(MagicPyramidConfig(**MODELS[name])).to(dtype).eval()


def engine_launches(model: Any, batch: int, width: int, sm_count: int = H100_SMS) -> list[Launch]:
    """The Triton launches of the GPU engine's forward at bucket ``(batch, width)``, every layer pruning and early
    exit on, as planned for a GPU of ``sm_count`` SMs (recorded, not run)."""
    from mp_model.graph_engine import PlanKey

    if triton.knobs.runtime.interpret:
        raise RuntimeError("run without TRITON_INTERPRET: kernels must be JITFunctions to compile for sm_90")
    engine = model.graph_engine
    layers = model.config.num_hidden_layers
    key = PlanKey(batch, width, backend="triton", prune_layers=(True,) * layers, early_exit=layers > 1, scheduled=False)
    with torch.no_grad(), gpu_planners(sm_count), recorded_launches() as launches:
        engine._sync_weights()
        engine._static_forward(engine._plan(key))
    engine.reset()
    if not launches:
        raise RuntimeError(f"no Triton launch recorded at batch {batch}, width {width}")
    return launches


def specialise(launch: Launch, backend: Any) -> tuple[tuple[str, str, str], Any]:
    """``(cache key, (options, signature, constexprs, attrs))`` of ``launch`` for ``backend``, as ``JITFunction.run``
    computes them."""
    kernel = launch.kernel
    kwargs = dict(launch.kwargs, debug=launch.kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    key = (f"{kernel.module}.{kernel.__name__}", str(specialization), str(options))
    return key, kernel._pack_args(backend, kwargs, bound, specialization, options)


def ptxas_path() -> str:
    """The ``ptxas`` Triton assembles sm_90 code with."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(SM90.arch).path


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` of the kernel in ``ptx``, from ``ptxas -v``."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        command = [ptxas_path(), "-v", f"--gpu-name={arch.group(1) if arch else 'sm_90a'}", str(source)]
        result = subprocess.run([*command, "-o", str(source.with_suffix(".cubin"))], capture_output=True, text=True)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed ({result.returncode}): {log.strip()[-2000:]}")
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log.strip()[-2000:]}")
    return int(registers[1]), int(spills[1]), int(spills[2])


def flags(entry: Compiled) -> list[str]:
    """What is wrong with ``entry`` for an H100: ``compile error``, ``shared > 227 KB``, ``spills``, ``registers``
    (one block's registers over an SM's)."""
    if entry.error is not None:
        return ["compile error"]
    found = []
    if entry.shared_bytes is not None and entry.shared_bytes > MAX_SHARED_BYTES:
        found.append("shared > 227 KB")
    if (entry.spill_stores or 0) + (entry.spill_loads or 0) > 0:
        found.append("spills")
    if entry.registers is not None and entry.registers * entry.num_warps * SM90.warp_size > REGISTERS_PER_SM:
        found.append("registers")
    return found


def compile_launch(launch: Launch, constexprs: dict[str, Any], packed: Any) -> Compiled:
    """Compile one specialisation (``specialise``'s packed arguments) for sm_90 and measure it."""
    options, signature, constants, attrs = packed
    names = list(signature)
    unaligned = [
        names[path[0]]
        for path, values in attrs.items()
        if len(path) == 1
        and signature[names[path[0]]].startswith("*")
        and not any(a[0] == "tt.divisibility" for a in values)
    ]
    entry = Compiled(launch.kernel.__name__, constexprs, unaligned, options.num_warps, options.num_stages)
    started = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(launch.kernel, signature, constants, attrs), target=SM90, options=options.__dict__
        )
        entry.shared_bytes = int(compiled.metadata.shared)
        entry.num_warps = int(compiled.metadata.num_warps)
        usage = ptxas_usage(compiled.asm["ptx"])
        entry.registers, entry.spill_stores, entry.spill_loads = usage
    except Exception as error:  # noqa: BLE001 - every failure is a result to report
        entry.error = f"{type(error).__name__}: {str(error).strip()[-2000:]}"
    entry.compile_s = time.perf_counter() - started
    entry.flags = flags(entry)
    return entry


def named_constexprs(launch: Launch, constants: dict[tuple[int, ...], Any]) -> dict[str, Any]:
    """A launch's constexprs by argument name, plus its ``num_warps`` and ``num_stages`` when given."""
    names = launch.kernel.arg_names
    named = {names[path[0]]: value for path, value in sorted(constants.items()) if len(path) == 1}
    return named | {k: launch.kwargs[k] for k in LAUNCH_OPTIONS if k in launch.kwargs}


def check(
    models: Sequence[str], shapes: Sequence[tuple[int, int]], sm_count: int = H100_SMS, log: Callable = print
) -> tuple[dict[str, Compiled], list[dict[str, Any]]]:
    """Compile every distinct launch of the engine for ``models`` at ``shapes``.

    Returns ``(compiled, uses)``: ``compiled`` maps a kernel key to its ``Compiled``; ``uses`` has one record per
    model, shape and key, in launch order: ``model``, ``batch``, ``width``, ``key``, ``launches`` (how many in the
    forward) and ``programs`` (``[min, max]`` programs of those launches).
    """
    backend = make_backend(SM90)
    compiled: dict[str, Compiled] = {}
    uses: list[dict[str, Any]] = []
    for name in models:
        model = build_model(name)
        for batch, width in shapes:
            by_key: dict[str, dict[str, Any]] = {}
            for launch in engine_launches(model, batch, width, sm_count):
                key, packed = specialise(launch, backend)
                key = "|".join(key)
                if key not in compiled:
                    compiled[key] = compile_launch(launch, named_constexprs(launch, packed[2]), packed)
                    log(f"  compiled {compiled[key].kernel} in {compiled[key].compile_s:.1f} s")
                programs = math.prod(launch.grid)
                use = by_key.setdefault(
                    key, {"model": name, "batch": batch, "width": width, "key": key, "launches": 0, "programs": []}
                )
                use["launches"] += 1
                low, high = use["programs"] or (programs, programs)
                use["programs"] = [min(low, programs), max(high, programs)]
            uses.extend(by_key.values())
            log(f"{name} batch {batch} width {width}: {sum(u['launches'] for u in by_key.values())} launches")
    return compiled, uses


def summary(constexprs: dict[str, Any]) -> str:
    """``constexprs`` as ``NAME=value`` words, without ``num_warps``/``num_stages`` (columns of their own)."""
    return " ".join(f"{k}={v}" for k, v in constexprs.items() if k not in LAUNCH_OPTIONS)


def table(compiled: dict[str, Compiled], uses: Sequence[dict[str, Any]]) -> str:
    """One text table per model and shape: a row per distinct kernel specialisation, in launch order."""
    header = ("kernel", "n", "programs", "warps", "stages", "regs", "spill st/ld", "smem KB", "status", "specialised")
    blocks = []
    for group in dict.fromkeys((u["model"], u["batch"], u["width"]) for u in uses):
        rows = [header]
        for use in (u for u in uses if (u["model"], u["batch"], u["width"]) == group):
            entry = compiled[use["key"]]
            low, high = use["programs"]
            rows.append(
                (
                    entry.kernel.removeprefix("_").removesuffix("_kernel"),
                    str(use["launches"]),
                    str(low) if low == high else f"{low}-{high}",
                    str(entry.num_warps),
                    str(entry.num_stages),
                    "-" if entry.registers is None else str(entry.registers),
                    "-" if entry.spill_stores is None else f"{entry.spill_stores}/{entry.spill_loads}",
                    "-" if entry.shared_bytes is None else f"{entry.shared_bytes / 1024:.1f}",
                    ", ".join(entry.flags) or "ok",
                    summary(entry.constexprs) + "".join(f" {name}%16!=0" for name in entry.unaligned),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
        lines = ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]) for row in rows]
        blocks.append(f"{group[0]} batch {group[1]} width {group[2]}\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def records(compiled: dict[str, Compiled], uses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One JSON record per model, shape and kernel specialisation: the use and the compiled kernel's fields."""
    return [{**use, **asdict(compiled[use["key"]])} for use in uses]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """``"1x64,8x128"`` -> ``[(1, 64), (8, 128)]``; a ``ValueError`` naming ``--shapes`` otherwise."""
    try:
        shapes = [tuple(int(n) for n in item.split("x")) for item in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes must be BATCHxWIDTH[,BATCHxWIDTH...], got {text!r}")
    return shapes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check, print the tables and the flagged kernels, write JSON; exit status 1 on a ``FATAL`` flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--shapes", default=",".join(f"{b}x{w}" for b, w in SHAPES), help="BATCHxWIDTH,...")
    parser.add_argument("--sm-count", type=int, default=H100_SMS, help="SMs the planners see")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown {unknown}, choose from {sorted(MODELS)}")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as error:
        parser.error(str(error))
    compiled, uses = check(models, shapes, args.sm_count, log=lambda line: print(line, file=sys.stderr))
    print(table(compiled, uses))
    flagged = [entry for entry in compiled.values() if entry.flags]
    print(f"\n{len(compiled)} kernel specialisations compiled for sm_90, {len(flagged)} flagged")
    for entry in flagged:
        print(f"  {entry.kernel} {summary(entry.constexprs)}: {', '.join(entry.flags)}")
        if entry.error:
            print(f"    {entry.error}")
    if args.out is not None:
        meta = provenance(torch.device("cpu")) | {
            "target": {"backend": SM90.backend, "arch": SM90.arch, "warp_size": SM90.warp_size},
            "planner_device": {"name": H100_NAME, "sm_count": args.sm_count},
            "ptxas": ptxas_path(),
            "limits": {"shared_bytes": MAX_SHARED_BYTES, "registers_per_sm": REGISTERS_PER_SM},
            "models": {name: MODELS[name] for name in models},
            "shapes": shapes,
        }
        print(f"wrote {write_results(args.out, records(compiled, uses), meta)}")
    return 1 if any(set(entry.flags) & set(FATAL) for entry in flagged) else 0


if __name__ == "__main__":
    sys.exit(main())
