"""``embed_pack`` against HF's ``BertEmbeddings`` in float64, then packed by the mask, on both backends.

The oracle is transformers' own module (eval mode, absolute positions counted over each row's present tokens,
``cumsum(mask) - 1``: the column with right padding) loaded with the same tables,
run in float64 on the CPU; its rows where the mask is nonzero, in row-major order, are the packed result. In
float32 (and float64) the kernels match it at the tolerance table's bound. In half precision the two sums are
rounded to the dtype before the LayerNorm divides by a standard deviation, so the error is several roundings
of ``|e| / std``: there the rule is FlashAttention's, at most twice the error of the same HF module run in that
dtype. Counts are integers and must match exactly. Outputs are allocated poisoned, so a row or entry no kernel
writes shows.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings

from mp_kernels.embed_pack import embed_pack
from tests.utils import (
    DEVICE,
    KERNEL_DTYPES,
    ON_GPU,
    assert_close,
    assert_no_host_synchronisation,
    assert_within_twice_torch_error,
    capture_cuda_graph,
    kernel_must_not_run,
    poisoned_allocations,
)

embed_pack_module = importlib.import_module("mp_kernels.embed_pack")
triton_embed_pack = importlib.import_module("mp_kernels._triton.embed_pack")

BACKENDS = ["triton", "torch"]
EPS = 1e-12
WIDTH = 23
VOCAB, TYPES, POSITIONS, FEATURES = 50, 3, 31, 48
HALF_DTYPES = [dtype for dtype in KERNEL_DTYPES if dtype != torch.float32]
TABLES = ("word_embeddings", "position_embeddings", "token_type_embeddings", "norm_weight", "norm_bias")


def uneven_mask(batch: int, width: int, seed: int) -> torch.Tensor:
    """Slots of length 1, odd, the width, 0, holes in the middle, left padding, one middle token (each cut to the
    width), then random."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, width, generator=generator) > 0.5
    patterns = [range(1), range(9), range(width), range(0), [*range(5), *range(10, 17)], range(width - 13, width)]
    patterns.append([width // 2])
    for slot, columns in enumerate(patterns[:batch]):
        mask[slot] = False
        mask[slot, [column for column in columns if 0 <= column < width]] = True
    return mask


def make_case(batch: int, width: int, dtype: torch.dtype, seed: int, *, positions: int = POSITIONS) -> dict:
    """Tables in ``dtype`` (word ids, types and LayerNorm parameters random), the mask from ``uneven_mask``."""
    generator = torch.Generator().manual_seed(seed)
    tables = {
        "word_embeddings": torch.randn(VOCAB, FEATURES, generator=generator) + 0.3,
        "position_embeddings": torch.randn(positions, FEATURES, generator=generator) * 0.5,
        "token_type_embeddings": torch.randn(TYPES, FEATURES, generator=generator) * 0.2,
        "norm_weight": 1 + 0.2 * torch.randn(FEATURES, generator=generator),
        "norm_bias": 0.2 * torch.randn(FEATURES, generator=generator),
    }
    return {
        "input_ids": torch.randint(0, VOCAB, (batch, width), generator=generator).to(DEVICE),
        "token_type_ids": torch.randint(0, TYPES, (batch, width), generator=generator).to(DEVICE),
        "attention_mask": uneven_mask(batch, width, seed).to(DEVICE),
        **{name: table.to(DEVICE, dtype) for name, table in tables.items()},
    }


def run(case: dict, backend: str, **kwargs: object) -> tuple[torch.Tensor, ...]:
    """``embed_pack`` on ``case`` with every output allocated poisoned."""
    with poisoned_allocations():
        return embed_pack(**case, eps=EPS, backend=backend, **kwargs)


def hf_embeddings(case: dict, dtype: torch.dtype, token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """HF's ``BertEmbeddings`` in ``dtype`` on the CPU, loaded with the case's tables: ``(B, W, d)``."""
    positions = case["position_embeddings"].shape[0]
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=FEATURES,
        max_position_embeddings=positions,
        type_vocab_size=TYPES,
        layer_norm_eps=EPS,
    )
    module = BertEmbeddings(config).to(dtype).eval()
    parameters = {
        "word_embeddings.weight": "word_embeddings",
        "position_embeddings.weight": "position_embeddings",
        "token_type_embeddings.weight": "token_type_embeddings",
        "LayerNorm.weight": "norm_weight",
        "LayerNorm.bias": "norm_bias",
    }
    module.load_state_dict({key: case[name].cpu().to(dtype) for key, name in parameters.items()}, strict=False)
    with torch.no_grad():
        ids = case["input_ids"].cpu()
        positions = ((case["attention_mask"].cpu() != 0).long().cumsum(dim=1) - 1).clamp(min=0)
        types = None if token_type_ids is None else token_type_ids.cpu()
        return module(input_ids=ids, token_type_ids=types, position_ids=positions)


def check(outputs: tuple[torch.Tensor, ...], case: dict, dtype: torch.dtype, *, token_type_ids="case") -> None:
    """Packed rows against HF's module in float64 (see the module doc) and the counts exactly."""
    hidden, cu_seqlens, lengths, alive = outputs
    mask = case["attention_mask"].cpu() != 0
    batch, width = mask.shape
    types = case["token_type_ids"] if token_type_ids == "case" else token_type_ids
    expected_lengths = mask.sum(dim=1)
    assert hidden.shape == (batch * width, FEATURES) and hidden.dtype == dtype
    assert cu_seqlens.dtype == torch.int32 and lengths.dtype == torch.int64 and alive.dtype == torch.bool
    assert lengths.cpu().tolist() == expected_lengths.tolist()
    assert cu_seqlens.cpu().tolist() == [0, *expected_lengths.cumsum(0).tolist()]
    assert alive.cpu().tolist() == (expected_lengths > 0).tolist()
    total = int(expected_lengths.sum())
    reference = hf_embeddings(case, torch.float64, types)[mask]
    if dtype in (torch.float32, torch.float64):
        assert_close(hidden[:total], reference, dtype)
    else:
        same_dtype = hf_embeddings(case, dtype, types)[mask]
        assert_within_twice_torch_error(hidden[:total], same_dtype, reference, msg=str(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_matches_hf_embeddings_packed(backend: str, dtype: torch.dtype) -> None:
    case = make_case(8, WIDTH, dtype, seed=1)
    check(run(case, backend), case, dtype)


def test_float64_on_torch_backend() -> None:
    case = make_case(8, WIDTH, torch.float64, seed=2)
    check(run(case, "torch"), case, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("added", ["token_type", "position"])
def test_each_sum_is_rounded_to_the_model_dtype(backend: str, dtype: torch.dtype, added: str) -> None:
    """Word rows of 2048 plus a row alternating 1, 0 (the type's, then the position's): 2049 is 2048 in half
    precision, so the row has no variance and normalises to exactly the bias, as in HF's module in that dtype
    (unrounded sums would normalise to +-1)."""
    case = make_case(7, WIDTH, dtype, seed=12)
    case["input_ids"].zero_()
    case["token_type_ids"].fill_(1)
    case["word_embeddings"][0] = 2048
    case["token_type_embeddings"].zero_()
    case["position_embeddings"].zero_()
    alternating = (torch.arange(FEATURES, device=DEVICE) % 2).to(dtype)
    case[f"{added}_embeddings"][1 if added == "token_type" else slice(None)] = alternating
    outputs = run(case, backend)
    check(outputs, case, dtype)
    total = int(outputs[1][-1])
    assert torch.equal(outputs[0][:total], case["norm_bias"].expand(total, FEATURES))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_token_types_means_type_zero(backend: str) -> None:
    case = {**make_case(7, WIDTH, torch.float32, seed=3), "token_type_ids": None}
    check(run(case, backend), case, torch.float32, token_type_ids=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_masks_count_nonzero_entries(backend: str, mask_dtype: torch.dtype) -> None:
    """An integer mask (values 0 to 7) selects its nonzero entries, as the bool mask does, bit for bit."""
    case = make_case(7, WIDTH, torch.float16, seed=4)
    as_bool = run(case, backend)
    mask = case["attention_mask"].to(mask_dtype) * torch.randint(1, 8, case["attention_mask"].shape).to(DEVICE)
    as_int = run({**case, "attention_mask": mask.to(mask_dtype)}, backend)
    total = int(as_bool[1][-1])
    assert torch.equal(as_int[0][:total], as_bool[0][:total])
    assert all(torch.equal(a, b) for a, b in zip(as_int[1:], as_bool[1:], strict=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_slots_and_long_rows(backend: str) -> None:
    """More mask entries than one scan block (1024) and several row blocks per slot, lengths 0 to the width."""
    case = make_case(9, 150, torch.float32, seed=5, positions=160)
    check(run(case, backend), case, torch.float32)


@pytest.mark.parametrize("width", [1, 16, 17])
def test_narrow_batches(width: int) -> None:
    """Widths 1, one row block and one past it, on both backends, single slot and a few."""
    for batch in (1, 3):
        case = make_case(batch, width, torch.float32, seed=width + batch)
        for backend in BACKENDS:
            check(run(case, backend), case, torch.float32)


def test_triton_writes_no_row_past_the_packed_tokens() -> None:
    case = make_case(8, WIDTH, torch.float32, seed=6)
    hidden, cu_seqlens, _, _ = run(case, "triton")
    assert bool(hidden[int(cu_seqlens[-1]) :].isnan().all())


@pytest.mark.out_of_range
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_ids_are_clamped_without_validation(backend: str) -> None:
    """With ``validate=False`` an id outside its table reads the nearest row (first or last), never out of bounds."""
    case = make_case(7, WIDTH, torch.float32, seed=7)
    case["input_ids"][:, ::3] = -5
    case["input_ids"][:, 1::3] = VOCAB + 1000
    case["token_type_ids"][:, ::2] = TYPES
    case["token_type_ids"][:, 1::4] = -1
    outputs = run(case, backend, validate=False)
    clamped = {
        **case,
        "input_ids": case["input_ids"].clamp(0, VOCAB - 1),
        "token_type_ids": case["token_type_ids"].clamp(0, TYPES - 1),
    }
    check(outputs, clamped, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("name", "value"), [("input_ids", -1), ("input_ids", VOCAB), ("token_type_ids", TYPES), ("token_type_ids", -2)]
)
def test_out_of_range_ids_raise_with_validation(backend: str, name: str, value: int, monkeypatch) -> None:
    monkeypatch.setattr(embed_pack_module, "embed_pack_torch", kernel_must_not_run)
    monkeypatch.setattr(triton_embed_pack, "embed_pack_triton", kernel_must_not_run)
    case = make_case(3, WIDTH, torch.float32, seed=8)
    case[name][1, 4] = value
    with pytest.raises(ValueError, match=name):
        embed_pack(**case, eps=EPS, backend=backend)


def _bad_inputs() -> list[tuple[str, dict, type[Exception], str]]:
    case = make_case(3, 8, torch.float32, seed=9)
    ids, table = case["input_ids"], case["word_embeddings"]
    bad = [
        ("ids as list", {"input_ids": ids.tolist()}, TypeError, "input_ids"),
        ("ids int32", {"input_ids": ids.int()}, TypeError, "input_ids"),
        ("ids 1-d", {"input_ids": ids.view(-1)}, ValueError, "input_ids"),
        ("ids empty", {"input_ids": ids[:0]}, ValueError, "input_ids"),
        ("ids strided", {"input_ids": ids.t()}, ValueError, "input_ids"),
        ("types int32", {"token_type_ids": case["token_type_ids"].int()}, TypeError, "token_type_ids"),
        ("types shape", {"token_type_ids": case["token_type_ids"][:2]}, ValueError, "token_type_ids"),
        ("mask float", {"attention_mask": case["attention_mask"].float()}, TypeError, "attention_mask"),
        ("mask shape", {"attention_mask": case["attention_mask"][:, :5]}, ValueError, "attention_mask"),
        ("word int", {"word_embeddings": table.long()}, TypeError, "word_embeddings"),
        ("word 1-d", {"word_embeddings": table[0]}, ValueError, "word_embeddings"),
        ("word no rows", {"word_embeddings": table[:0]}, ValueError, "word_embeddings"),
        ("position dtype", {"position_embeddings": case["position_embeddings"].double()}, TypeError, "position"),
        ("position short", {"position_embeddings": case["position_embeddings"][:7]}, ValueError, "position"),
        (
            "position width",
            {"position_embeddings": case["position_embeddings"][:, :5].contiguous()},
            ValueError,
            "position",
        ),
        ("types table empty", {"token_type_embeddings": case["token_type_embeddings"][:0]}, ValueError, "token_type"),
        (
            "types table width",
            {"token_type_embeddings": table[:2, :7].contiguous()},
            ValueError,
            "token_type_embeddings",
        ),
        ("weight shape", {"norm_weight": case["norm_weight"][:3]}, ValueError, "norm_weight"),
        ("weight dtype", {"norm_weight": case["norm_weight"].half()}, TypeError, "norm_weight"),
        ("bias 2-d", {"norm_bias": case["norm_bias"][None]}, ValueError, "norm_bias"),
        ("eps tensor", {"eps": torch.tensor(1e-5)}, TypeError, "eps"),
        ("eps bool", {"eps": True}, TypeError, "eps"),
        ("eps zero", {"eps": 0.0}, ValueError, "eps"),
        ("eps nan", {"eps": float("nan")}, ValueError, "eps"),
        ("backend", {"backend": "cuda"}, ValueError, "backend"),
        ("validate", {"validate": 1}, TypeError, "validate"),
        ("float64 on triton", {**{k: case[k].double() for k in TABLES}, "backend": "triton"}, TypeError, "triton"),
    ]
    if ON_GPU:
        bad += [
            ("mask on cpu", {"attention_mask": case["attention_mask"].cpu()}, ValueError, "attention_mask"),
            ("word on cpu", {"word_embeddings": table.cpu()}, ValueError, "word_embeddings"),
        ]
    return [(label, {**case, "eps": EPS, **change}, error, match) for label, change, error, match in bad]


@pytest.mark.parametrize(
    ("label", "kwargs", "error", "match"), _bad_inputs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_bad_inputs_raise_before_any_kernel(label: str, kwargs: dict, error: type[Exception], match: str, monkeypatch):
    monkeypatch.setattr(embed_pack_module, "embed_pack_torch", kernel_must_not_run)
    monkeypatch.setattr(triton_embed_pack, "embed_pack_triton", kernel_must_not_run)
    with pytest.raises(error, match=match):
        embed_pack(**kwargs)


@pytest.mark.skipif(not ON_GPU, reason="host synchronisations and CUDA graphs need a GPU")
def test_one_capturable_launch_without_host_reads() -> None:
    """No host read with ``validate=False``; captured once, replayed after new ids and masks are written in."""
    case = make_case(8, WIDTH, torch.bfloat16, seed=10)
    assert_no_host_synchronisation(lambda: embed_pack(**case, eps=EPS, validate=False))
    graph, outputs = capture_cuda_graph(lambda: embed_pack(**case, eps=EPS, validate=False))
    fresh = make_case(8, WIDTH, torch.bfloat16, seed=11)
    for name in ("input_ids", "token_type_ids"):
        case[name].copy_(fresh[name])
    case["attention_mask"].copy_(fresh["attention_mask"].flip(0))
    graph.replay()
    check(outputs, case, torch.bfloat16)
