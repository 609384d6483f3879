import pytest
import torch

from bitalloc.quant import nf_codebook, nf_decode, nf_encode, nf_zero_code

# QLoRA's published NF4 table (bitsandbytes, Dettmers et al. 2023).
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_shape_order_zero_and_ends(bits):
    levels = nf_codebook(bits)
    assert levels.dtype == torch.float32 and levels.shape == (2**bits,)
    assert bool((levels[1:] > levels[:-1]).all())
    assert levels[0].item() == -1.0 and levels[-1].item() == 1.0
    assert (levels == 0).sum().item() == 1
    assert levels[nf_zero_code(bits)].item() == 0.0
    # one more positive level than negative ones
    assert (levels > 0).sum().item() == 2 ** (bits - 1)


def test_nf4_matches_qlora_table():
    assert torch.allclose(nf_codebook(4), torch.tensor(QLORA_NF4), atol=1e-4, rtol=0)


def test_codebook_is_a_copy():
    levels = nf_codebook(4)
    levels += 1
    assert nf_codebook(4)[0].item() == -1.0


@pytest.mark.parametrize("bits", [1, 5, 16, "4"])
def test_unsupported_bits_rejected(bits):
    with pytest.raises(ValueError, match="NF codebooks"):
        nf_codebook(bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_encode_is_nearest_level(bits, gen):
    levels = nf_codebook(bits)
    y = torch.rand(5000, generator=gen) * 2.4 - 1.2
    codes = nf_encode(y, bits)
    brute = (y.unsqueeze(1) - levels).abs().argmin(dim=1)
    # ties (measure zero) aside, nearest-level search agrees with brute force
    assert torch.equal(codes.long(), brute)
    assert codes.dtype == torch.uint8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_encode_zero_ends_and_clamping(bits):
    y = torch.tensor([0.0, -0.0, 1.0, -1.0, 5.0, -7.0, float("inf"), float("-inf")])
    codes = nf_encode(y, bits).tolist()
    top = 2**bits - 1
    assert codes == [nf_zero_code(bits)] * 2 + [top, 0, top, 0, top, 0]
    assert torch.equal(nf_decode(nf_encode(nf_codebook(bits), bits), bits), nf_codebook(bits))
