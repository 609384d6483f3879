"""Pure tensor quantization code: NF codebooks, integer codes with zero points, block scales,
affine/binary RTN, bit packing.

No model, file or solver code lives here. Every stored array is counted exactly as
:class:`bitalloc.configs.QuantConfig` (and :func:`affine_storage_bits` /
:func:`binary_storage_bits`) account for it, up to one byte of padding per array.
"""

from bitalloc.quant.affine import (
    AffineQuantized,
    BinaryQuantized,
    affine_storage_bits,
    binary_storage_bits,
    quantize_affine,
    quantize_binary,
)
from bitalloc.quant.blockwise import QuantizedTensor, quantize, quantize_dequantize, quantize_residual
from bitalloc.quant.nf import nf_codebook, nf_decode, nf_encode, nf_zero_code
from bitalloc.quant.packing import pack_bits, packed_nbytes, unpack_bits

__all__ = [
    "AffineQuantized",
    "BinaryQuantized",
    "QuantizedTensor",
    "affine_storage_bits",
    "binary_storage_bits",
    "nf_codebook",
    "nf_decode",
    "nf_encode",
    "nf_zero_code",
    "pack_bits",
    "packed_nbytes",
    "quantize",
    "quantize_affine",
    "quantize_binary",
    "quantize_dequantize",
    "quantize_residual",
    "unpack_bits",
]
