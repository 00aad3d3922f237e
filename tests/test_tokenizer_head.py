"""The fused tokenizer head (ReLU -> 1x1 conv -> argmax) against the reference, under TRITON_INTERPRET on the CPU."""

import pytest
import torch

from beit_fast.kernels.tokenizer_head import tokenizer_head_argmax, tokenizer_head_argmax_ref


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


def test_bad_shapes():
    with pytest.raises(ValueError, match="features"):
        tokenizer_head_argmax(torch.randn(2, 8, 9), torch.randn(4, 8))
    with pytest.raises(ValueError, match="weight"):
        tokenizer_head_argmax(torch.randn(1, 8, 2, 2), torch.randn(4, 7))
    with pytest.raises(ValueError, match="bias"):
        tokenizer_head_argmax(torch.randn(1, 8, 2, 2), torch.randn(4, 8), torch.randn(3))


@pytest.mark.gpu
def test_gpu_bf16_agreement():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 2048, 14, 14, device="cuda", generator=g).bfloat16().to(memory_format=torch.channels_last)
    w = torch.randn(8192, 2048, device="cuda", generator=g).bfloat16() * 0.02
    b = torch.randn(8192, device="cuda", generator=g).bfloat16() * 0.02
    got = tokenizer_head_argmax(x, w, b)
    exact = tokenizer_head_argmax_ref(x.double(), w.double(), b.double())
    torch_bf16 = tokenizer_head_argmax_ref(x, w, b)
    agree_kernel = (got == exact).float().mean().item()
    agree_torch = (torch_bf16 == exact).float().mean().item()
    assert agree_kernel >= agree_torch - 0.01, (agree_kernel, agree_torch)
