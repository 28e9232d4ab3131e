"""LoRA and QLoRA adapters for jaxbnb models, in PEFT's format.

`apply_lora` adds trainable adapters (`nnx.LoRAParam`) to the float or
4-bit linears of a model; `save_adapter` / `load_adapter` write and read
PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`),
so adapters move between jaxbnb and `peft` both ways; `merge_lora` folds
them into the base weights. See docs/lora.md.
"""

from jaxbnb._src.io.peft import adapter_state_dict as adapter_state_dict
from jaxbnb._src.io.peft import load_adapter as load_adapter
from jaxbnb._src.io.peft import read_adapter as read_adapter
from jaxbnb._src.io.peft import save_adapter as save_adapter
from jaxbnb._src.layers.lora import Dense4bitLoRA as Dense4bitLoRA
from jaxbnb._src.layers.lora import LoRAConfig as LoRAConfig
from jaxbnb._src.layers.lora import LoRALinear as LoRALinear
from jaxbnb._src.layers.lora_bias import LoRABias as LoRABias
from jaxbnb._src.layers.lora import apply_lora as apply_lora
from jaxbnb._src.layers.lora import find_targets as find_targets
from jaxbnb._src.layers.lora import merge_lora as merge_lora
from jaxbnb._src.layers.lora import unload_lora as unload_lora

__all__ = [
    "Dense4bitLoRA",
    "LoRABias",
    "LoRAConfig",
    "LoRALinear",
    "adapter_state_dict",
    "apply_lora",
    "find_targets",
    "load_adapter",
    "merge_lora",
    "read_adapter",
    "save_adapter",
    "unload_lora",
]
