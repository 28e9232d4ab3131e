"""jaxbnb: bitsandbytes for JAX.

4-bit NF4/FP4 weights with double quantization and LLM.int8 numerics,
bit-compatible with bitsandbytes, for Flax (`jaxbnb.linen`, `jaxbnb.nnx`).
Flax-dependent modules are imported on demand: `import jaxbnb.nnx`.
"""

from jaxbnb import functional as functional
from jaxbnb._src.quant_state import Params4bit as Params4bit
from jaxbnb._src.quant_state import QuantState as QuantState

__version__ = "0.1.0"

__all__ = ["Params4bit", "QuantState", "__version__", "functional"]
