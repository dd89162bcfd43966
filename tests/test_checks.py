"""Specification of ``mp_model.recipe.checks``: devices this machine lacks are refused, naming them."""

from __future__ import annotations

import pytest
import torch

from mp_model.recipe.checks import check_device


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "mps", "tpu"])
def test_an_unknown_device_is_refused(device: str) -> None:
    with pytest.raises(ValueError, match=f"device '{device}'"):
        check_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_device("cuda")
