"""LLM.int8: bitsandbytes' `Linear8bitLt` matmul with outlier decomposition.

`matmul_8bit` is the forward (and backward) of `bnb.matmul` with a frozen
int8 weight (`has_fp16_weights=False`, what transformers' `load_in_8bit`
builds); `matmul_8bit_fp16_weights` is the same forward for a trainable
float weight quantized on every call (`has_fp16_weights=True`, bnb's
`Linear8bitLt` default). `int8_linear_matmul` and `int8_double_quant` are
bitsandbytes' functional building blocks of the same name.

The forward, as bitsandbytes 0.50 computes it on CUDA:

1. the activations `A` are cast to float16 and quantized row-wise to int8
   (`int8_vectorwise_quant(A, threshold)`): with `threshold > 0` every
   column holding an element with `|a| >= threshold` is an outlier column,
   excluded from the row absmax and zeroed in the int8 matrix;
2. `CA @ CB.T` in exact int32;
3. bitsandbytes' epilogue `fp16(acc * row * col * 6.200012e-05 (+ bias))`,
   then a cast to `A.dtype`;
4. `threshold > 0`: the outlier columns of `A`, in `A`'s own dtype, times
   the same columns of the int8-dequantized weight
   `(CB * SCB / 127).astype(A.dtype)` are added with float32 accumulation
   and one rounding to `A.dtype` (cuBLAS `addmm`).

bitsandbytes gathers the outlier columns (`A[:, cols]`, a data-dependent
shape). Here the non-outlier columns are masked to zero instead and the
product runs over all `K` columns, so everything has static shapes and
works under `jax.jit`, `jax.vmap` and `jax.grad`. The zero products add
exactly nothing to a float32 sum, so the result equals the gathered one up
to the order in which the float32 accumulator adds the outlier products.
The masked product costs a full 16-bit matmul; it is skipped (`lax.cond`)
when a batch has no outlier column.

Where the kernel mode (`dispatch.resolve()`) allows, Pallas kernels serve
the forward of both weight modes (the float weight is quantized first):
`pallas_kernels.int8_matmul` for at most 16 rows (decoding; it reads the
int8 weight once for the int32 product and the outlier stream) and
`pallas_kernels.int8_gemm` above (int8 tensor cores with the epilogue and
the outlier product fused). Both give the same result as the XLA path
without outliers, bit for bit. With outliers the GEMM differs from it only
in the float32 summation order; the decode kernel's default outlier
stream ("limbs") multiplies the unrounded dequantized weight with the
outlier activations as int8 digits of 2**-20 of their row absmax, where
bitsandbytes rounds `CB * SCB / 127` to the activation dtype first: up to
one unit of the dtype per outlier term more (tests/quant/
int8_bnb_golden_test.py measures both against bitsandbytes).

The frozen-weight forward (XLA path and kernels) and the backward work on
plain arrays in `int8_frozen`, which `matmul.matmul_int8` shares; this
module adds the argument checks, `Int8Params` and the trainable weight.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src.quant import int8_frozen
from jaxbnb._src.quant import reference
from jaxbnb._src.quant import validation
from jaxbnb._src.quant.weights import Int8Params

__all__ = ["matmul_8bit", "matmul_8bit_fp16_weights", "int8_linear_matmul",
           "int8_double_quant", "quantize_int8_weight"]

_HIGHEST = jax.lax.Precision.HIGHEST
_CONTRACT_LAST = (((1,), (1,)), ((), ()))  # [M, K] x [N, K] -> [M, N]


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------


def _check_int8_matrix(a, name: str, fn: str, ndim=None) -> None:
  dtype = getattr(a, "dtype", None)
  if dtype is None or not hasattr(a, "shape"):
    raise TypeError(f"{fn}: `{name}` must be an int8 array, got "
                    f"{type(a).__name__}.")
  if jnp.dtype(dtype) != jnp.int8:
    raise TypeError(f"{fn}: `{name}` must have dtype int8, got "
                    f"{jnp.dtype(dtype).name}.")
  if ndim is not None and len(a.shape) != ndim:
    raise ValueError(f"{fn}: `{name}` must be {ndim}-D, got shape "
                     f"{tuple(a.shape)}.")
  if len(a.shape) == 0:
    raise ValueError(f"{fn}: `{name}` must have at least 1 dimension, got a "
                     "scalar.")


def _check_inputs(A, k: int, n: int, bias, fn: str):  # pylint: disable=invalid-name
  validation.check_float_array(A, "A", fn)
  if A.ndim == 0 or A.shape[-1] != k:
    raise ValueError(f"{fn}: `A` must have shape [..., in_features={k}], got "
                     f"{tuple(A.shape)}.")
  if bias is not None:
    validation.check_float_array(bias, "bias", fn)
    if tuple(bias.shape) != (n,):
      raise ValueError(f"{fn}: `bias` must have shape (out_features,)=({n},), "
                       f"got {tuple(bias.shape)}.")


# --------------------------------------------------------------------------
# trainable float weight (the frozen weight's is `int8_frozen.matmul_frozen`)
# --------------------------------------------------------------------------


def _quantize_weight(w):
  cb, scb, _ = reference.int8_vectorwise_quant(w.astype(jnp.float16), 0.0)
  return cb, scb


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul_fp16_weights(x2d, w, bias, threshold):
  cb, scb = _quantize_weight(w)
  return int8_frozen.forward_frozen(x2d, cb, scb, bias, threshold)


def _matmul_fp16_weights_fwd(x2d, w, bias, threshold):
  cb, scb = _quantize_weight(w)
  y = int8_frozen.forward_frozen(x2d, cb, scb, bias, threshold)
  return y, (x2d, cb, scb, bias, jnp.zeros((0,), w.dtype))


def _matmul_fp16_weights_bwd(threshold, res, g):
  del threshold
  x2d, cb, scb, bias, w_dtype = res
  dx = int8_frozen.grad_input(g, cb, scb, x2d.dtype)
  # The weight gradient of `x @ W.T`, straight through the quantizer:
  # `g.T @ x`, accumulated in float32 and rounded once to W's dtype.
  dw = jax.lax.dot_general(g.astype(x2d.dtype), x2d, (((0,), (0,)), ((), ())),
                           precision=_HIGHEST,
                           preferred_element_type=jnp.float32)
  return dx, dw.astype(w_dtype.dtype), int8_frozen.grad_bias(g, bias)


_matmul_fp16_weights.defvjp(_matmul_fp16_weights_fwd, _matmul_fp16_weights_bwd)


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------


def matmul_8bit(
    A: jax.Array,  # pylint: disable=invalid-name
    weight: Int8Params,
    bias: jax.Array | None = None,
    *,
    threshold: float = 0.0,
) -> jax.Array:
  """`A @ W.T (+ bias)` with a frozen LLM.int8 weight, as `Linear8bitLt`.

  bitsandbytes' `bnb.matmul(A, W, state, threshold, bias)` with
  `has_fp16_weights=False`: `A` is cast to float16 and quantized row-wise
  to int8, multiplied with `weight.CB` in exact int32 and dequantized by
  bitsandbytes' float16 epilogue. With `threshold > 0` the outlier columns
  of `A` (any `|a| >= threshold`) skip the int8 path and are multiplied in
  `A`'s dtype with the int8-dequantized weight (see the module docstring).

  The gradient is bitsandbytes': `dA = g @ (CB * SCB / 127)` in `A`'s dtype
  and `dbias = sum(g)`; the int8 weight gets none (zero cotangents).

  Args:
    A: float activations `[..., in_features]` (float32, float16, bfloat16).
    weight: the `Int8Params` (`CB` int8 `[out, in]`, `SCB` float32 `[out]`).
    bias: optional `[out_features]`, taken as `bnb.matmul` takes it: a
      float16 bias is added in the epilogue before its float16 rounding,
      any other dtype to the float16 result (`Linear8bitLt` casts its bias
      to the input's dtype first).
    threshold: the outlier threshold (a static float >= 0); 0 disables the
      decomposition (bitsandbytes' default; transformers uses 6.0).

  Returns:
    `[..., out_features]` in `A.dtype`. The int8 part passes through float16
    (range +-65504), also for bfloat16 and float32 inputs.

  Raises:
    TypeError: `A` or `bias` is not a float array, `weight` is not an
      `Int8Params`, or `threshold` is not a number.
    ValueError: a negative threshold, or shapes that do not fit.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> w = F.Int8Params.from_float(jnp.eye(4, dtype=jnp.float16))
    >>> x = jnp.asarray([[1.0, 2.0, 3.0, 40.0], [4.0, 3.0, 2.0, 1.0]])
    >>> F.matmul_8bit(x, w)  # 40 sets row 0's scale: 1 and 2 lose precision
    Array([[ 0.9448242,  1.8896484,  3.1503906, 40.       ],
           [ 4.       ,  2.9921875,  2.015625 ,  1.0078125]], dtype=float32)
    >>> F.matmul_8bit(x, w, threshold=6.0)  # column 3 goes the 16-bit way
    Array([[ 0.9921875,  2.0078125,  3.       , 40.       ],
           [ 4.       ,  2.9921875,  2.015625 ,  1.       ]], dtype=float32)
  """
  fn = "matmul_8bit"
  threshold = validation.check_threshold(threshold, fn)
  if not isinstance(weight, Int8Params):
    raise TypeError(f"{fn}: `weight` must be an Int8Params, got "
                    f"{type(weight).__name__}.")
  _check_int8_matrix(weight.CB, "weight.CB", fn, ndim=2)
  n, k = weight.CB.shape
  if tuple(jnp.shape(weight.SCB)) != (n,):
    raise ValueError(f"{fn}: `weight.SCB` must have shape ({n},), got "
                     f"{tuple(jnp.shape(weight.SCB))}.")
  _check_inputs(A, k, n, bias, fn)
  x2d = jnp.asarray(A).reshape(-1, k)
  bias = int8_frozen.epilogue_bias(bias)
  y = int8_frozen.matmul_frozen(x2d, weight.CB,
                                jnp.asarray(weight.SCB, jnp.float32), bias,
                                threshold)
  return y.reshape(*A.shape[:-1], n)


def matmul_8bit_fp16_weights(
    A: jax.Array,  # pylint: disable=invalid-name
    weight: jax.Array,
    bias: jax.Array | None = None,
    *,
    threshold: float = 0.0,
) -> jax.Array:
  """`A @ W.T (+ bias)` with a trainable float `W` quantized on every call.

  bitsandbytes' `Linear8bitLt(has_fp16_weights=True)` (its default): the
  float weight is cast to float16 and quantized row-wise
  (`CB, SCB = int8_vectorwise_quant(W.half())`) in each forward, then the
  forward is `matmul_8bit`'s. Gradients: `dA = g @ (CB * SCB / 127)` (the
  quantized weight, as bitsandbytes), `dW = g.T @ A` (straight through the
  quantizer, float32 accumulation rounded to W's dtype; bitsandbytes'
  CUDA path approximates the same product with an int8 GEMM) and
  `dbias = sum(g)`.

  Args:
    A: float activations `[..., in_features]`.
    weight: float `[out_features, in_features]` (PyTorch orientation).
    bias: optional `[out_features]`, taken as in `matmul_8bit`.
    threshold: the outlier threshold (a static float >= 0).

  Returns:
    `[..., out_features]` in `A.dtype`.

  Raises:
    TypeError: `A`, `weight` or `bias` is not a float array.
    ValueError: a negative threshold, or shapes that do not fit.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> w = jnp.eye(4)
    >>> x = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])
    >>> F.matmul_8bit_fp16_weights(x, w)
    Array([[1.0078125, 2.015625 , 2.9921875, 4.       ]], dtype=float32)
    >>> jax.grad(lambda w: F.matmul_8bit_fp16_weights(x, w).sum())(w)[0]
    Array([1., 2., 3., 4.], dtype=float32)
  """
  fn = "matmul_8bit_fp16_weights"
  threshold = validation.check_threshold(threshold, fn)
  validation.check_float_array(weight, "weight", fn)
  if weight.ndim != 2:
    raise ValueError(f"{fn}: `weight` must be 2-D [out_features, "
                     f"in_features], got shape {tuple(weight.shape)}.")
  n, k = weight.shape
  _check_inputs(A, k, n, bias, fn)
  x2d = jnp.asarray(A).reshape(-1, k)
  bias = int8_frozen.epilogue_bias(bias)
  y = _matmul_fp16_weights(x2d, jnp.asarray(weight), bias, threshold)
  return y.reshape(*A.shape[:-1], n)


def quantize_int8_weight(weight: jax.Array) -> Int8Params:
  """bitsandbytes' `Int8Params` quantization of a float `[out, in]` weight.

  `Int8Params(W).cuda()` in bitsandbytes: the weight is cast to float16 and
  quantized row-wise (`int8_vectorwise_quant`, threshold 0). The returned
  `Int8Params` records `weight`'s own dtype. `Int8Params.from_float`
  differs only in quantizing in the weight's dtype (no float16 cast).

  Args:
    weight: float `[out_features, in_features]`.

  Returns:
    The `Int8Params` (`CB` int8 `[out, in]`, `SCB` float32 `[out]`).

  Raises:
    TypeError: `weight` is not a float array.
    ValueError: `weight` is not 2-D.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> w = F.quantize_int8_weight(jnp.asarray([[1.0, -2.0], [0.5, 0.25]]))
    >>> w.CB, w.SCB, w.dtype
    (Array([[  64, -127],
           [ 127,   64]], dtype=int8), Array([2. , 0.5], dtype=float32), 'float32')
  """
  fn = "quantize_int8_weight"
  validation.check_float_array(weight, "weight", fn)
  if weight.ndim != 2:
    raise ValueError(f"{fn}: `weight` must be 2-D [out_features, "
                     f"in_features], got shape {tuple(weight.shape)}.")
  weight = jnp.asarray(weight)
  cb, scb = _quantize_weight(weight)
  return Int8Params(cb, scb, jnp.dtype(weight.dtype).name)


def int8_linear_matmul(A: jax.Array, B: jax.Array) -> jax.Array:  # pylint: disable=invalid-name
  """`A @ B.T` of int8 matrices, exact in int32 (bitsandbytes' name).

  Args:
    A: int8 `[..., K]`.
    B: int8 `[N, K]`.

  Returns:
    int32 `[..., N]`. bitsandbytes' fp32 fallback for `K % 4 != 0` is not
    needed: the product is always exact here.

  Raises:
    TypeError: `A` or `B` is not int8.
    ValueError: `B` is not 2-D or the inner dimensions differ.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> a = jnp.asarray([[127, -128, 1]], jnp.int8)
    >>> F.int8_linear_matmul(a, a)
    Array([[32514]], dtype=int32)
  """
  fn = "int8_linear_matmul"
  _check_int8_matrix(A, "A", fn)
  _check_int8_matrix(B, "B", fn, ndim=2)
  if A.shape[-1] != B.shape[1]:
    raise ValueError(f"{fn}: `A` must have shape [..., {B.shape[1]}] to match "
                     f"`B` [N, K]={list(B.shape)}, got {tuple(A.shape)}.")
  a2d = jnp.asarray(A).reshape(-1, A.shape[-1])
  out = jax.lax.dot_general(a2d, jnp.asarray(B), _CONTRACT_LAST,
                            preferred_element_type=jnp.int32)
  return out.reshape(*A.shape[:-1], B.shape[0])


def int8_double_quant(A: jax.Array, threshold: float = 0.0):  # pylint: disable=invalid-name
  """Row-wise and column-wise int8 quantization (bitsandbytes' name).

  As bitsandbytes 0.50: the row-wise part is `int8_vectorwise_quant(A,
  threshold)`; the column-wise part takes each column's absmax (outlier
  elements `|a| >= threshold` excluded and zeroed) and computes
  `round(A * 127 / col_stats)` (`A * 127` in `A`'s dtype, the division in
  float32, ties to even). A column whose absmax is 0 quantizes to 0.

  Args:
    A: float `[rows, cols]` (or `[..., cols]`; bitsandbytes' CUDA op wants
      float16).
    threshold: outlier threshold; 0 disables it.

  Returns:
    `(CA, CAt, row_stats, col_stats, outlier_cols)`: row-wise int8 of A's
    shape, column-wise int8 of A's shape (not transposed, as bitsandbytes),
    float32 `[rows]`, float32 `[cols]`, and the int32 outlier column indices
    (None when `threshold == 0`; with `threshold > 0` only outside
    `jax.jit`, see `int8_vectorwise_quant`).

  Raises:
    TypeError: `A` is not a float array.
    ValueError: a negative threshold.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb import functional as F
    >>> ca, cat, rs, cs, cols = F.int8_double_quant(
    ...     jnp.asarray([[1.0, -2.0], [0.5, 4.0]], jnp.float16))
    >>> cat, rs, cs, cols
    (Array([[127, -64],
           [ 64, 127]], dtype=int8), Array([2., 4.], dtype=float32), Array([1., 4.], dtype=float32), None)
  """
  fn = "int8_double_quant"
  validation.check_float_array(A, "A", fn)
  threshold = validation.check_threshold(threshold, fn)
  A = jnp.asarray(A)
  a2d = A.reshape(-1, A.shape[-1])
  ca, row_stats, mask = reference.int8_vectorwise_quant(a2d, threshold)
  absval = jnp.abs(a2d)
  a_col = a2d
  if threshold > 0.0:
    outliers = absval >= jnp.asarray(threshold, a2d.dtype)
    absval = jnp.where(outliers, jnp.zeros_like(absval), absval)
    a_col = jnp.where(outliers, jnp.zeros_like(a2d), a2d)
  col_stats = jnp.max(absval, axis=0).astype(jnp.float32)
  scaled = (a_col * jnp.asarray(127.0, a2d.dtype)).astype(jnp.float32)
  q = jnp.round(scaled / col_stats[None, :])
  q = jnp.where(jnp.isfinite(q), q, 0.0)
  cat = jnp.clip(q, -128, 127).astype(jnp.int8)
  cols = None
  if mask is not None:
    if isinstance(mask, jax.core.Tracer):
      raise NotImplementedError(
          f"{fn}: outlier column indices have a data-dependent length and "
          "cannot be traced; use int8_vectorwise_quant_mask under jax.jit.")
    cols = jnp.asarray(np.flatnonzero(np.asarray(mask)), jnp.int32)
  return (ca.reshape(A.shape), cat.reshape(A.shape), row_stats, col_stats,
          cols)
