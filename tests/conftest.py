"""Test session set-up: the Triton interpreter on machines without CUDA, the ``device`` fixture, the header.

On a machine without CUDA the Triton kernels run under the interpreter (``TRITON_INTERPRET=1``, which must be
set before triton is imported, hence here, first). The same tests run unchanged on a GPU, where bfloat16 is
added (the interpreter cannot run it). Shared helpers live in ``tests/utils.py``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.utils import DEVICE, KERNEL_DTYPES, ON_GPU, tf32_matmuls  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_report_header(config: pytest.Config) -> str:
    mode = "GPU " + torch.cuda.get_device_name() if ON_GPU else "CPU (Triton interpreter)"
    precision = f"; float32 matmuls {'TF32' if tf32_matmuls() else 'IEEE'}" if ON_GPU else ""
    return f"magic-pyramid kernels on {mode}; dtypes {[str(d) for d in KERNEL_DTYPES]}{precision}"
