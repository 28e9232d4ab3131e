"""Llama-family language models and what runs them.

What lives here: `LlamaConfig` (`config`), rotary embeddings (`rope`), the
KV cache (`kv_cache`), the model (`llama`), sampling (`sampling`),
generation (`generate`), tensor-parallel decoding of a sharded model
(`tensor_parallel`) and perplexity (`perplexity`). Every linear comes
from `layers.factory.make_linear`.

May import: `layers`, `quant`, Flax, jax, numpy. Never io or tools
(tokenizers and checkpoints come in as arguments).
"""
