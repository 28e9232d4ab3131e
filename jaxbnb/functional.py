"""bitsandbytes' `functional` API for JAX: 4-bit and 8-bit quantization ops.

Names, defaults and semantics follow `bitsandbytes.functional`; results are
bit-identical to bitsandbytes' CUDA kernels (see docs/porting.md for the
few documented exceptions).
"""

from jaxbnb._src.quant.codebooks import create_dynamic_map as create_dynamic_map
from jaxbnb._src.quant.codebooks import create_fp8_map as create_fp8_map
from jaxbnb._src.quant.codebooks import create_linear_map as create_linear_map
from jaxbnb._src.quant.codebooks import create_normal_map as create_normal_map
from jaxbnb._src.quant.codebooks import get_4bit_type as get_4bit_type
from jaxbnb._src.quant.int8 import int8_double_quant as int8_double_quant
from jaxbnb._src.quant.int8 import int8_linear_matmul as int8_linear_matmul
from jaxbnb._src.quant.int8 import matmul_8bit as matmul_8bit
from jaxbnb._src.quant.int8 import matmul_8bit_fp16_weights as matmul_8bit_fp16_weights
from jaxbnb._src.quant.int8 import quantize_int8_weight as quantize_int8_weight
from jaxbnb._src.quant.matmul import matmul_4bit as matmul_4bit
from jaxbnb._src.quant.matmul import matmul_4bit_group as matmul_4bit_group
from jaxbnb._src.quant.matmul import matmul_4bit_swiglu as matmul_4bit_swiglu
from jaxbnb._src.quant.matmul import matmul_int8 as matmul_int8
from jaxbnb._src.quant.ops import dequantize_4bit as dequantize_4bit
from jaxbnb._src.quant.ops import dequantize_blockwise as dequantize_blockwise
from jaxbnb._src.quant.ops import dequantize_fp4 as dequantize_fp4
from jaxbnb._src.quant.ops import dequantize_nf4 as dequantize_nf4
from jaxbnb._src.quant.ops import int8_mm_dequant as int8_mm_dequant
from jaxbnb._src.quant.ops import int8_vectorwise_dequant as int8_vectorwise_dequant
from jaxbnb._src.quant.ops import int8_vectorwise_quant as int8_vectorwise_quant
from jaxbnb._src.quant.ops import int8_vectorwise_quant_mask as int8_vectorwise_quant_mask
from jaxbnb._src.quant.ops import quantize_4bit as quantize_4bit
from jaxbnb._src.quant.ops import quantize_blockwise as quantize_blockwise
from jaxbnb._src.quant.ops import quantize_fp4 as quantize_fp4
from jaxbnb._src.quant.ops import quantize_nf4 as quantize_nf4
from jaxbnb._src.quant.weights import Int8Params as Int8Params
from jaxbnb._src.quant.weights import Params4bit as Params4bit
from jaxbnb._src.quant.weights import QuantizedArray as QuantizedArray
from jaxbnb._src.quant.state import QuantState as QuantState

__all__ = [
    "Int8Params",
    "Params4bit",
    "QuantState",
    "QuantizedArray",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_nf4",
    "get_4bit_type",
    "int8_double_quant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "int8_vectorwise_quant_mask",
    "matmul_4bit",
    "matmul_4bit_group",
    "matmul_4bit_swiglu",
    "matmul_8bit",
    "matmul_8bit_fp16_weights",
    "matmul_int8",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_int8_weight",
    "quantize_nf4",
]
