"""Flax NNX layers with bitsandbytes' 4-bit weights."""

from jaxbnb._src.layers.linear4bit import Linear4bit as Linear4bit
from jaxbnb._src.layers.linear4bit import LinearFP4 as LinearFP4
from jaxbnb._src.layers.linear4bit import LinearNF4 as LinearNF4
from jaxbnb._src.layers.linear4bit import QuantizedWeight as QuantizedWeight
from jaxbnb._src.layers.quantize_model import DEFAULT_SKIP_MODULES as DEFAULT_SKIP_MODULES
from jaxbnb._src.layers.quantize_model import memory_footprint as memory_footprint
from jaxbnb._src.layers.quantize_model import quantize_params as quantize_params

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "Linear4bit",
    "LinearFP4",
    "LinearNF4",
    "QuantizedWeight",
    "memory_footprint",
    "quantize_params",
]
