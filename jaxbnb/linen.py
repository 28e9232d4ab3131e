"""Flax Linen layers with bitsandbytes' 4-bit and LLM.int8 weights."""

from jaxbnb._src.layers.dense4bit import QUANTIZED as QUANTIZED
from jaxbnb._src.layers.dense4bit import Dense4bit as Dense4bit
from jaxbnb._src.layers.dense4bit import DenseFP4 as DenseFP4
from jaxbnb._src.layers.dense4bit import DenseNF4 as DenseNF4
from jaxbnb._src.layers.dense8bit import Dense8bit as Dense8bit
from jaxbnb._src.layers.skip import DEFAULT_SKIP_MODULES as DEFAULT_SKIP_MODULES
from jaxbnb._src.layers.quantize_model import memory_footprint as memory_footprint
from jaxbnb._src.layers.quantize_model import quantize_params as quantize_params

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "Dense4bit",
    "Dense8bit",
    "DenseFP4",
    "DenseNF4",
    "QUANTIZED",
    "memory_footprint",
    "quantize_params",
]
