import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.quant import pack_bits, packed_nbytes, unpack_bits

LENGTHS = [0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 63, 64, 65, 127, 1000, 1001]


def _reference_pack(codes: list[int], width: int) -> bytes:
    """Bit-by-bit little-endian reference."""
    out = bytearray(math.ceil(len(codes) * width / 8))
    for i, c in enumerate(codes):
        for b in range(width):
            if (c >> b) & 1:
                k = i * width + b
                out[k // 8] |= 1 << (k % 8)
    return bytes(out)


@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_every_width_and_length(width, n, gen):
    codes = torch.randint(0, 2**width, (n,), generator=gen, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, width)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(n * width / 8) == packed_nbytes(n, width)
    assert torch.equal(unpack_bits(packed, width, n), codes)


@pytest.mark.parametrize("width", range(1, 9))
def test_matches_bit_by_bit_reference(width, gen):
    codes = torch.randint(0, 2**width, (37,), generator=gen)
    packed = pack_bits(codes, width)
    assert bytes(packed.tolist()) == _reference_pack(codes.tolist(), width)


def test_three_bit_codes_cross_byte_boundaries():
    # codes 0b101, 0b011, 0b111 -> stream bits 101 110 111 (LSB first) -> 0b11_011_101, 0b1
    packed = pack_bits(torch.tensor([5, 3, 7], dtype=torch.uint8), 3)
    assert packed.tolist() == [0b11011101, 0b1]


def test_any_shape_and_integer_dtype(gen):
    codes = torch.randint(0, 8, (3, 5, 7), generator=gen, dtype=torch.int32)
    packed = pack_bits(codes, 3)
    assert torch.equal(unpack_bits(packed, 3, codes.numel()), codes.reshape(-1).to(torch.uint8))


def test_chunked_path_matches(monkeypatch, gen):
    import bitalloc.quant.packing as packing

    codes = torch.randint(0, 32, (1003,), generator=gen).to(torch.uint8)
    whole = pack_bits(codes, 5)
    monkeypatch.setattr(packing, "_CHUNK_CODES", 64)
    assert torch.equal(pack_bits(codes, 5), whole)
    assert torch.equal(unpack_bits(whole, 5, 1003), codes)


@pytest.mark.parametrize("width", range(1, 9))
def test_out_of_range_values_rejected(width):
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor([0, 2**width], dtype=torch.int64), width)
    with pytest.raises(ValueError, match="must lie in"):
        pack_bits(torch.tensor([-1, 0], dtype=torch.int64), width)


@pytest.mark.parametrize("width", [0, 9, -1, 2.0, True])
def test_bad_width_rejected(width):
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), width)
    with pytest.raises(ValueError, match="bit width"):
        unpack_bits(torch.zeros(4, dtype=torch.uint8), width, 4)


def test_bad_inputs_rejected():
    with pytest.raises(ValueError, match="integer dtype"):
        pack_bits(torch.zeros(4), 4)
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int32), 4, 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 5)
    with pytest.raises(ValueError, match=">= 0"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, -1)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), width=st.integers(1, 8))
def test_round_trip_property(data, width):
    values = data.draw(st.lists(st.integers(0, 2**width - 1), max_size=200))
    codes = torch.tensor(values, dtype=torch.uint8)
    packed = pack_bits(codes, width)
    assert packed.numel() == math.ceil(len(values) * width / 8)
    assert bytes(packed.tolist()) == _reference_pack(values, width)
    assert unpack_bits(packed, width, len(values)).tolist() == values


@settings(max_examples=100, deadline=None)
@given(data=st.data(), width=st.integers(1, 8))
def test_prefix_unpacking_property(data, width):
    """Unpacking a prefix of the stream gives the prefix of the codes (extra bytes ignored)."""
    values = data.draw(st.lists(st.integers(0, 2**width - 1), min_size=1, max_size=100))
    k = data.draw(st.integers(0, len(values)))
    packed = pack_bits(torch.tensor(values, dtype=torch.uint8), width)
    assert unpack_bits(packed, width, k).tolist() == values[:k]
