"""bitsandbytes' 8-bit (and 32-bit, paged) optimizers for Optax.

Every factory returns an `optax.GradientTransformation` and mirrors a
`bitsandbytes.optim` class (`adamw8bit` <-> `AdamW8bit`), with its defaults
and update order; the `scale_by_*8bit` blocks give the update direction for
`optax.chain`; `fused_step` / `apply_updates_fused` run an alias's step in
place (donated buffers), bit-identical to `tx.update` then
`optax.apply_updates`. Importing this module needs JAX and Optax only (no
Flax).
See docs/optim.md for the semantics.
"""

from jaxbnb._src.optim.aliases import adagrad32bit as adagrad32bit
from jaxbnb._src.optim.aliases import adagrad8bit as adagrad8bit
from jaxbnb._src.optim.aliases import adam32bit as adam32bit
from jaxbnb._src.optim.aliases import adam8bit as adam8bit
from jaxbnb._src.optim.aliases import adamw32bit as adamw32bit
from jaxbnb._src.optim.aliases import adamw8bit as adamw8bit
from jaxbnb._src.optim.aliases import ademamix32bit as ademamix32bit
from jaxbnb._src.optim.aliases import ademamix8bit as ademamix8bit
from jaxbnb._src.optim.trust_ratio import lamb32bit as lamb32bit
from jaxbnb._src.optim.trust_ratio import lamb8bit as lamb8bit
from jaxbnb._src.optim.trust_ratio import lars32bit as lars32bit
from jaxbnb._src.optim.trust_ratio import lars8bit as lars8bit
from jaxbnb._src.optim.aliases import lion32bit as lion32bit
from jaxbnb._src.optim.aliases import lion8bit as lion8bit
from jaxbnb._src.optim.aliases import paged_adam32bit as paged_adam32bit
from jaxbnb._src.optim.aliases import paged_adam8bit as paged_adam8bit
from jaxbnb._src.optim.aliases import paged_adamw32bit as paged_adamw32bit
from jaxbnb._src.optim.aliases import paged_adamw8bit as paged_adamw8bit
from jaxbnb._src.optim.aliases import paged_ademamix32bit as paged_ademamix32bit
from jaxbnb._src.optim.aliases import paged_ademamix8bit as paged_ademamix8bit
from jaxbnb._src.optim.aliases import paged_lion32bit as paged_lion32bit
from jaxbnb._src.optim.aliases import paged_lion8bit as paged_lion8bit
from jaxbnb._src.optim.aliases import rmsprop32bit as rmsprop32bit
from jaxbnb._src.optim.aliases import rmsprop8bit as rmsprop8bit
from jaxbnb._src.optim.aliases import scale_by_adagrad8bit as scale_by_adagrad8bit
from jaxbnb._src.optim.aliases import scale_by_adam8bit as scale_by_adam8bit
from jaxbnb._src.optim.aliases import scale_by_ademamix8bit as scale_by_ademamix8bit
from jaxbnb._src.optim.aliases import scale_by_lion8bit as scale_by_lion8bit
from jaxbnb._src.optim.aliases import scale_by_momentum8bit as scale_by_momentum8bit
from jaxbnb._src.optim.aliases import scale_by_rmsprop8bit as scale_by_rmsprop8bit
from jaxbnb._src.optim.aliases import sgd32bit as sgd32bit
from jaxbnb._src.optim.aliases import sgd8bit as sgd8bit
from jaxbnb._src.optim.fused import apply_updates_fused as apply_updates_fused
from jaxbnb._src.optim.fused import fused_step as fused_step
from jaxbnb._src.optim.rules import Hyper as Hyper
from jaxbnb._src.optim.state import Optimizer8bitState as Optimizer8bitState
from jaxbnb._src.optim.state import Quantized8bit as Quantized8bit
from jaxbnb._src.optim.state import quantize_state as quantize_state
from jaxbnb._src.optim.interop import from_bnb_state_dict as from_bnb_state_dict
from jaxbnb._src.optim.interop import to_bnb_state_dict as to_bnb_state_dict
from jaxbnb._src.optim.interop import to_torch_state_dict as to_torch_state_dict

__all__ = [
    "Hyper",
    "Optimizer8bitState",
    "Quantized8bit",
    "adagrad32bit",
    "adagrad8bit",
    "adam32bit",
    "adam8bit",
    "adamw32bit",
    "adamw8bit",
    "ademamix32bit",
    "ademamix8bit",
    "apply_updates_fused",
    "lamb32bit",
    "lamb8bit",
    "lars32bit",
    "lars8bit",
    "lion32bit",
    "lion8bit",
    "paged_adam32bit",
    "paged_adam8bit",
    "paged_adamw32bit",
    "paged_adamw8bit",
    "paged_ademamix32bit",
    "paged_ademamix8bit",
    "paged_lion32bit",
    "paged_lion8bit",
    "from_bnb_state_dict",
    "fused_step",
    "quantize_state",
    "rmsprop32bit",
    "rmsprop8bit",
    "scale_by_adagrad8bit",
    "scale_by_adam8bit",
    "scale_by_ademamix8bit",
    "scale_by_lion8bit",
    "scale_by_momentum8bit",
    "scale_by_rmsprop8bit",
    "sgd32bit",
    "sgd8bit",
    "to_bnb_state_dict",
    "to_torch_state_dict",
]
