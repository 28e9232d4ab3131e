"""Flax NNX layers with bitsandbytes' 4-bit weights."""

from jaxbnb._src.nnx_layers import Linear4bit as Linear4bit
from jaxbnb._src.nnx_layers import LinearFP4 as LinearFP4
from jaxbnb._src.nnx_layers import LinearNF4 as LinearNF4
from jaxbnb._src.nnx_layers import QuantizedWeight as QuantizedWeight
from jaxbnb._src.quantize_model import DEFAULT_SKIP_MODULES as DEFAULT_SKIP_MODULES
from jaxbnb._src.quantize_model import memory_footprint as memory_footprint
from jaxbnb._src.quantize_model import quantize_params as quantize_params

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "Linear4bit",
    "LinearFP4",
    "LinearNF4",
    "QuantizedWeight",
    "memory_footprint",
    "quantize_params",
]
