"""Llama-family language models (Llama, Mistral, Qwen2) in Flax NNX.

`LlamaForCausalLM` loads Hugging Face checkpoints name for name and can put
its linear layers in bitsandbytes' 4-bit format (`QuantizationConfig`);
`generate` / `generate_text` decode with a KV cache; `perplexity` and
`estimate_memory` evaluate and size a model.

Example usage::

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxbnb import models
  >>> cfg = models.LlamaConfig(vocab_size=64, hidden_size=64,
  ...                          intermediate_size=128, num_hidden_layers=2,
  ...                          num_attention_heads=4, num_key_value_heads=2)
  >>> model = models.LlamaForCausalLM(
  ...     cfg, quantization=models.QuantizationConfig.nf4(), rngs=nnx.Rngs(0))
  >>> out = models.generate(model, [[1, 2, 3]], max_new_tokens=5,
  ...                       stop_token_ids=())
  >>> len(out.sequences[0])
  5
"""

from jaxbnb._src.io.convert import from_pretrained as from_pretrained
from jaxbnb._src.io.convert import save_pretrained as save_pretrained
from jaxbnb._src.io.estimate import MemoryEstimate as MemoryEstimate
from jaxbnb._src.io.estimate import TrainingMemoryEstimate as TrainingMemoryEstimate
from jaxbnb._src.io.estimate import estimate_memory as estimate_memory
from jaxbnb._src.io.estimate import estimate_training_memory as estimate_training_memory
from jaxbnb._src.models.generate import GenerationConfig as GenerationConfig
from jaxbnb._src.models.generate import GenerationResult as GenerationResult
from jaxbnb._src.models.generate import Generator as Generator
from jaxbnb._src.models.generate import generate as generate
from jaxbnb._src.models.generate import generate_text as generate_text
from jaxbnb._src.models.kv_cache import KVCache as KVCache
from jaxbnb._src.models.llama import LlamaForCausalLM as LlamaForCausalLM
from jaxbnb._src.models.config import LlamaConfig as LlamaConfig
from jaxbnb._src.models.perplexity import PerplexityResult as PerplexityResult
from jaxbnb._src.models.perplexity import evaluate_text as evaluate_text
from jaxbnb._src.models.perplexity import perplexity as perplexity
from jaxbnb._src.layers.quant_config import QuantizationConfig as QuantizationConfig

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "Generator",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "MemoryEstimate",
    "PerplexityResult",
    "QuantizationConfig",
    "TrainingMemoryEstimate",
    "estimate_memory",
    "estimate_training_memory",
    "evaluate_text",
    "from_pretrained",
    "generate",
    "generate_text",
    "perplexity",
    "save_pretrained",
]
