"""Helpers shared by the tests: device, dtypes, tolerances per dtype, output poisoning, hypothesis settings.

``tests/conftest.py`` turns the Triton interpreter on (``TRITON_INTERPRET=1``) on machines without CUDA before
anything imports triton; this module only reads the device.
"""

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

# Tolerance (atol, rtol) of a kernel output against a float64 reference computed from the same inputs.
TOLERANCE = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    """Compare ``actual`` with a float64 ``expected`` at the tolerance of ``dtype`` (loosened by ``scale``)."""
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol * scale, rtol=rtol * scale)


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill ``tensor`` with NaN (floats) or an extreme value (integers) so that unwritten elements show."""
    if tensor.is_floating_point():
        return tensor.fill_(float("nan"))
    if tensor.dtype == torch.bool:
        return tensor.fill_(True)
    return tensor.fill_(torch.iinfo(tensor.dtype).min)
