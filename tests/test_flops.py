"""``flops_coefficients`` against the per-block functions and ``flops_from_outputs`` of ``mp_model.flops``."""

from __future__ import annotations

import pytest
import torch

from mp_model import MagicPyramidConfig
from mp_model.flops import attention_macs, feed_forward_macs, flops_coefficients, flops_from_outputs

CONFIGS = [
    MagicPyramidConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    MagicPyramidConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=48,
        exit_hidden_size=16,
        num_labels=5,
    ),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["bert-base", "tiny"])
def test_coefficients_reproduce_the_block_counts(config: MagicPyramidConfig) -> None:
    attention_linear, attention_quadratic, feed_forward, _, _ = flops_coefficients(config)
    for n in (0, 1, 2, 7, 128, 509, 512):
        assert attention_linear * n + attention_quadratic * n * n == 2 * attention_macs(config, n)
        assert feed_forward * n == 2 * feed_forward_macs(config, n)


@pytest.mark.parametrize("config", CONFIGS, ids=["bert-base", "tiny"])
@pytest.mark.parametrize("early_exit", [False, True])
def test_coefficients_reproduce_flops_from_outputs(config: MagicPyramidConfig, early_exit: bool) -> None:
    """Per example: the layers it ran at their entering and kept lengths, its sub-classifiers, its main head."""
    layers = config.num_hidden_layers
    attention_linear, attention_quadratic, feed_forward, exit_head, main_head = flops_coefficients(config)
    lengths = torch.tensor([512, 1, 0, 37])
    exit_layer = torch.tensor([layers, 1, layers, 2])
    kept = torch.tensor(
        [[400 - 10 * i for i in range(layers)], [1] + [0] * (layers - 1), [0] * layers, [30, 20] + [0] * (layers - 2)]
    )
    for b in range(4):
        before = [int(lengths[b]), *kept[b, :-1].tolist()]
        ran = int(exit_layer[b])
        want = sum(
            attention_linear * n + attention_quadratic * n * n + feed_forward * int(k)
            for n, k in zip(before[:ran], kept[b, :ran], strict=True)
        )
        want += exit_head * min(ran, layers - 1) * early_exit + main_head * (ran == layers)
        got = flops_from_outputs(config, lengths, kept, exit_layer, early_exit=early_exit)
        assert int(got[b]) == want
