"""`matmul_4bit`: x @ W.T with a frozen 4-bit W, differentiable in x and bias.

The weight is dequantized to the compute dtype inside the op (never saved as
a residual), and the backward pass is `dx = g @ W` with the same dequantized
weight, as bitsandbytes' `MatMul4Bit`. There is no gradient for W.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pallas_kernels
from pallas_kernels import rms_norm as rms_norm_lib

from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant import int8_frozen
from jaxbnb._src.quant import kernels
from jaxbnb._src.quant import ops
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.state import QuantState

__all__ = ["matmul_4bit", "matmul_4bit_group", "matmul_4bit_swiglu",
           "matmul_int8", "dequantize_weight"]

# A float32 compute dtype means a true float32 product (as PyTorch without
# TF32), not XLA's default TF32 passes on NVIDIA GPUs.
_PRECISION = jax.lax.Precision.HIGHEST


def dequantize_weight(packed: jax.Array, quant_state: QuantState,
                      dtype) -> jax.Array:
  """The `[N, K]` weight dequantized straight to `dtype` (fp32 product)."""
  qs = quant_state
  flat = ops.from_storage(packed)
  w = ops.dequantize_flat(flat, qs, dtype)
  return w.reshape(qs.shape)


def _forward(x2d, bias, packed, qs, transposed):
  mode = dispatch.resolve()
  if mode != "reference" and not transposed:
    flat = ops.from_storage(packed)
    m, k = x2d.shape
    if kernels.gemm_serves(m, qs.shape[0], k, x2d.dtype, qs, mode,
                           bias is not None):
      absmax = (None if kernels.gemm_decodes_nested(m, qs, bias is not None)
                else ops.float_absmax(qs))
      return kernels.gemm(x2d, flat, qs, absmax, bias, mode)
    y = kernels.gemv(x2d, flat, qs, bias, mode)
    if y is not None:
      return y
  w = dequantize_weight(packed, qs, x2d.dtype)
  if transposed:  # a deprecated [K, N] weight
    w = w.T
  if mode == "pallas" and bias is None and x2d.dtype != jnp.float32:
    # cuBLAS accumulates in fp32 and rounds once to the 16-bit output;
    # asking XLA for an fp32 result would write (and re-read) it in fp32.
    return jax.lax.dot_general(x2d, w, (((1,), (1,)), ((), ())),
                               preferred_element_type=x2d.dtype)
  acc = jax.lax.dot_general(
      x2d, w, (((1,), (1,)), ((), ())), precision=_PRECISION,
      preferred_element_type=jnp.float32,
  )
  if bias is not None:
    acc = acc + bias.astype(jnp.float32)
  return acc.astype(x2d.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _matmul(x2d, bias, packed, qs, transposed):
  return _forward(x2d, bias, packed, qs, transposed)


def _matmul_fwd(x2d, bias, packed, qs, transposed):
  return _forward(x2d, bias, packed, qs, transposed), (bias, packed, qs)


def _matmul_bwd(transposed, res, g):
  bias, packed, qs = res
  w = dequantize_weight(packed, qs, g.dtype)
  if transposed:
    w = w.T
  if dispatch.resolve() == "pallas" and g.dtype != jnp.float32:
    # 16-bit operands on the tensor cores (default precision), summed in
    # float32 and rounded once, as bnb's torch matmul. Asking XLA for a
    # 16-bit result instead lets it rewrite a small-M product (M = 1) as a
    # reduction of 16-bit-rounded products: ~100 ulp off on an H200.
    dx = jax.lax.dot_general(g, w, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32
                             ).astype(g.dtype)
  else:
    dx = jax.lax.dot_general(
        g, w, (((1,), (0,)), ((), ())), precision=_PRECISION,
        preferred_element_type=jnp.float32,
    ).astype(g.dtype)
  dbias = None
  if bias is not None:
    dbias = jnp.sum(g.astype(jnp.float32), axis=0).astype(bias.dtype)
  zeros = jax.tree.map(_zero_cotangent, (packed, qs))
  return (dx, dbias) + zeros


def _zero_cotangent(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.inexact):
    return jnp.zeros_like(leaf)
  return jnp.zeros(leaf.shape, jax.dtypes.float0)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul_4bit(
    A: jax.Array,  # pylint: disable=invalid-name
    B: jax.Array,  # pylint: disable=invalid-name
    quant_state: QuantState,
    bias: jax.Array | None = None,
    *,
    dtype=None,
) -> jax.Array:
  """`A @ W.T (+ bias)` for a 4-bit `W` of shape `quant_state.shape = [N, K]`.

  The weight is dequantized to the compute dtype (fp32 code x absmax, one
  rounding), the product accumulates in float32 and is rounded once to the
  compute dtype; this is bitsandbytes' dequantize + linear. Gradients flow
  to `A` and `bias` (`dA = g @ W`); the 4-bit weight is frozen.

  Args:
    A: float activations `[..., K]`.
    B: packed weight from `quantize_4bit` (any `quant_storage`).
    quant_state: its `QuantState`; `shape` must be 2-D `[N, K]`.
    bias: optional `[N]`.
    dtype: compute dtype (bitsandbytes' `compute_dtype`); default `A.dtype`.
      The result is returned in `A.dtype`.

  Returns:
    `[..., N]` in `A.dtype`.

  Raises:
    TypeError: if `A` is not a float array.
    ValueError: if the state is not 2-D or the inner dimensions differ.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> w = jax.random.normal(jax.random.key(0), (16, 64))
    >>> packed, qs = F.quantize_4bit(w, quant_type="nf4")
    >>> x = jnp.ones((2, 3, 64), jnp.bfloat16)
    >>> y = F.matmul_4bit(x, packed, qs)
    >>> y.shape, y.dtype
    ((2, 3, 16), dtype(bfloat16))
  """
  fn = "matmul_4bit"
  validation.check_float_array(A, "A", fn)
  if not isinstance(quant_state, QuantState):
    raise TypeError(
        f"{fn}: `quant_state` must be a QuantState, got "
        f"{type(quant_state).__name__}."
    )
  if len(quant_state.shape) != 2:
    raise ValueError(
        f"{fn}: quant_state.shape must be 2-D [N, K], got {quant_state.shape}."
    )
  validation.check_quant_type(quant_state.quant_type,
                              "quant_state.quant_type", fn)
  k = A.shape[-1]
  transposed = ops.deprecated_kn(quant_state, k)
  n_out = quant_state.shape[1] if transposed else quant_state.shape[0]
  if not transposed and k != quant_state.shape[1]:
    raise ValueError(
        f"{fn}: A.shape[-1]={k} must equal K of the weight shape "
        f"[N, K]={list(quant_state.shape)}."
    )
  if bias is not None and tuple(bias.shape) != (n_out,):
    raise ValueError(
        f"{fn}: `bias` must have shape ({n_out},), got {tuple(bias.shape)}."
    )
  ops.check_packed_4bit(B, quant_state, fn, "B")
  compute = (jnp.dtype(validation.float_dtype_name(dtype, "dtype", fn))
             if dtype is not None else A.dtype)
  x2d = jnp.asarray(A).astype(compute).reshape(-1, k)
  if bias is not None:
    bias = jnp.asarray(bias).astype(compute)
  x2d, bias = pallas_kernels.match_vma((x2d, bias),
                                       (x2d, bias, B, quant_state))
  y = _matmul(x2d, bias, B, quant_state, transposed)
  return y.reshape(*A.shape[:-1], n_out).astype(A.dtype)


@jax.custom_vjp
def _group(x2d, packeds, qss):
  return kernels.gemv_group(x2d, [ops.from_storage(p) for p in packeds], qss,
                            dispatch.resolve())


def _group_fwd(x2d, packeds, qss):
  return _group(x2d, packeds, qss), (packeds, qss)


def _group_bwd(res, gs):
  packeds, qss = res
  dx = None
  for g, p, qs in zip(gs, packeds, qss):
    d = _matmul_bwd(False, (None, p, qs), g)[0].astype(jnp.float32)
    dx = d if dx is None else dx + d
  zeros = jax.tree.map(_zero_cotangent, (packeds, qss))
  return (dx.astype(gs[0].dtype),) + zeros


_group.defvjp(_group_fwd, _group_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _group_norm(x2d, norm_weight, packeds, qss, eps):
  return kernels.gemv_group_norm(x2d, norm_weight, eps,
                                 [ops.from_storage(p) for p in packeds], qss,
                                 dispatch.resolve())


def _group_norm_fwd(x2d, norm_weight, packeds, qss, eps):
  return (_group_norm(x2d, norm_weight, packeds, qss, eps),
          (x2d, norm_weight, packeds, qss))


def _group_norm_bwd(eps, res, gs):
  x2d, norm_weight, packeds, qss = res
  _, vjp = jax.vjp(lambda x, w: _group(rms_norm_lib.reference(x, w, eps),
                                       packeds, qss), x2d, norm_weight)
  zeros = jax.tree.map(_zero_cotangent, (packeds, qss))
  return vjp(tuple(gs)) + zeros


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def _checked_norm(fn, rms_norm, k):
  """`(weight, eps)` of an `rms_norm` argument, checked against K."""
  if not isinstance(rms_norm, (tuple, list)) or len(rms_norm) != 2:
    raise TypeError(f"{fn}: `rms_norm` must be a (weight, eps) pair, got "
                    f"{type(rms_norm).__name__}.")
  weight, eps = rms_norm
  if tuple(jnp.shape(weight)) != (k,):
    raise ValueError(f"{fn}: rms_norm's weight must have shape ({k},) (A's "
                     f"K), got {tuple(jnp.shape(weight))}.")
  return jnp.asarray(weight), float(eps)


def matmul_4bit_group(
    A: jax.Array,  # pylint: disable=invalid-name
    weights: list[tuple[jax.Array, QuantState]],
    *,
    rms_norm: tuple[jax.Array, float] | None = None,
) -> list[jax.Array]:
  """`[matmul_4bit(A, B, qs) for B, qs in weights]`, in one kernel launch
  where the 4-bit GEMV serves them together.

  For projections that read the same input (a layer's q/k/v, its
  gate/up) at decode time (up to 64 rows; 128 for 16-bit `A` and 4096 x
  4096 weight elements in all): one grid walks the rows of every weight,
  so the small ones do not each pay a launch and a split-K reduction. The
  weights must share K, the quantization type, block size and double
  quantization; otherwise, with the reference ops, or for
  larger M, each is multiplied on its own. Each result is the fused
  GEMV's for its weight, with the tile configuration chosen for all rows
  together (so its float32 sums may run in another order than a
  `matmul_4bit` of that weight alone). Weights the Hopper wgmma GEMM
  serves at full size (`kernels.gemm_serves`: 64-256 rows of bf16 `A`,
  10240 weight rows or more) are multiplied one by one. Differentiable in `A`
  (`dA = sum_g dY_g @ W_g`).

  With `rms_norm=(weight, eps)` the products are of `A` RMSNorm'd first
  (Llama's: `weight * (A * rsqrt(mean(A^2) + eps))`, the normalized row
  and the weight rounded to `A.dtype`, `pallas_kernels.rms_norm.
  reference`); with `pallas_kernels.gemv_4bit.NORM_FUSED` on (the
  default, measured on the H200), where the table GEMV serves the
  group at one row, each program makes the norm in its table build and
  the norm needs no kernel of its own (its sum of squares in another
  order and an approximate rsqrt: within a unit in the last place of
  `A.dtype` of the reference); otherwise the reference norm runs first.
  Differentiable in `A` and the norm's weight.

  Args:
    A: float activations `[..., K]`, in the compute dtype.
    weights: `(packed, quant_state)` pairs, each `[N_g, K]`.
    rms_norm: optional `(weight [K], eps)`.

  Returns:
    The `[..., N_g]` products, in `A.dtype`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> q, k = (F.quantize_4bit(jax.random.normal(jax.random.key(i), (n, 64)))
    ...         for i, n in enumerate((32, 16)))
    >>> x = jnp.ones((1, 64), jnp.bfloat16)
    >>> [y.shape for y in F.matmul_4bit_group(x, [q, k])]
    [(1, 32), (1, 16)]
    >>> [y.shape for y in F.matmul_4bit_group(
    ...     x, [q, k], rms_norm=(jnp.ones((64,)), 1e-6))]
    [(1, 32), (1, 16)]
  """
  k = A.shape[-1]
  if rms_norm is not None:
    norm_weight, eps = _checked_norm("matmul_4bit_group", rms_norm, k)
    validation.check_float_array(A, "A", "matmul_4bit_group")
    qss = tuple(qs for _, qs in weights)
    x2d = jnp.asarray(A).reshape(-1, k)
    if (all(isinstance(qs, QuantState) and len(qs.shape) == 2 for qs in qss)
        and kernels.norm_serves(x2d.shape[0], k, x2d.dtype, qss)):
      packeds = tuple(p for p, _ in weights)
      x2d, norm_weight = pallas_kernels.match_vma(
          (x2d, norm_weight), (x2d, norm_weight, packeds, qss))
      ys = _group_norm(x2d, norm_weight, packeds, qss, eps)
      return [y.reshape(*A.shape[:-1], qs.shape[0])
              for y, qs in zip(ys, qss)]
    A = rms_norm_lib.reference(jnp.asarray(A), norm_weight, eps)
  if (len(weights) > 1 and dispatch.resolve() != "reference"
      and jnp.issubdtype(A.dtype, jnp.floating)
      and all(isinstance(qs, QuantState) and len(qs.shape) == 2
              for _, qs in weights)):
    qss = tuple(qs for _, qs in weights)
    x2d = jnp.asarray(A).reshape(-1, k)
    if kernels.can_group(x2d.shape[0], k, x2d.dtype, qss):
      packeds = tuple(p for p, _ in weights)
      x2d = pallas_kernels.match_vma((x2d,), (x2d, packeds, qss))[0]
      ys = _group(x2d, packeds, qss)
      return [y.reshape(*A.shape[:-1], qs.shape[0])
              for y, qs in zip(ys, qss)]
  return [matmul_4bit(A, p, qs) for p, qs in weights]


def _swiglu_composed(x2d, packeds, qss):
  """The three matmuls of `matmul_4bit_swiglu` one after another."""
  g, u = matmul_4bit_group(x2d, list(zip(packeds[:2], qss[:2])))
  return matmul_4bit(jax.nn.silu(g) * u, packeds[2], qss[2])


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _swiglu(x2d, norm_weight, residual, packeds, qss, eps):
  """The fused launches (`kernels.swiglu`), x RMSNorm'd in them unless
  `norm_weight` is None, `residual` added unless None; differentiated
  through the composition."""
  rms_norm = None if norm_weight is None else (norm_weight, eps)
  return kernels.swiglu(x2d, [ops.from_storage(p) for p in packeds], qss,
                        dispatch.resolve(), rms_norm=rms_norm,
                        residual=residual)


def _swiglu_fwd(x2d, norm_weight, residual, packeds, qss, eps):
  return (_swiglu(x2d, norm_weight, residual, packeds, qss, eps),
          (x2d, norm_weight, residual is not None, packeds, qss))


def _swiglu_bwd(eps, res, g):
  x2d, norm_weight, has_residual, packeds, qss = res

  def composed(x, w):
    x = x if w is None else rms_norm_lib.reference(x, w, eps)
    return _swiglu_composed(x, packeds, qss)

  _, vjp = jax.vjp(composed, x2d, norm_weight)
  zeros = jax.tree.map(_zero_cotangent, (packeds, qss))
  return vjp(g) + (g if has_residual else None,) + zeros


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def matmul_4bit_swiglu(
    A: jax.Array,  # pylint: disable=invalid-name
    gate: tuple[jax.Array, QuantState],
    up: tuple[jax.Array, QuantState],
    down: tuple[jax.Array, QuantState],
    *,
    rms_norm: tuple[jax.Array, float] | None = None,
    residual: jax.Array | None = None,
) -> jax.Array:
  """A SwiGLU MLP on 4-bit weights: `down(silu(A @ gate.T) * (A @ up.T))`.

  The same values as `matmul_4bit_group(A, [gate, up])`, then
  `jax.nn.silu(g) * u` in `A.dtype`, then `matmul_4bit` with `down`.
  With `pallas_kernels.gemv_4bit.SWIGLU_FUSED` on (the default,
  measured on the H200), at one row of 16-bit `A` on a Hopper GPU,
  where the table GEMV serves the three weights (NF4/FP4
  double-quantized in blocks of 64, K and the inner size multiples of
  1024, `gemv_4bit.swiglu_serves`), it runs in two launches: down's
  programs make their part of its input from gate/up's fp32 partials, so
  the partials' sum and `silu(gate) * up` need no kernel of their own
  (`gemv_4bit_lut.gemv_swiglu`; its sigmoid rounds `exp` by the GPU's
  `ex2.approx`, which may differ from XLA's by a unit in the last place
  of the 16-bit value; from JAX 0.12.1, whose sigmoid is the
  `exp(-|g|)` form, float16 values may differ from `jax.nn.silu` by up
  to three). Otherwise, and with the reference ops, the three
  matmuls run in turn. With `rms_norm=(weight, eps)`, `A` is RMSNorm'd
  first, as `matmul_4bit_group`'s `rms_norm` (in gate/up's table builds
  where that serves). With `residual`, the result is `residual + y` (a
  decoder layer's `x + mlp(x)`, y in `A.dtype` first); in the two
  launches' path down's partials are summed and added to it in one
  kernel (`pallas_kernels.split_sum.add_splits`), not by XLA. Same
  bits either way. Differentiable in `A`, the norm's weight (through
  the three matmuls) and `residual`.

  Args:
    A: float activations `[..., K]`, in the compute dtype.
    gate: `(packed, quant_state)` of the `[N, K]` gate projection.
    up: the same of the `[N, K]` up projection.
    down: the same of the `[N_out, N]` down projection.
    rms_norm: optional `(weight [K], eps)`.
    residual: optional `[..., N_out]` in `A.dtype`, added to the output.

  Returns:
    `[..., N_out]` in `A.dtype`.

  Raises:
    TypeError: if `A` is not a float array or a state is not a
      `QuantState`.
    ValueError: if the shapes do not chain.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> gate, up = (F.quantize_4bit(jax.random.normal(jax.random.key(i),
    ...                                               (128, 64)))
    ...             for i in range(2))
    >>> down = F.quantize_4bit(jax.random.normal(jax.random.key(2), (32, 128)))
    >>> x = jnp.ones((1, 64), jnp.bfloat16)
    >>> F.matmul_4bit_swiglu(x, gate, up, down).shape
    (1, 32)
  """
  fn = "matmul_4bit_swiglu"
  validation.check_float_array(A, "A", fn)
  for name, pair in (("gate", gate), ("up", up), ("down", down)):
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
        or not isinstance(pair[1], QuantState)):
      raise TypeError(f"{fn}: `{name}` must be a (packed, QuantState) pair, "
                      f"got {type(pair).__name__}.")
    if len(pair[1].shape) != 2:
      raise ValueError(f"{fn}: {name}'s quant_state.shape must be 2-D "
                       f"[N, K], got {pair[1].shape}.")
  k = A.shape[-1]
  n = gate[1].shape[0]
  want = {"gate": (n, k), "up": (n, k), "down": (down[1].shape[0], n)}
  for name, pair in (("gate", gate), ("up", up), ("down", down)):
    if tuple(pair[1].shape) != want[name]:
      raise ValueError(
          f"{fn}: {name}'s weight shape must be {list(want[name])} (A has "
          f"K={k}, gate N={n}), got {list(pair[1].shape)}.")
  x2d = jnp.asarray(A).reshape(-1, k)
  out_shape = (*A.shape[:-1], want["down"][0])
  res2d = None
  if residual is not None:
    residual = jnp.asarray(residual)
    if residual.shape != out_shape or residual.dtype != x2d.dtype:
      raise ValueError(
          f"{fn}: `residual` must be {x2d.dtype} {list(out_shape)} (A's "
          f"rows, down's N_out), got {residual.dtype} "
          f"{list(residual.shape)}.")
    res2d = residual.reshape(-1, out_shape[-1])
  packeds = tuple(p for p, _ in (gate, up, down))
  qss = tuple(qs for _, qs in (gate, up, down))
  fused = kernels.swiglu_serves(x2d.shape[0], k, x2d.dtype, qss)
  if rms_norm is not None:
    norm_weight, eps = _checked_norm(fn, rms_norm, k)
    if fused and kernels.norm_serves(x2d.shape[0], k, x2d.dtype, qss[:2]):
      x2d, norm_weight, res2d = pallas_kernels.match_vma(
          (x2d, norm_weight, res2d), (x2d, norm_weight, res2d, packeds, qss))
      y = _swiglu(x2d, norm_weight, res2d, packeds, qss, eps)
      return y.reshape(out_shape)
    x2d = rms_norm_lib.reference(x2d, norm_weight, eps)
  if fused:
    x2d, res2d = pallas_kernels.match_vma((x2d, res2d),
                                          (x2d, res2d, packeds, qss))
    y = _swiglu(x2d, None, res2d, packeds, qss, 0.0)
    return y.reshape(out_shape)
  y = _swiglu_composed(x2d, packeds, qss).reshape(out_shape)
  return y if residual is None else residual + y


def matmul_int8(
    A: jax.Array,  # pylint: disable=invalid-name
    CB: jax.Array,  # pylint: disable=invalid-name
    SCB: jax.Array,  # pylint: disable=invalid-name
    bias: jax.Array | None = None,
) -> jax.Array:
  """`A @ W.T (+ bias)` for an LLM.int8 weight `W ~= CB * SCB / 127`.

  The same program as `matmul_8bit(A, Int8Params(CB, SCB), bias)` at
  threshold 0 (the LLM.int8 kernels on an NVIDIA GPU), which is
  bitsandbytes' `bnb.matmul` with a frozen weight and threshold 0: `A` is
  cast to float16, quantized row-wise to int8, multiplied with `CB` in
  int32 and dequantized with both scales (bitsandbytes' float16 epilogue);
  the result is returned in `A.dtype`. Gradients flow to `A` and `bias`.

  Args:
    A: float activations `[..., K]`.
    CB: int8 weight rows `[N, K]`.
    SCB: float32 row absmax `[N]`.
    bias: optional `[N]`.

  Returns:
    `[..., N]` in `A.dtype`.

  Raises:
    TypeError: if `A`, `SCB` or `bias` is not a float array, or `CB` not a
      2-D int8 array.
    ValueError: if `A` is not `[..., K]`, or `SCB` or `bias` not `[N]`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> w = F.Int8Params.from_float(jnp.eye(4))
    >>> F.matmul_int8(jnp.asarray([[1.0, 2.0, 3.0, 4.0]]), w.CB, w.SCB)
    Array([[1.0078125, 2.015625 , 2.9921875, 4.       ]], dtype=float32)
  """
  fn = "matmul_int8"
  validation.check_float_array(A, "A", fn)
  if getattr(CB, "dtype", None) != jnp.int8 or jnp.ndim(CB) != 2:
    raise TypeError(f"{fn}: `CB` must be a 2-D int8 array, got "
                    f"{getattr(CB, 'dtype', type(CB).__name__)} of shape "
                    f"{tuple(jnp.shape(CB))}.")
  n, k = CB.shape
  if A.shape[-1] != k:
    raise ValueError(f"{fn}: `A` must have shape [..., {k}], got "
                     f"{tuple(A.shape)}.")
  if (not hasattr(SCB, "dtype") or not hasattr(SCB, "shape")
      or not jnp.issubdtype(SCB.dtype, jnp.floating)):
    raise TypeError(f"{fn}: `SCB` must be a float32 array, got "
                    f"{getattr(SCB, 'dtype', type(SCB).__name__)}.")
  if tuple(SCB.shape) != (n,):
    raise ValueError(f"{fn}: `SCB` must have shape (N,)=({n},) (one row "
                     f"absmax per row of `CB` {tuple(CB.shape)}), got "
                     f"{tuple(SCB.shape)}.")
  if bias is not None:
    validation.check_float_array(bias, "bias", fn)
    if tuple(bias.shape) != (n,):
      raise ValueError(f"{fn}: `bias` must have shape (N,)=({n},), got "
                       f"{tuple(bias.shape)}.")
  x2d = jnp.asarray(A).reshape(-1, k)
  # bnb.matmul's epilogue takes the bias uncast (float16 stays float16)
  bias = int8_frozen.epilogue_bias(bias)
  y = int8_frozen.matmul_frozen(x2d, CB, jnp.asarray(SCB, jnp.float32), bias,
                                0.0)
  return y.reshape(*A.shape[:-1], n)

