"""jaxbnb: bitsandbytes for JAX.

4-bit NF4/FP4 weights with double quantization and LLM.int8 numerics,
bit-compatible with bitsandbytes, for Flax (`jaxbnb.linen`, `jaxbnb.nnx`).
Flax-dependent modules are imported on demand: `import jaxbnb.nnx`.
"""

from jaxbnb import functional as functional
from jaxbnb._src.quant.dispatch import MODES as KERNEL_MODES
from jaxbnb._src.quant.dispatch import get_kernel_mode as get_kernel_mode
from jaxbnb._src.quant.dispatch import kernel_mode as kernel_mode
from jaxbnb._src.quant.dispatch import set_kernel_mode as set_kernel_mode
from jaxbnb._src.quant.weights import Params4bit as Params4bit
from jaxbnb._src.quant.state import QuantState as QuantState

__version__ = "0.1.0"

__all__ = [
    "KERNEL_MODES",
    "Params4bit",
    "QuantState",
    "__version__",
    "functional",
    "get_kernel_mode",
    "kernel_mode",
    "set_kernel_mode",
]
