"""Flax NNX layers with bitsandbytes' quantized weights, and the linear factory."""

from jaxbnb._src.layers.linear4bit import Linear4bit as Linear4bit
from jaxbnb._src.layers.linear4bit import LinearFP4 as LinearFP4
from jaxbnb._src.layers.linear4bit import LinearNF4 as LinearNF4
from jaxbnb._src.layers.common import QuantizedLinear as QuantizedLinear
from jaxbnb._src.layers.common import QuantizedWeight as QuantizedWeight
from jaxbnb._src.layers.factory import make_linear as make_linear
from jaxbnb._src.layers.factory import weight_format as weight_format
from jaxbnb._src.layers.linear import Linear as Linear
from jaxbnb._src.layers.skip import DEFAULT_SKIP_MODULES as DEFAULT_SKIP_MODULES
from jaxbnb._src.layers.quantize_model import memory_footprint as memory_footprint
from jaxbnb._src.layers.quantize_model import quantize_params as quantize_params

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "Linear",
    "Linear4bit",
    "LinearFP4",
    "LinearNF4",
    "QuantizedLinear",
    "QuantizedWeight",
    "make_linear",
    "memory_footprint",
    "quantize_params",
    "weight_format",
]
