"""int8 quantization: per-channel symmetric weights, weight-only (w8) and dynamic W8A8, the tied word table as int8
rows; 4-bit group weights (W4A8, quant.int4); weights packed once for the native kernels (decoding); checkpoints; size
report."""

from jaxfound.quant.checkpoint import load_quantized, save_quantized
from jaxfound.quant.int4 import ALL_MODES, dequantize, quantize_params
from jaxfound.quant.int8 import (
    DEFAULT_RULES,
    MODES,
    Rule,
    dequantize_kernel,
    int8_matmul,
    quantize,
    quantize_activations,
    quantize_kernel,
    quantize_plan,
    quantize_tied_embedding,
    quantized_dot,
)
from jaxfound.quant.packed import pack_kernel, pack_params, packed_dot
from jaxfound.quant.report import size_report

__all__ = [
    "ALL_MODES", "DEFAULT_RULES", "MODES", "Rule", "dequantize", "dequantize_kernel", "int8_matmul", "load_quantized",
    "pack_kernel", "pack_params", "packed_dot", "quantize", "quantize_activations", "quantize_kernel", "quantize_plan",
    "quantize_params", "quantize_tied_embedding", "quantized_dot", "save_quantized", "size_report",
]
