"""Rotary position embeddings (RoPE) as transformers computes them.

`inverse_frequencies(config)` returns the per-pair inverse frequencies (float32
numpy, computed once per config) and the factor cos/sin are scaled by;
`apply_rope` rotates queries/keys with the "rotate half" convention of
Hugging Face checkpoints (the first and second halves of each head form the
pairs).

Supported RoPE types: "default", "linear", "dynamic", "llama3" and "yarn".
"dynamic" (NTK) rescales the base for a forward pass whose positions reach
past `max_position_embeddings`, from that pass's `seq_len = max(positions) +
1` (over the whole batch, as transformers' `dynamic_rope_update` does); its
cos/sin are computed from traced positions under jit, the other types use
fixed frequencies. With a KV cache, each step's new tokens are rotated with
the base of their own `seq_len` and cached keys keep theirs, which is what
transformers computes for a model whose calls never shrink `seq_len` (it
keeps the largest base it has seen until a call fits
`max_position_embeddings` again; jaxbnb is stateless).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src.models.config import LlamaConfig

__all__ = ["inverse_frequencies", "dynamic_inverse_frequencies",
           "rope_cos_sin", "apply_rope"]


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
  # transformers computes theta ** (2i / dim) in float32.
  exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  return (np.float32(1.0) / np.power(np.float32(theta), exponent)).astype(
      np.float32)


def _llama3(inv_freq: np.ndarray, p: dict) -> np.ndarray:
  factor = p["factor"]
  low, high = p["low_freq_factor"], p["high_freq_factor"]
  old_len = p["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = np.float32(2 * math.pi) / inv_freq
  # Long wavelengths are slowed down by `factor`, short ones kept, and the
  # band in between interpolated linearly in 1/wavelength.
  scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor),
                    inv_freq)
  smooth = ((np.float32(old_len) / wavelen - np.float32(low))
            / np.float32(high - low))
  smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled)
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(theta: float, dim: int, max_pos: int,
          p: dict) -> tuple[np.ndarray, float]:
  factor = p.get("factor")
  orig = p["original_max_position_embeddings"]
  if factor is None:
    factor = max_pos / orig

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = p.get("attention_factor")
  if attention_factor is None:
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    if m and m_all:
      attention_factor = float(mscale(factor, m) / mscale(factor, m_all))
    else:
      attention_factor = mscale(factor)
  beta_fast = p.get("beta_fast") or 32
  beta_slow = p.get("beta_slow") or 1

  def correction_dim(rotations):
    # The pair index whose wavelength completes `rotations` turns in `orig`.
    return dim * math.log(orig / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))

  lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
  if p.get("truncate", True):
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  if lo == hi:
    hi += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(lo))
                 / np.float32(hi - lo), 0, 1).astype(np.float32)
  pos_freqs = np.power(np.float32(theta),
                       np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  extrapolation = np.float32(1.0) / pos_freqs
  interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  keep = 1 - ramp  # 1: keep the original frequency (high-frequency pairs)
  inv = interpolation * (1 - keep) + extrapolation * keep
  return inv.astype(np.float32), float(attention_factor)


@functools.lru_cache(maxsize=64)
def inverse_frequencies(config: LlamaConfig) -> tuple[np.ndarray, float]:
  """RoPE inverse frequencies and the cos/sin scale of `config`.

  For a head dimension of 8 and the default rope, the frequencies are
  `theta ** (-[0, 2, 4, 6] / 8)` and the scale is 1 (tests/models/rope_test.py
  checks every rope type against transformers).

  Args:
    config: the model config (its `rope_theta`, `head_dim`, `rope_scaling`).

  Returns:
    `(inv_freq, attention_factor)`: float32 `[head_dim // 2]` and a float.

  Raises:
    NotImplementedError: for a RoPE type other than default, linear,
      dynamic, llama3 and yarn.
  """
  dim = config.head_dim
  params = config.rope_scaling_dict
  rope_type = params.get("rope_type", "default")
  inv = _base_inv_freq(config.rope_theta, dim)
  if rope_type in ("default", "dynamic"):
    return inv, 1.0
  if rope_type == "linear":
    return (inv / np.float32(params["factor"])).astype(np.float32), 1.0
  if rope_type == "llama3":
    return _llama3(inv, params), 1.0
  if rope_type == "yarn":
    return _yarn(config.rope_theta, dim, config.max_position_embeddings,
                 params)
  raise NotImplementedError(
      f"inverse_frequencies: rope_type {rope_type!r} is not supported.")


def dynamic_inverse_frequencies(config: LlamaConfig,
                                seq_len: jax.Array) -> jax.Array:
  """Dynamic-NTK inverse frequencies for a pass of length `seq_len`.

  As transformers' `_compute_dynamic_ntk_parameters` with a tensor
  `seq_len`, in float32: `seq_len` is raised to `max_position_embeddings`,
  `base' = base * (factor * seq_len / max_pos - (factor - 1)) **
  (dim / (dim - 2))` and `inv_freq = 1 / base' ** (arange(0, dim, 2) /
  dim)`. Up to `max_position_embeddings` the result is the default
  frequencies (transformers then uses the ones it computed at init).

  Args:
    config: a config with `rope_type == "dynamic"`.
    seq_len: int scalar (may be traced).

  Returns:
    float32 `[head_dim // 2]`.
  """
  dim, params = config.head_dim, config.rope_scaling_dict
  max_pos = config.max_position_embeddings
  factor = params["factor"]
  f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
  seq = jnp.maximum(jnp.asarray(seq_len, jnp.int32), max_pos)
  ratio = f32(factor) * seq.astype(jnp.float32) / f32(max_pos) - f32(
      factor - 1)
  base = f32(config.rope_theta) * ratio ** f32(dim / (dim - 2))
  exponent = jnp.arange(0, dim, 2, dtype=jnp.float32) / f32(dim)
  scaled = f32(1.0) / base ** exponent
  static, _ = inverse_frequencies(config)
  return jnp.where(seq > max_pos, scaled, jnp.asarray(static))


def rope_cos_sin(config: LlamaConfig, positions: jax.Array,
                 dtype) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables `[..., head_dim]` for integer `positions` `[...]`.

  Computed in float32, scaled by the attention factor, then cast to `dtype`
  (as transformers does). For "dynamic" RoPE the frequencies depend on
  `max(positions) + 1` over every entry (padding included), as
  transformers takes the max of `position_ids`.
  """
  inv, scale = inverse_frequencies(config)
  if config.rope_type == "dynamic":
    inv = dynamic_inverse_frequencies(config, jnp.max(positions) + 1)
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` `[B, T, heads, head_dim]` by `cos`/`sin` `[B, T, head_dim]`."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + _rotate_half(x) * sin
