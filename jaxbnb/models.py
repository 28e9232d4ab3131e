"""Llama-family language models (Llama, Mistral, Qwen2) in Flax NNX.

`LlamaForCausalLM` loads Hugging Face checkpoints name for name and can put
its linear layers in bitsandbytes' 4-bit format (`QuantizationConfig`).
"""

from jaxbnb._src.kv_cache import KVCache as KVCache
from jaxbnb._src.llama import LlamaForCausalLM as LlamaForCausalLM
from jaxbnb._src.llama_config import LlamaConfig as LlamaConfig
from jaxbnb._src.quant_config import QuantizationConfig as QuantizationConfig

__all__ = [
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "QuantizationConfig",
]
