"""Test session set-up: the Triton interpreter on machines without CUDA, the ``device`` fixture, the header, and
``--bounds-check``: every test under ``tests.bounds.bounds_checked`` (each address a Triton kernel touches under the
interpreter checked against its tensors, ``torch.empty`` in guard zones), e.g.
``python -m pytest --bounds-check tests/test_compaction.py``.

On a machine without CUDA the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, which must be
set before triton is imported, hence here, first). The same tests run unchanged on a GPU, where bfloat16 is
added (the interpreter cannot run it). Shared helpers live in ``tests/utils.py``.
"""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.bounds import bounds_checked  # noqa: E402
from tests.utils import DEVICE, KERNEL_DTYPES, ON_GPU, tf32_matmuls, write_toy_bert  # noqa: E402

if ON_GPU:
    # The tolerance table assumes half-precision matmuls accumulate in float32, as the kernels do; by default cuBLAS
    # may add split-K partial sums in half precision, which the PyTorch backend's results would then carry.
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--bounds-check", action="store_true", help="run every test under tests.bounds.bounds_checked (CPU interpreter)"
    )


@pytest.fixture(autouse=True)
def _bounds_check(request: pytest.FixtureRequest) -> Iterator[None]:
    if not request.config.getoption("--bounds-check"):
        yield
        return
    with bounds_checked():
        yield


def pytest_report_header(config: pytest.Config) -> str:
    mode = "GPU " + torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter)"
    precision = f"; float32 matmuls {'TF32' if tf32_matmuls() else 'IEEE'}" if ON_GPU else ""
    return f"magic-pyramid kernels on {mode}; dtypes {[str(d) for d in KERNEL_DTYPES]}{precision}"


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT folder with the MiniLM tokenizer files."""
    return write_toy_bert(tmp_path_factory.mktemp("toy-bert"))


@pytest.fixture
def cpu_user_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Default backends pick the PyTorch reference on CPU, as for a user (this file turns the interpreter on), and
    one thread: toy-sized operations only wait on each other's threads on a busy machine."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
