"""Llama-family decoders (Llama, Mistral, Qwen2) in Flax NNX.

Attribute paths mirror Hugging Face parameter names, so the checkpoint tensor
"model.layers.3.self_attn.q_proj.weight" is
`model.model.layers[3].self_attn.q_proj.weight`, and float linears keep
PyTorch's `[out_features, in_features]` orientation. With a
`QuantizationConfig` the linears become quantized (bitsandbytes layout;
every linear is built by `layers.factory.make_linear`),
except the ones `quantization.skips(path)` keeps in full precision.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb._src.models import decode_kernel
from jaxbnb._src.models import norm_kernel
from jaxbnb._src.models import rope
from jaxbnb._src.models import tensor_parallel
from jaxbnb._src.models.kv_cache import KVCache
from jaxbnb._src.models.config import LlamaConfig
from jaxbnb._src.layers.common import QuantizedLinear
from jaxbnb._src.layers.common import check_inputs
from jaxbnb._src.layers.factory import make_linear
from jaxbnb._src.layers.linear import Linear
from jaxbnb._src.layers.linear import precision_for
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.quant import kernels as quant_kernels
from jaxbnb._src.quant import matmul as matmul_lib
from jaxbnb._src.quant.weights import Params4bit
from jaxbnb._src.quant.weights import QuantizedArray

__all__ = [
    "Embedding", "Linear", "RMSNorm", "Attention", "MLP", "DecoderLayer",
    "LlamaModel", "LlamaForCausalLM", "output_logits",
]

_NEG = float(np.finfo(np.float32).min)


def _fused_attention(dtype: Any, head_dim: int) -> bool:
  """Whether attention without a KV cache runs as cuDNN flash attention.

  `JAXBNB_ATTENTION`: "auto" (the default: on a CUDA GPU, for float16 and
  bfloat16 with a head size cuDNN takes), "cudnn" (the same, or an error
  where cuDNN cannot run it) or "xla" (always the einsum path, also for
  the one-token decode steps that otherwise run `decode_kernel`'s Pallas
  kernel where the kernel mode resolves to the kernels).
  """
  choice = decode_kernel.attention_choice()
  if choice == "xla":
    return False
  if choice == "cudnn":
    return True
  return (jax.default_backend() == "gpu"
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def _linear(layer: nnx.Module, x: jax.Array) -> jax.Array:
  """`layer(x)`; a quantized layer runs on its own rows per device while
  `tensor_parallel.activate` is on (see models/tensor_parallel.py)."""
  return tensor_parallel.linear(layer, x)


def _linears(layers: tuple[nnx.Module, ...], x: jax.Array,
             norm: "RMSNorm | None" = None) -> list[jax.Array]:
  """`[layer(norm(x)) for layer in layers]` (`norm` None: x itself).
  Plain 4-bit linears without bias (a layer's q/k/v, its gate/up) share
  one GEMV launch at decode time (`matmul_4bit_group`), unless tensor
  parallelism is active; there the norm can be made in the GEMV's
  programs (`_fusable_norm`)."""
  weights = [_grouped_weight(layer) for layer in layers]
  dtypes = ({layer.dtype for layer in layers} if None not in weights
            else {None})
  if (tensor_parallel.current() is None and len(dtypes) == 1
      and None not in dtypes):
    for layer in layers:
      check_inputs(x, layer.in_features, type(layer).__name__)
    dtype = dtypes.pop()
    pairs = [(w.data, w.quant_state) for w in weights]
    rms = _fusable_norm(norm, x, dtype, [w.quant_state for w in weights])
    if rms is not None:
      return matmul_lib.matmul_4bit_group(x, pairs, rms_norm=rms)
    x = x if norm is None else norm(x)
    return matmul_lib.matmul_4bit_group(x.astype(dtype), pairs)
  x = x if norm is None else norm(x)
  return [_linear(layer, x) for layer in layers]


def _fusable_norm(norm, x: jax.Array, dtype: Any, qss) -> tuple | None:
  """`(weight, eps)` of `norm` where the GEMV of these 4-bit weights makes
  it in its programs (`quant.kernels.norm_serves`: one row, the table
  GEMV, `pallas_kernels.gemv_4bit.NORM_FUSED`) and x is in the layers'
  dtype; else None (the norm runs first)."""
  if norm is None or x.dtype != jnp.dtype(dtype):
    return None
  rows = int(np.prod(x.shape[:-1]))
  if not quant_kernels.norm_serves(rows, x.shape[-1], x.dtype, tuple(qss)):
    return None
  return norm.weight[...], norm.eps


def _grouped_weight(layer: nnx.Module) -> Params4bit | None:
  """The `Params4bit` of a plain bias-free 4-bit linear, else None."""
  if (not isinstance(layer, QuantizedLinear) or layer.bias is not None
      or type(layer).__call__ is not QuantizedLinear.__call__):
    return None
  weight = layer.weight.get_value()
  return weight if isinstance(weight, Params4bit) else None


def _normal(std: float):
  return nnx.initializers.normal(std)


class Embedding(nnx.Module):
  """Token embeddings; `.weight` is `[vocab, hidden]` like PyTorch's."""

  def __init__(self, num_embeddings: int, features: int, *, dtype: Any,
               param_dtype: Any, init_std: float, rngs: nnx.Rngs):
    self.dtype = dtype
    self.weight = nnx.Param(_normal(init_std)(
        rngs.params(), (num_embeddings, features), param_dtype))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output head: float32 logits `x @ weight.T`."""
    w = self.weight[...].astype(self.dtype)
    return jnp.einsum("...h,vh->...v", x.astype(self.dtype), w,
                      precision=precision_for(self.dtype),
                      preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, as transformers' `LlamaRMSNorm`."""

  def __init__(self, features: int, *, eps: float, param_dtype: Any):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    # One Pallas kernel for a decode step's row, else the jnp formula.
    return norm_kernel.apply(x, self.weight[...], self.eps)


class MLP(nnx.Module):
  """SwiGLU MLP: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, config: LlamaConfig, *, path: str, **kw):
    h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
    self.dtype = kw["dtype"]
    kw["init_std"] = config.initializer_range
    self.gate_proj = make_linear(h, i, use_bias=b, path=path + ".gate_proj",
                                 **kw)
    self.up_proj = make_linear(h, i, use_bias=b, path=path + ".up_proj", **kw)
    self.down_proj = make_linear(i, h, use_bias=b, path=path + ".down_proj",
                                 **kw)

  def __call__(self, x: jax.Array, norm: "RMSNorm | None" = None,
               residual: jax.Array | None = None) -> jax.Array:
    """`down(silu(gate(h)) * up(h))` with `h = norm(x)` (`norm` None: x),
    plus `residual` (in the MLP's dtype) unless it is None.

    Plain 4-bit linears at a decode step the table GEMV serves can run as
    `matmul_4bit_swiglu`'s two launches (down's GEMV on gate/up's
    partials, `pallas_kernels.gemv_4bit.SWIGLU_FUSED`), the norm made in
    gate/up's programs (`NORM_FUSED`) and the residual added with down's
    partials' sum (`gemv_4bit_lut.RESIDUAL_KERNEL`)."""
    layers = (self.gate_proj, self.up_proj, self.down_proj)
    weights = [_grouped_weight(layer) for layer in layers]
    if (tensor_parallel.current() is None and None not in weights
        and self.dtype is not None
        and {layer.dtype for layer in layers} == {self.dtype}):
      check_inputs(x, self.gate_proj.in_features,
                   type(self.gate_proj).__name__)
      qss = tuple(w.quant_state for w in weights)
      rows = int(np.prod(x.shape[:-1]))
      if quant_kernels.swiglu_serves(rows, x.shape[-1], self.dtype, qss):
        rms = _fusable_norm(norm, x, self.dtype, qss[:2])
        if rms is None and norm is not None:
          x = norm(x)
        pairs = [(w.data, w.quant_state) for w in weights]
        if residual is not None and residual.dtype == self.dtype:
          return matmul_lib.matmul_4bit_swiglu(
              x.astype(self.dtype), *pairs, rms_norm=rms, residual=residual)
        y = matmul_lib.matmul_4bit_swiglu(
            x.astype(self.dtype), *pairs, rms_norm=rms).astype(self.dtype)
        return y if residual is None else residual + y
    gate, up = (y.astype(self.dtype)
                for y in _linears((self.gate_proj, self.up_proj), x, norm))
    y = _linear(self.down_proj, jax.nn.silu(gate) * up).astype(self.dtype)
    return y if residual is None else residual + y


class Attention(nnx.Module):
  """Grouped-query attention with RoPE and an optional sliding window."""

  def __init__(self, config: LlamaConfig, *, path: str, **kw):
    self.config = config
    self.dtype = kw["dtype"]
    h, d = config.hidden_size, config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    qkv_bias = config.attention_bias
    kw["init_std"] = config.initializer_range
    self.q_proj = make_linear(h, nq * d, use_bias=qkv_bias,
                              path=path + ".q_proj", **kw)
    self.k_proj = make_linear(h, nkv * d, use_bias=qkv_bias,
                              path=path + ".k_proj", **kw)
    self.v_proj = make_linear(h, nkv * d, use_bias=qkv_bias,
                              path=path + ".v_proj", **kw)
    self.o_proj = make_linear(nq * d, h, use_bias=config.o_proj_bias,
                              path=path + ".o_proj", **kw)

  def __call__(self, x, cos, sin, allowed, kv_cache=None, index=None,
               norm=None):
    """Attends `norm(x)` `[B, T, H]` (`norm` None: x).

    Args:
      x: hidden states.
      cos: RoPE cos `[B, T, head_dim]`.
      sin: RoPE sin.
      allowed: bool `[B, T, S]`, which keys each query sees.
      kv_cache: `(k, v, layer)`: the stacked caches `[L, B, S, kv_heads,
        head_dim]` and this layer's index, or None (then S == T and the keys
        are the new tokens).
      index: the slot of the first new token in `kv_cache`.
      norm: the layer's input RMSNorm, or None; a decode step's q/k/v GEMV
        can make it in its programs (`_linears`).

    Returns:
      `(output [B, T, H], (k, v))`: the updated stacked caches (or this
      call's keys/values when there is no cache).
    """
    cfg = self.config
    b, t, _ = x.shape
    d, nkv = cfg.head_dim, cfg.num_key_value_heads
    g = cfg.num_key_value_groups
    q, k, v = (y.astype(self.dtype) for y in _linears(
        (self.q_proj, self.k_proj, self.v_proj), x, norm))
    q = q.reshape(b, t, nkv * g, d)
    k, v = k.reshape(b, t, nkv, d), v.reshape(b, t, nkv, d)
    run_mode = (decode_kernel.mode(self.dtype, d, kv_cache[0].dtype, g)
                if kv_cache is not None and t == 1 else None)
    if run_mode is not None:
      # One token per row: RoPE, the cache write and the attention in one
      # kernel (models/decode_kernel.py).
      out, new_kv = decode_kernel.attend(q, k, v, cos, sin, kv_cache,
                                         allowed, index, run_mode)
      out = _linear(self.o_proj, out.astype(self.dtype))
      return out.astype(self.dtype), new_kv
    q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)
    if kv_cache is not None:
      # Write the new keys/values into the stacked cache in place (the
      # buffer is donated by the decode loop), then read this layer's slice.
      ck, cv, layer = kv_cache
      zero = jnp.zeros((), jnp.int32)
      start = (jnp.asarray(layer, jnp.int32), zero, index, zero, zero)
      ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), start)
      cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), start)
      new_kv = (ck, cv)
      k, v = ck[layer], cv[layer]
    else:
      new_kv = (k, v)
    k, v = k.astype(self.dtype), v.astype(self.dtype)
    if kv_cache is None and t > 1 and _fused_attention(self.dtype, d):
      # Flash attention (cuDNN) when nothing is cached (training, eval,
      # perplexity): the [B, heads, T, S] scores are never written to
      # memory. A query that may see no key (a padding row) is allowed its
      # own position: its output is unused, but an all-masked row would be
      # NaN in cuDNN where the einsum path below gives a finite value.
      none = ~jnp.any(allowed, axis=-1, keepdims=True)
      mask = allowed | (none & jnp.eye(t, dtype=bool))
      out = jax.nn.dot_product_attention(
          q, k, v, mask=mask[:, None], scale=d ** -0.5,
          implementation="cudnn")
      out = _linear(self.o_proj, out.reshape(b, t, nkv * g * d))
      return out.astype(self.dtype), new_kv
    q = q.reshape(b, t, nkv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                        precision=precision_for(self.dtype),
                        preferred_element_type=jnp.float32)
    scores = scores * np.float32(d ** -0.5)
    scores = jnp.where(allowed[:, None, None], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v,
                     precision=precision_for(self.dtype),
                     preferred_element_type=jnp.float32).astype(self.dtype)
    out = _linear(self.o_proj, out.reshape(b, t, nkv * g * d))
    return out.astype(self.dtype), new_kv


class DecoderLayer(nnx.Module):
  """Pre-norm attention + MLP block."""

  def __init__(self, config: LlamaConfig, *, path: str, **kw):
    eps, pd = config.rms_norm_eps, kw["param_dtype"]
    self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, param_dtype=pd)
    self.self_attn = Attention(config, path=path + ".self_attn", **kw)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps,
                                            param_dtype=pd)
    self.mlp = MLP(config, path=path + ".mlp", **kw)

  def __call__(self, x, cos, sin, allowed, kv_cache=None, index=None):
    # The norms go in with x: at a decode step the GEMVs after them can
    # make them in their programs (`_linears`).
    h, new_kv = self.self_attn(x, cos, sin, allowed, kv_cache, index,
                               norm=self.input_layernorm)
    x = x + h
    # `x + mlp(x)`: at a decode step the add can join down's partials' sum.
    x = self.mlp(x, norm=self.post_attention_layernorm, residual=x)
    return x, new_kv


def _check_call(config, input_ids, positions, cache, attention_mask):
  shape = tuple(jnp.shape(input_ids))
  if len(shape) != 2 or not jnp.issubdtype(jnp.asarray(input_ids).dtype,
                                           jnp.integer):
    raise ValueError(
        "LlamaForCausalLM: `input_ids` must be an integer array [batch, "
        f"seq], got shape {shape} dtype {jnp.asarray(input_ids).dtype}.")
  for name, arr in (("attention_mask", attention_mask),
                    ("positions", positions)):
    if arr is not None and tuple(jnp.shape(arr)) != shape:
      raise ValueError(
          f"LlamaForCausalLM: `{name}` must have the shape of `input_ids` "
          f"{shape}, got {tuple(jnp.shape(arr))}.")
  if cache is not None:
    if not isinstance(cache, KVCache):
      raise TypeError(
          "LlamaForCausalLM: `cache` must be a KVCache or None, got "
          f"{type(cache).__name__}.")
    want = (config.num_hidden_layers, shape[0])
    if cache.k.shape[:2] != want or cache.k.shape[3:] != (
        config.num_key_value_heads, config.head_dim):
      raise ValueError(
          "LlamaForCausalLM: `cache` does not fit this model and batch: "
          f"k has shape {cache.k.shape}, want [{want[0]}, {want[1]}, max_len, "
          f"{config.num_key_value_heads}, {config.head_dim}].")
    if shape[1] > cache.max_len:
      raise ValueError(
          f"LlamaForCausalLM: {shape[1]} new tokens do not fit a cache of "
          f"max_len={cache.max_len}.")


class LlamaModel(nnx.Module):
  """Embeddings, decoder layers and the final norm (HF `model.` prefix)."""

  def __init__(self, config: LlamaConfig, **kw):
    self.config = config
    self.embed_tokens = Embedding(
        config.vocab_size, config.hidden_size, dtype=kw["dtype"],
        param_dtype=kw["param_dtype"], init_std=config.initializer_range,
        rngs=kw["rngs"])
    self.layers = nnx.List([
        DecoderLayer(config, path=f"model.layers.{i}", **kw)
        for i in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                        param_dtype=kw["param_dtype"])

  def attention_inputs(self, input_ids, positions=None, cache=None,
                       attention_mask=None) -> dict[str, Any]:
    """What every decoder layer of a call shares, besides the hidden states.

    Returns:
      A dict: `positions` `[B, T]`, `masks` (one bool `[B, T, S]` mask of
      the keys each query sees per layer, in layer order), `index` (the
      cache slot of the first new token), `key_mask` `[B, S]` and
      `new_mask` `[B, T]` (real tokens).
    """
    cfg = self.config
    b, t = input_ids.shape
    new_mask = (jnp.ones((b, t), bool) if attention_mask is None
                else jnp.asarray(attention_mask).astype(bool))
    steps = new_mask.astype(jnp.int32)
    before = jnp.cumsum(steps, axis=1) - steps  # real tokens before, per row
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      key_mask = new_mask
      start_pos = jnp.zeros((b,), jnp.int32)
    else:
      index = jnp.asarray(cache.index, jnp.int32)
      key_mask = jax.lax.dynamic_update_slice(cache.mask, new_mask,
                                              (jnp.zeros((), jnp.int32), index))
      start_pos = cache.positions
    if positions is None:
      positions = start_pos[:, None] + before
    positions = jnp.asarray(positions, jnp.int32)

    s = key_mask.shape[1]
    q_slot = index + jnp.arange(t, dtype=jnp.int32)
    k_slot = jnp.arange(s, dtype=jnp.int32)
    allowed = (k_slot[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]
    windows = {cfg.layer_sliding_window(i) for i in range(len(self.layers))}
    masks = {None: allowed}
    if windows - {None}:
      # Distance in real tokens between query and key slots.
      count = jnp.cumsum(key_mask.astype(jnp.int32), axis=1)
      q_count = jnp.take_along_axis(
          count, jnp.broadcast_to(q_slot[None], (b, t)), axis=1)
      dist = q_count[:, :, None] - count[:, None, :]
      for w in windows - {None}:
        masks[w] = allowed & (dist < w)

    return dict(positions=positions, index=index, key_mask=key_mask,
                new_mask=new_mask,
                masks=[masks[cfg.layer_sliding_window(i)]
                       for i in range(len(self.layers))])

  def __call__(self, input_ids, positions=None, cache=None,
               attention_mask=None):
    """Returns the final hidden states `[B, T, H]` and the updated cache."""
    cfg, t = self.config, input_ids.shape[1]
    inputs = self.attention_inputs(input_ids, positions, cache,
                                   attention_mask)
    positions, index = inputs["positions"], inputs["index"]
    key_mask, new_mask = inputs["key_mask"], inputs["new_mask"]
    x = self.embed_tokens(input_ids)
    cos, sin = rope.rope_cos_sin(cfg, positions, x.dtype)
    ck, cv = (None, None) if cache is None else (cache.k, cache.v)
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (ck, cv, i)
      x, (k, v) = layer(x, cos, sin, inputs["masks"][i], kv, index)
      if cache is not None:
        ck, cv = k, v
    x = self.norm(x)
    if cache is None:
      return x, None
    next_pos = jnp.max(jnp.where(new_mask, positions + 1,
                                 cache.positions[:, None]), axis=1)
    cache = KVCache(k=ck, v=cv, mask=key_mask,
                    index=index + t, positions=next_pos.astype(jnp.int32))
    return x, cache


def output_logits(lm_head: nnx.Module | None, embed_tokens: nnx.Module,
                  hidden: jax.Array) -> jax.Array:
  """float32 logits of final hidden states: `lm_head`, or the tied
  embedding when it is None."""
  if lm_head is None:
    return embed_tokens.attend(hidden)
  if isinstance(lm_head, Linear):
    return lm_head(hidden, float32_out=True)
  return _linear(lm_head, hidden).astype(jnp.float32)


class LlamaForCausalLM(nnx.Module):
  """A Llama/Mistral/Qwen2 causal language model.

  Example::

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxbnb.models import KVCache, LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> ids = jnp.array([[1, 5, 7]])
    >>> logits, _ = model(ids)
    >>> logits.shape, logits.dtype
    ((1, 3, 64), dtype('float32'))
    >>> cache = KVCache.init(cfg, batch=1, max_len=8)
    >>> step_logits, cache = model(ids, cache=cache)
    >>> int(cache.index), cache.positions.tolist()
    (3, [3])
    >>> bool(jnp.allclose(step_logits, logits, atol=1e-5))
    True

  Args:
    config: the architecture.
    dtype: activation/compute dtype (logits are always float32).
    param_dtype: dtype of float weights, norms and biases.
    quantization: with `load_in_4bit`, linears not skipped by
      `quantization.skips(path)` are `Linear4bit` computing in
      `quantization.compute_dtype`; with `load_in_8bit` they are frozen
      LLM.int8 `Linear8bitLt` layers (`llm_int8_threshold`) computing in
      `dtype`.
    rngs: random generators for the initial weights (normal with
      `config.initializer_range`; norms one, biases zero).

  Raises:
    TypeError: for a `config` or `quantization` of the wrong type.
  """

  def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32,
               quantization: QuantizationConfig | None = None,
               rngs: nnx.Rngs):
    if not isinstance(config, LlamaConfig):
      raise TypeError(
          "LlamaForCausalLM: `config` must be a LlamaConfig, got "
          f"{type(config).__name__} (use LlamaConfig.from_hf for a dict).")
    if quantization is not None and not isinstance(quantization,
                                                   QuantizationConfig):
      raise TypeError(
          "LlamaForCausalLM: `quantization` must be a QuantizationConfig or "
          f"None, got {type(quantization).__name__}.")
    self.config = config
    self.quantization = quantization
    self.dtype = jnp.dtype(dtype)
    self.param_dtype = jnp.dtype(param_dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              quantization=quantization, rngs=rngs)
    self.model = LlamaModel(config, **kw)
    if config.tie_word_embeddings:
      self.lm_head = nnx.data(None)
    else:
      self.lm_head = make_linear(config.hidden_size, config.vocab_size,
                                 use_bias=False, path="lm_head",
                                 init_std=config.initializer_range, **kw)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               cache: KVCache | None = None,
               attention_mask: jax.Array | None = None,
               ) -> tuple[jax.Array, KVCache | None]:
    """Runs the model on `input_ids` `[B, T]`.

    Args:
      input_ids: int token ids; batches are LEFT-padded.
      positions: int `[B, T]` RoPE positions; by default each row counts its
        real tokens (from `cache.positions` with a cache, else from 0).
      cache: a `KVCache`; the T tokens are written at slots
        `cache.index ... cache.index + T - 1`. The caller must keep
        `index + T <= max_len` (not checked under jit).
      attention_mask: `[B, T]`, 1 for real tokens, 0 for padding (which is
        neither attended to nor advances `positions`). Default: all real.

    Returns:
      `(logits, cache)`: float32 `[B, T, vocab]` and the updated cache (None
      without one).

    Raises:
      ValueError: for badly shaped inputs or a cache of another model/batch.
    """
    _check_call(self.config, input_ids, positions, cache, attention_mask)
    x, cache = self.model(jnp.asarray(input_ids), positions, cache,
                          attention_mask)
    return self.logits(x), cache

  def logits(self, hidden: jax.Array) -> jax.Array:
    """The output head on final hidden states `[..., hidden]`.

    `generate` applies it to the last position only, which avoids a
    `[batch, prompt, vocab]` array during prefill.

    Args:
      hidden: the final (normed) hidden states.

    Returns:
      float32 logits `[..., vocab]` (the tied embedding when
      `tie_word_embeddings`).
    """
    return output_logits(self.lm_head, self.model.embed_tokens, hidden)

  def named_linears(self) -> Iterator[tuple[str, nnx.Module]]:
    """Yields `(hf_module_path, linear)` for every float or quantized linear."""
    for path, node in nnx.iter_graph(self):
      if isinstance(node, (Linear, QuantizedLinear)):
        yield ".".join(map(str, path)), node

  def iter_variables(self) -> Iterator[tuple[str, nnx.Variable]]:
    """Yields `(hf_name, variable)` for every weight, e.g.

    `("model.layers.0.self_attn.q_proj.weight", <nnx.Param>)`. A 4-bit
    linear's weight is a `QuantizedWeight` holding a `QuantizedArray` (its
    bitsandbytes tensors are `value.state_dict(hf_name[:-len("weight")])`). A tied head
    has no entry ("lm_head.weight" is absent).
    """
    for path, node in nnx.iter_graph(self):
      if isinstance(node, nnx.Variable):
        yield ".".join(map(str, path)), node

  def num_parameters(self) -> int:
    """Logical parameter count (a 4-bit weight counts its float elements)."""
    total = 0
    for _, var in self.iter_variables():
      value = var.get_value()
      if isinstance(value, QuantizedArray):
        total += int(np.prod(value.shape))
      else:
        total += int(np.prod(value.shape))
    return total
