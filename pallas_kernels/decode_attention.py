"""Attention for one new token per row against the KV cache, in one kernel.

At decode time each layer's attention was about ten small XLA kernels: the
two cache writes, two copies of the layer's cache slice, the score
product, the softmax's two reductions and its cast, the value product
(docs/benchmarks.md, "Decode attention in one kernel"). Here one
program per (row, key/value head[, split of the cache]) does it all:

* it applies RoPE to the token's queries and key (the model's formula and
  roundings);
* it writes the new key and value into the stacked cache in place (the
  cache is aliased from input to output; slot `index` of `layer`, both
  read at run time, so a model's layers share one kernel);
* it walks the cache in blocks of `block_s` slots, the new key/value
  taking slot `index`'s place in registers, and runs an online softmax:
  the scores of the head's `g` query heads (padded to 16 rows for the
  tensor cores) in float32, scaled, masked like the einsum path (a masked
  key scores float32's lowest value, so a row that may see no key
  averages all of them, as `jax.nn.softmax` does there), the probabilities
  rounded to the compute dtype before the value product;
* it reads the token's queries, keys and values from one array
  (`decode_attention` concatenates them): where they are slices of one
  GEMV's output, a layer's q/k/v, XLA writes them in one fusion where
  three inputs took a kernel each (docs/benchmarks.md, thirtieth
  session);
* with one split it writes the normalized output; with several (long
  caches, few rows) each writes its unnormalized sum, maximum and total,
  and `decode_attention` combines them (flash-decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _backend
from pallas_kernels._backend import pl
from pallas_kernels._backend import pltriton

__all__ = ["can_use", "decode_attention", "reference"]

_NEG = float(np.finfo(np.float32).min)
_ROWS = 16  # the tensor cores' smallest M


def can_use(head_dim: int, dtype, cache_dtype, groups: int = 1) -> bool:
  """Whether the kernel serves this attention (else the einsum path):
  `groups` query heads per key/value head, at most 16."""
  return (_backend.available() and head_dim >= 32
          and head_dim & (head_dim - 1) == 0 and head_dim <= 256
          and 1 <= groups <= _ROWS
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and jnp.dtype(cache_dtype) == jnp.dtype(dtype))


def _rotate(x, cos, sin):
  """The model's RoPE (`models/rope.py`): `x * cos + rotate_half(x) * sin`,
  `x` `[B, heads, d]`, `cos`/`sin` `[B, d]`."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, None] + rot * sin[:, None]


def reference(q, k_new, v_new, cos, sin, k_cache, v_cache, mask, index, *,
              layer, scale):
  """The einsum path `decode_attention` replaces (the model's, for T = 1).

  Returns:
    `(out [B, nq, d], k_cache, v_cache)`, as `decode_attention`.
  """
  b, nq, d = q.shape
  nkv = k_new.shape[1]
  q, k_new = _rotate(q, cos, sin), _rotate(k_new, cos, sin)
  zero = jnp.zeros((), jnp.int32)
  start = (jnp.asarray(layer, jnp.int32), zero, jnp.asarray(index, jnp.int32),
           zero, zero)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k_new[None, :, None],
                                         start)
  v_cache = jax.lax.dynamic_update_slice(v_cache, v_new[None, :, None],
                                         start)
  k, v = k_cache[layer], v_cache[layer]
  qg = q.reshape(b, nkv, nq // nkv, d)
  s = jnp.einsum("bkgd,bskd->bkgs", qg, k,
                 preferred_element_type=jnp.float32) * np.float32(scale)
  s = jnp.where(mask[:, None, None, :] != 0, s, _NEG)
  p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
  out = jnp.einsum("bkgs,bskd->bkgd", p, v,
                   preferred_element_type=jnp.float32).astype(q.dtype)
  return out.reshape(b, nq, d), k_cache, v_cache


def _rope(lo, hi, cos_ref, sin_ref, b, half, dtype, interpret):
  """`x * cos + rotate_half(x) * sin` on the halves of one head's vector,
  each product and the sum rounded to `dtype` (as 16-bit tensor ops do
  it in transformers and in XLA on the CPU)."""
  f32 = jnp.float32
  def rnd(x):  # interpret mode: a rounding XLA cannot drop
    return (_backend.round_to_dtype(x, dtype) if interpret
            else x.astype(dtype).astype(f32))
  c_lo, c_hi = (cos_ref[b, pl.ds(i * half, half)].astype(f32) for i in (0, 1))
  s_lo, s_hi = (sin_ref[b, pl.ds(i * half, half)].astype(f32) for i in (0, 1))
  lo, hi = lo.astype(f32), hi.astype(f32)
  return ((rnd(lo * c_lo) - rnd(hi * s_lo)).astype(dtype),
          (rnd(hi * c_hi) + rnd(lo * s_hi)).astype(dtype))


def _kernel(index_ref, layer_ref, qkv_ref, cos_ref, sin_ref, mask_ref, kc_ref,
            vc_ref, *outs, groups, block_s, steps, seq_len, scale, final,
            interpret):
  if final:
    o_ref, kc_out, vc_out = outs
  else:
    acc_ref, m_ref, l_ref, kc_out, vc_out = outs
  b, h, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  d = qkv_ref.shape[-1]
  half = d // 2
  dtype = qkv_ref.dtype
  index, layer = index_ref[0], layer_ref[0]
  # The token's heads in one array: queries, then keys, then values.
  nkv = kc_ref.shape[3]
  nq = qkv_ref.shape[1] - 2 * nkv
  lo_hi = (pl.ds(0, half), pl.ds(half, half))
  kn = _rope(*(qkv_ref[b, nq + h, i] for i in lo_hi), cos_ref, sin_ref, b,
             half, dtype, interpret)
  vn = qkv_ref[b, nq + nkv + h, :]

  @pl.when(sp == 0)
  def _write():
    for i, part in zip(lo_hi, kn):
      kc_out[layer, b, index, h, i] = part
    vc_out[layer, b, index, h, :] = vn

  # The group's query heads (after RoPE) as the rows of two half tiles.
  rows = jax.lax.broadcasted_iota(jnp.int32, (_ROWS, half), 0)
  q_lo = q_hi = jnp.zeros((_ROWS, half), jnp.float32)
  for j in range(groups):
    lo, hi = _rope(*(qkv_ref[b, h * groups + j, i] for i in lo_hi),
                   cos_ref, sin_ref, b, half, dtype, interpret)
    q_lo = jnp.where(rows == j, lo.astype(jnp.float32)[None, :], q_lo)
    q_hi = jnp.where(rows == j, hi.astype(jnp.float32)[None, :], q_hi)
  q_lo, q_hi = q_lo.astype(dtype), q_hi.astype(dtype)
  nt = (((1,), (1,)), ((), ()))

  def body(t, carry):
    m, l, acc = carry
    start = (sp * steps + t) * block_s
    slots = start + jnp.arange(block_s, dtype=jnp.int32)
    ok = slots < seq_len
    new = (slots == index)[:, None]
    def tile(ref, cols, width, fresh):
      okw = jnp.broadcast_to(ok[:, None], (block_s, width))
      x = pltriton.load(ref.at[layer, b, pl.ds(start, block_s), h, cols],
                        mask=okw, other=0)
      return jnp.where(jnp.broadcast_to(new, (block_s, width)),
                       jnp.broadcast_to(fresh[None, :], (block_s, width)), x)
    k_lo = tile(kc_ref, lo_hi[0], half, kn[0])
    k_hi = tile(kc_ref, lo_hi[1], half, kn[1])
    vt = tile(vc_ref, slice(None), d, vn)
    allowed = pltriton.load(mask_ref.at[b, pl.ds(start, block_s)], mask=ok,
                            other=0)
    s = (jax.lax.dot_general(q_lo, k_lo, nt,
                             preferred_element_type=jnp.float32)
         + jax.lax.dot_general(q_hi, k_hi, nt,
                               preferred_element_type=jnp.float32))
    s = s * jnp.float32(scale)
    s = jnp.where((allowed != 0)[None, :], s, jnp.float32(_NEG))
    s = jnp.where(ok[None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp(s - m_new[:, None])
    alpha = jnp.exp(m - m_new)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + jax.lax.dot_general(
        p.astype(dtype), vt, (((1,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((_ROWS,), -jnp.inf, jnp.float32),
          jnp.zeros((_ROWS,), jnp.float32),
          jnp.zeros((_ROWS, d), jnp.float32))
  if steps == 1:
    m, l, acc = body(0, init)
  else:
    m, l, acc = jax.lax.fori_loop(0, steps, body, init)
  if final:
    out = acc / l[:, None]
    rows_d = jax.lax.broadcasted_iota(jnp.int32, (_ROWS, d), 0)
    for j in range(groups):
      row = jnp.sum(jnp.where(rows_d == j, out, 0.0), axis=0)
      o_ref[b, h * groups + j, :] = row.astype(o_ref.dtype)
  else:
    acc_ref[sp, b, h, :, :] = acc
    m_ref[sp, b, h, :] = m
    l_ref[sp, b, h, :] = l


def _splits(batch: int, kv_heads: int, seq_len: int, block_s: int,
            split: int | None = None,
            num_sms: int | None = None) -> tuple[int, int]:
  """(splits of the cache, blocks per split).

  By default as many splits as give two programs per SM, at most one per
  block: one program walking the cache alone waits on each block in turn,
  and the combine after the kernel costs less than that (H200 sweep,
  docs/benchmarks.md "Decode attention in one kernel": one row, 256 slots,
  8 key/value heads: 8.1 us a call with 4 one-block splits of 64, 11.4
  with one program of two blocks of 128; 8 rows and 2,048 slots: 34.4 us
  with 4 splits, 64.2 with one).
  """
  if num_sms is None:
    num_sms = _backend.num_sms()
  blocks = -(-seq_len // block_s)
  if split is None:
    split = 2 * num_sms // (batch * kv_heads)
  split = max(1, min(split, blocks))
  steps = -(-blocks // split)
  return -(-blocks // steps), steps  # every split holds a real slot


def decode_attention(q, k_new, v_new, cos, sin, k_cache, v_cache, mask,
                     index, *, layer: int | jax.Array, scale: float,
                     block_s: int | None = None, split: int | None = None,
                     num_warps: int = 4, interpret: bool = False):
  """One token per row attends to the cache, which takes its key and value.

  Args:
    q: queries `[B, nq, d]` (before RoPE), bfloat16 or float16.
    k_new: the token's keys `[B, nkv, d]` (before RoPE), `q`'s dtype.
    v_new: its values `[B, nkv, d]`.
    cos: the token's RoPE cosines `[B, d]` (`models.rope.rope_cos_sin`),
      applied to `q` and `k_new` as the model does (`x * cos +
      rotate_half(x) * sin`, each product and the sum rounded to the
      dtype).
    sin: its sines `[B, d]`.
    k_cache: stacked keys `[L, B, S, nkv, d]`, `q`'s dtype.
    v_cache: stacked values, same shape.
    mask: `[B, S]`, nonzero where the token may see the slot (the new
      slot included).
    index: int32 scalar, the slot the token takes (negative: from the end;
      then clamped to the cache, as `jax.lax.dynamic_update_slice` takes
      it).
    layer: which layer's cache: a Python int, checked against `L`, or an
      integer scalar array, clamped to `[0, L)`. The kernel reads it at
      run time, so every layer of a model calls one kernel (one lowering
      and one compile a program, not one a layer).
    scale: the score scale (`d ** -0.5`).
    block_s: cache slots per step (default 64 up to 512 slots, else 128).
    split: programs per row and key/value head, each on its share of the
      cache, combined after the kernel (default: `_splits`).
    num_warps: Triton warps per program.
    interpret: Pallas interpret mode (CPU tests).

  Returns:
    `(out [B, nq, d], k_cache, v_cache)`: the attention output in `q`'s
    dtype and the caches with slot `index` of `layer` written (in place
    when the caller donates them).

  Examples:
    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 4, 32), jnp.bfloat16)
    >>> kv = jnp.ones((1, 2, 32), jnp.bfloat16)
    >>> cos, sin = jnp.ones((1, 32), jnp.bfloat16), jnp.zeros((1, 32))
    >>> cache = jnp.zeros((2, 1, 8, 2, 32), jnp.bfloat16)
    >>> mask = jnp.arange(8)[None] < 3
    >>> out, kc, vc = decode_attention(q, kv, kv, cos, sin, cache, cache,
    ...                                mask, jnp.int32(2), layer=1,
    ...                                scale=0.125, interpret=True)
    >>> out.shape, float(kc[1, 0, 2, 0, 0]), float(out[0, 0, 0])
    ((1, 4, 32), 1.0, 0.96484375)
  """
  n_layers = k_cache.shape[0]
  if isinstance(layer, (int, np.integer)) and not isinstance(layer, bool):
    if not 0 <= layer < n_layers:
      raise ValueError(f"decode_attention: layer must be in [0, {n_layers}), "
                       f"got {layer}.")
  elif (not hasattr(layer, "dtype") or jnp.shape(layer) != ()
        or not jnp.issubdtype(layer.dtype, jnp.integer)):
    raise ValueError("decode_attention: layer must be an int or an integer "
                     f"scalar array, got {layer!r}.")
  return _decode_attention(q, k_new, v_new, cos, sin, k_cache, v_cache, mask,
                           index, jnp.asarray(layer, jnp.int32), scale=scale,
                           block_s=block_s, split=split, num_warps=num_warps,
                           interpret=interpret)


@functools.partial(jax.jit, static_argnames=(
    "scale", "block_s", "split", "num_warps", "interpret"))
def _decode_attention(q, k_new, v_new, cos, sin, k_cache, v_cache, mask,
                      index, layer, *, scale, block_s, split, num_warps,
                      interpret):
  """`decode_attention` after its `layer` check; `layer` an int32 scalar."""
  b, nq, d = q.shape
  n_layers, cb, seq_len, nkv, cd = k_cache.shape
  if k_new.shape != (b, nkv, d) or v_new.shape != (b, nkv, d):
    raise ValueError(
        f"decode_attention: k_new and v_new must be {(b, nkv, d)}, got "
        f"{k_new.shape} and {v_new.shape}.")
  if (cb, cd) != (b, d) or v_cache.shape != k_cache.shape or nq % nkv:
    raise ValueError(
        "decode_attention: caches must be [L, B, S, nkv, d] with B, d of q "
        f"and nq a multiple of nkv; got q {q.shape}, k_cache "
        f"{k_cache.shape}, v_cache {v_cache.shape}.")
  if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
    raise ValueError(
        f"decode_attention: k_cache and v_cache must be q's dtype "
        f"{q.dtype}, got {k_cache.dtype} and {v_cache.dtype}.")
  groups = nq // nkv
  if groups > _ROWS:
    raise ValueError(f"decode_attention: at most {_ROWS} query heads per "
                     f"key/value head, got {groups}.")
  if cos.shape != (b, d) or sin.shape != (b, d):
    raise ValueError(f"decode_attention: cos and sin must be {(b, d)}, got "
                     f"{cos.shape} and {sin.shape}.")
  if block_s is None:  # the sweep's best: 64 up to 512 slots, then 128
    block_s = 64 if seq_len <= 512 else 128
  split, steps = _splits(b, nkv, seq_len, block_s, split)
  final = split == 1
  dtype = q.dtype
  # As `dynamic_update_slice` takes the einsum path's write: a negative
  # slot counts from the end, then the slot is clamped to the cache (never
  # a store out of bounds).
  idx = jnp.asarray(index, jnp.int32)
  idx = jnp.where(idx < 0, idx + seq_len, idx)
  idx = jnp.clip(idx, 0, seq_len - 1).reshape(1)
  # The slot and the layer, read by the kernel at run time, each an input
  # of its own: the slot is the same for every layer of a step (one XLA
  # kernel makes it for all of them), and a layer given as a Python int
  # is a constant XLA folds (no kernel a layer to pack it with the slot).
  layer = jnp.clip(layer, 0, n_layers - 1).reshape(1)
  # The token's queries, keys and values as one input: where they are
  # slices of one producer (a layer's q/k/v GEMV), XLA writes them in one
  # fusion instead of a kernel each.
  qkv = jnp.concatenate([q, k_new.astype(dtype), v_new.astype(dtype)], axis=1)
  args = _backend.same_vma(idx, layer, qkv, cos, sin,
                           jnp.asarray(mask).astype(jnp.int8), k_cache,
                           v_cache)
  cache_out = [_backend.out_struct(k_cache.shape, k_cache.dtype, *args)] * 2
  if final:
    out_shape = [_backend.out_struct((b, nq, d), dtype, *args)] + cache_out
  else:
    out_shape = [
        _backend.out_struct((split, b, nkv, _ROWS, d), jnp.float32, *args),
        _backend.out_struct((split, b, nkv, _ROWS), jnp.float32, *args),
        _backend.out_struct((split, b, nkv, _ROWS), jnp.float32, *args),
    ] + cache_out
  n_out = len(out_shape)
  kernel = functools.partial(
      _kernel, groups=groups, block_s=block_s, steps=steps,
      seq_len=seq_len, scale=float(scale), final=final, interpret=interpret)
  cache_bytes = 4 * b * seq_len * nkv * d * jnp.dtype(dtype).itemsize
  res = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(b, nkv, split),
      input_output_aliases={6: n_out - 2, 7: n_out - 1},
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=1),
      interpret=interpret,
      name="jaxbnb_decode_attention",
      cost_estimate=pl.CostEstimate(
          flops=4 * b * nkv * _ROWS * seq_len * d, transcendentals=b * nq
          * seq_len, bytes_accessed=cache_bytes),
  )(*args)
  if final:
    return res
  acc, m, l, k_cache, v_cache = res
  top = jnp.max(m, axis=0)
  w = jnp.exp(m - top[None])
  out = jnp.sum(acc * w[..., None], axis=0) / jnp.sum(l * w, axis=0)[..., None]
  out = out[:, :, :groups].reshape(b, nq, d).astype(dtype)
  return out, k_cache, v_cache
