"""The fused tokenizer head (ReLU -> 1x1 conv -> argmax) against the reference, under TRITON_INTERPRET on the CPU."""

import pytest
import torch

from beit_fast.kernels.tokenizer_head import head_argmax_config, tokenizer_head_argmax, tokenizer_head_argmax_ref


@pytest.mark.parametrize(
    "B,C,h,w,V,bias,channels_last",
    [(2, 48, 3, 5, 100, True, False), (1, 64, 4, 4, 257, False, True), (3, 40, 2, 2, 64, True, False),
     (1, 96, 7, 7, 1000, True, True)],
)
def test_matches_reference(B, C, h, w, V, bias, channels_last):
    g = torch.Generator().manual_seed(B * C + V)
    x = torch.randn(B, C, h, w, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.randn(V, C, 1, 1, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    got = tokenizer_head_argmax(x, weight, b)
    want = tokenizer_head_argmax_ref(x, weight, b)
    assert got.shape == (B, h * w) and got.dtype == torch.int64
    # fp32 sums in another order could flip a near-tie; random data has none at this size.
    assert torch.equal(got, want)


def test_ties_go_to_the_first_index_across_blocks():
    x = torch.randint(1, 4, (2, 8, 3, 3)).float()  # integer features: every dot product is exact, ties are exact
    w = torch.zeros(300, 8)
    w[[5, 70, 129, 299]] = 1.0  # equal best logits in several vocabulary blocks
    assert torch.equal(tokenizer_head_argmax(x, w), torch.full((2, 9), 5))
    assert torch.equal(tokenizer_head_argmax_ref(x, w), torch.full((2, 9), 5))
    # ReLU on load: all-negative features give all-zero logits, so the bias decides.
    b = torch.zeros(300)
    b[42] = 1.0
    assert torch.equal(tokenizer_head_argmax(-x, w, b), torch.full((2, 9), 42))


@pytest.mark.parametrize(
    "B,C,h,w,V,splits",
    [(3, 40, 3, 5, 333, 3), (1, 24, 1, 1, 129, 2), (2, 72, 7, 3, 1000, 5), (1, 16, 2, 2, 65, 8)],
)
def test_split_vocabulary_matches_reference(B, C, h, w, V, splits):
    """The vocabulary cut across programs (partial max/argmax per slice + the reduce kernel): awkward V (a ragged
    last block and slice), pixel counts that are not a multiple of the pixel block, more slices than blocks."""
    g = torch.Generator().manual_seed(V + splits)
    x = torch.randn(B, C, h, w, generator=g).to(memory_format=torch.channels_last)
    weight, b = torch.randn(V, C, generator=g), torch.randn(V, generator=g)
    cfg = head_argmax_config(B * h * w, V, False, splits)
    # Slices of whole vocabulary blocks, none empty (16 blocks in 5 slices -> 4 slices of 4).
    assert 2 <= cfg["splits"] <= splits and (cfg["splits"] - 1) * cfg["v_per_split"] < V <= cfg["splits"] * cfg[
        "v_per_split"], cfg
    got = tokenizer_head_argmax(x, weight, b, splits=splits)
    assert torch.equal(got, tokenizer_head_argmax_ref(x, weight, b))


def test_split_ties_go_to_the_first_index_across_slices():
    x = torch.randint(1, 4, (2, 8, 3, 3)).float()  # integer features: exact dot products, exact ties
    w = torch.zeros(300, 8)
    w[[70, 129, 200, 299]] = 1.0  # equal best logits in several slices (64-wide vocabulary blocks)
    for splits in (2, 3, 5):
        assert torch.equal(tokenizer_head_argmax(x, w, splits=splits), torch.full((2, 9), 70)), splits
    # A slice whose logits are all -inf names one of its own entries; the first finite maximum still wins.
    b = torch.zeros(300)
    b[:150] = float("-inf")
    b[[151, 250]] = 1.0
    want = tokenizer_head_argmax_ref(-x, w, b)
    assert torch.equal(want, torch.full((2, 9), 151))
    assert torch.equal(tokenizer_head_argmax(-x, w, b, splits=4), want)


def test_split_choice_fills_whole_waves():
    """The launcher's choice at the 112px shape (B=128: 25088 pixels, 8192 codes) and at small batches."""
    cfg = head_argmax_config(128 * 196, 8192, True)
    assert (cfg["BLOCK_P"], cfg["splits"]) == (128, 2), cfg  # 196 pixel blocks x 2 = 392 programs: 2.97 waves
    assert head_argmax_config(8 * 196, 8192, True)["splits"] == 8  # 13 pixel blocks: the vocabulary fills the card
    assert head_argmax_config(128 * 196, 8192, False)["splits"] == 1  # the interpreter gains nothing from slices
    assert head_argmax_config(100, 200, True)["splits"] == 1  # two vocabulary blocks: nothing to split


def test_bad_shapes():
    with pytest.raises(ValueError, match="features"):
        tokenizer_head_argmax(torch.randn(2, 8, 9), torch.randn(4, 8))
    with pytest.raises(ValueError, match="weight"):
        tokenizer_head_argmax(torch.randn(1, 8, 2, 2), torch.randn(4, 7))
    with pytest.raises(ValueError, match="bias"):
        tokenizer_head_argmax(torch.randn(1, 8, 2, 2), torch.randn(4, 8), torch.randn(3))


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 4])
def test_gpu_bf16_agreement(splits):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 2048, 14, 14, device="cuda", generator=g).bfloat16().to(memory_format=torch.channels_last)
    w = torch.randn(8192, 2048, device="cuda", generator=g).bfloat16() * 0.02
    b = torch.randn(8192, device="cuda", generator=g).bfloat16() * 0.02
    got = tokenizer_head_argmax(x, w, b, splits=splits)
    exact = tokenizer_head_argmax_ref(x.double(), w.double(), b.double())
    torch_bf16 = tokenizer_head_argmax_ref(x, w, b)
    agree_kernel = (got == exact).float().mean().item()
    agree_torch = (torch_bf16 == exact).float().mean().item()
    assert agree_kernel >= agree_torch - 0.01, (agree_kernel, agree_torch)
    # bf16 features with fp16 weights (the tokenizer's pairing): at least as close to float64 as all-bf16.
    mixed = tokenizer_head_argmax(x, w.half(), b.half(), splits=splits)
    exact16 = tokenizer_head_argmax_ref(x.double(), w.half().double(), b.half().double())
    assert (mixed == exact16).float().mean().item() >= agree_torch - 0.01
