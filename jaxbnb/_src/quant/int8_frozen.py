"""The LLM.int8 matmul with a frozen int8 weight, on plain arrays.

bitsandbytes' `MatMul8bitLt` forward and backward (described in `int8`'s
module docstring) on `x2d` `[M, K]`, `cb` int8 `[N, K]`, `scb` float32
`[N]`, an optional bias and a static threshold: the XLA path, the Pallas
kernels where `dispatch` lets them serve, and the backward's pieces. No
argument checks (the public ops check) and no `Int8Params`.

`matmul_frozen` is the differentiable product. `int8.matmul_8bit` (an
`Int8Params` weight, any threshold) and `matmul.matmul_int8` (raw `CB`,
`SCB`, threshold 0) both call it; `int8.matmul_8bit_fp16_weights` builds
its own VJP from `forward_frozen`, `grad_input` and `grad_bias`. It lives
below `weights` (whose `Int8Params.matmul` is `matmul_int8`) and `int8`
(which imports `Int8Params`), so neither keeps a copy of it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import int8_gemm
from pallas_kernels import int8_matmul as int8_kernel

from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant import reference

__all__ = ["epilogue_bias", "forward_frozen", "matmul_frozen", "grad_input",
           "grad_bias"]

_HIGHEST = jax.lax.Precision.HIGHEST
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]


# --------------------------------------------------------------------------
# the XLA forward and the backward's pieces
# --------------------------------------------------------------------------


def epilogue_bias(bias):
  """The bias as bitsandbytes' float16 epilogue takes it, uncast
  (`bnb.matmul`): float16 is added before the float16 rounding, any other
  dtype to the float16 result in float32 (`out.add_(bias)`), which holds
  every bfloat16 value exactly. The cotangent comes back in the bias's own
  dtype through the cast."""
  if bias is None:
    return None
  bias = jnp.asarray(bias)
  return bias if bias.dtype == jnp.float16 else bias.astype(jnp.float32)


def _scaled_mm(ca, cb, sca, scb, bias):
  """bnb's `int8_scaled_mm`: int32 GEMM + fp16 epilogue (+ bias)."""
  acc = jax.lax.dot_general(ca, cb, _CONTRACT_LAST,
                            preferred_element_type=jnp.int32)
  return reference.int8_mm_dequant_any_bias(acc, sca, scb, bias)


def _dequantized(cb, scb, dtype):
  """`(CB * SCB / 127).to(dtype)`, bnb's `int8_vectorwise_dequant` order."""
  return reference.int8_vectorwise_dequant(cb, scb).astype(dtype)


# Outlier columns up to this many go through a gathered [M, n] x [n, N]
# product; more (activations with outliers everywhere) through a masked
# product over all of K.
_GATHERED_COLUMNS = 64


def _gather_outliers(x2d, cb, scb, mask, cap):
  """The first `cap` outlier columns: `(x[:, cols], dequant(CB[:, cols]))`,
  both in `x2d.dtype`, zeros in the slots past the outlier count."""
  cols = jnp.nonzero(mask, size=cap, fill_value=0)[0]
  used = jnp.arange(cap) < jnp.sum(mask)
  x_sub = jnp.where(used[None, :], x2d[:, cols], jnp.zeros((), x2d.dtype))
  w_sub = _dequantized(cb[:, cols], scb, x2d.dtype)
  return x_sub, w_sub


def _forward(x2d, cb, scb, bias, threshold):
  """bnb's `MatMul8bitLt.forward` on `[M, K]`; returns `x2d.dtype`."""
  ca, sca, mask = reference.int8_vectorwise_quant(
      x2d.astype(jnp.float16), threshold)
  out = _scaled_mm(ca, cb, sca, scb, bias)  # float16
  if mask is None:
    return out.astype(x2d.dtype)
  # Roundings XLA's excess precision would skip on the GPU (float16 ->
  # bfloat16 -> float32 taken as float16 -> float32) are pinned.
  round_to = functools.partial(int8_kernel.round_to_dtype, dtype=x2d.dtype)

  def finish(acc, out):
    return (acc + round_to(out.astype(jnp.float32))).astype(x2d.dtype)

  def all_columns(out):
    # bnb: out.addmm(A[:, cols], dequant(CB[:, cols]).to(A.dtype).T). The
    # other columns are zero here: same sum, static shapes.
    x_out = jnp.where(mask[None, :], x2d, jnp.zeros((), x2d.dtype))
    w = _dequantized(cb, scb, x2d.dtype)
    acc = jax.lax.dot_general(x_out, w, _CONTRACT_LAST, precision=_HIGHEST,
                              preferred_element_type=jnp.float32)
    return finish(acc, out)

  cap = min(_GATHERED_COLUMNS, mask.shape[0])

  def gathered(out):
    # The same product on the (at most `cap`) outlier columns gathered:
    # [M, cap] x [cap, N] instead of a 16-bit GEMM over all of K. Unused
    # slots hold zeros.
    x_sub, w_sub = _gather_outliers(x2d, cb, scb, mask, cap)
    w_sub = round_to(w_sub.astype(jnp.float32))
    # In float32: the same exact products of x.dtype values (a small
    # product; XLA:CPU has no 16-bit x 16-bit -> float32 dot for it).
    acc = jax.lax.dot_general(x_sub.astype(jnp.float32), w_sub,
                              _CONTRACT_LAST,
                              precision=_HIGHEST,
                              preferred_element_type=jnp.float32)
    return finish(acc, out)

  count = jnp.sum(mask, dtype=jnp.int32)
  return jax.lax.switch(jnp.where(count == 0, 0, jnp.where(count <= cap, 1,
                                                           2)),
                        [lambda out: out.astype(x2d.dtype), gathered,
                         all_columns], out)


def grad_input(g, cb, scb, dtype):
  """bnb's backward: `g.to(dtype) @ (CB.to(dtype) * (SCB * (1/127)))`."""
  scale = scb.astype(jnp.float32) * jnp.float32(1.0 / 127.0)
  w = (cb.astype(jnp.float32) * scale[:, None]).astype(dtype)
  return jax.lax.dot_general(g.astype(dtype), w, (((1,), (0,)), ((), ())),
                             precision=_HIGHEST,
                             preferred_element_type=jnp.float32).astype(dtype)


def grad_bias(g, bias):
  """`sum(g)` over the rows in float32, in the bias's dtype (None without)."""
  if bias is None:
    return None
  return jnp.sum(g.astype(jnp.float32), axis=0).astype(bias.dtype)


def _zero_int8(cb):
  return jnp.zeros(cb.shape, jax.dtypes.float0)


# --------------------------------------------------------------------------
# the kernels, and the differentiable product
# --------------------------------------------------------------------------


def _kernel_forward(x2d, cb, scb, bias, threshold):
  """`_forward` through a Pallas kernel, or None if none serves.

  M <= `int8_kernel.MAX_M` (decoding): the decode kernel, which reads the
  int8 weight once for the int32 product and the outlier stream. Larger M:
  the tiled int8 GEMM (`pallas_kernels.int8_gemm`) with bitsandbytes'
  epilogue and the outlier product fused (up to 32 gathered columns; more
  through the K tiles that hold them, in a second kernel). The
  activations are quantized here exactly as in `_forward`.
  """
  m, k = x2d.shape
  n = cb.shape[0]
  decode = m <= int8_kernel.MAX_M
  if (dispatch.get_kernel_mode() == "auto" and decode
      and not threshold > 0):
    # Without outliers XLA's int8 dot is faster at decode sizes (measured
    # on the H200, docs/benchmarks.md, LLM.int8, 4096 -> 14336: M = 1 20.0
    # vs 25.2 us, M = 16 23.8 vs 29.2 us); with a threshold the kernel
    # reads the weight once for both streams.
    return None
  mode = dispatch.resolve()
  if mode == "reference":
    return None
  kernel = int8_kernel if decode else int8_gemm
  if not kernel.can_use(m, n, k, x2d.dtype):
    dispatch.no_kernel(f"the LLM.int8 matmul of [{m}, {k}] x [{n}, {k}] "
                       f"({jnp.dtype(x2d.dtype).name})")
    return None
  interpret = mode == "interpret"
  dtype = jnp.dtype(x2d.dtype)
  ca, sca, mask = reference.int8_vectorwise_quant(
      x2d.astype(jnp.float16), threshold)
  if decode:
    x_out = None
    if mask is not None:
      x_out = jnp.where(mask[None, :], x2d, jnp.zeros((), x2d.dtype))
    return int8_kernel.int8_matmul(
        ca, sca, cb, scb, dtype=dtype, bias=bias, x_outlier=x_out,
        outlier_cols=mask, interpret=interpret)
  x_out = None if mask is None else x2d
  return int8_gemm.int8_gemm(ca, sca, cb, scb, dtype=dtype, bias=bias,
                             x=x_out, outlier_cols=mask, interpret=interpret)


def forward_frozen(x2d, cb, scb, bias, threshold):
  """`x2d @ dequant(cb).T (+ bias)` in `x2d.dtype`: a kernel where one
  serves (`_kernel_forward`), else the XLA path (`_forward`). `bias` as
  `epilogue_bias` returns it."""
  y = _kernel_forward(x2d, cb, scb, bias, threshold)
  return _forward(x2d, cb, scb, bias, threshold) if y is None else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def matmul_frozen(x2d, cb, scb, bias, threshold):
  """`forward_frozen`, differentiable in `x2d` and `bias` as bitsandbytes
  (`grad_input`, `grad_bias`); the int8 weight gets zero cotangents.
  `threshold` is static."""
  return forward_frozen(x2d, cb, scb, bias, threshold)


def _matmul_frozen_fwd(x2d, cb, scb, bias, threshold):
  return forward_frozen(x2d, cb, scb, bias, threshold), (cb, scb, bias)


def _matmul_frozen_bwd(threshold, res, g):
  del threshold
  cb, scb, bias = res
  dx = grad_input(g, cb, scb, g.dtype)
  return dx, _zero_int8(cb), jnp.zeros_like(scb), grad_bias(g, bias)


matmul_frozen.defvjp(_matmul_frozen_fwd, _matmul_frozen_bwd)
