"""Fused blockwise 8-bit optimizer update (bitsandbytes' optimizer kernels).

One pass per step: each program loads `block_rows` blocks of 256 elements of
the parameter, the gradient, the uint8 codes of the states and their old
per-block absmax; dequantizes the states through the two 256-entry dynamic
maps; applies the update rule in float32; takes the new per-block absmax
(max |s| over the block, a reduction inside the program); requantizes with
bitsandbytes' binary search (7 steps from pivot 127, then the midpoint
comparison, ties as in CUDA) plus the sign fix for the signed map; and
writes the new parameter (its own dtype), codes and absmax. With
`apply_updates=True` the parameter written is `p + (new_p - p)` instead,
each operation rounded on its own: exactly what `optax.apply_updates` makes
of the `new_p - p` update that jaxbnb's optax transformations return, so a
fused in-place step (`alias=True`, donated buffers) lands on the optax
path's parameters bit for bit without reading p twice.

The rules mirror jaxbnb's pure-jnp reference (`jaxbnb._src.optim.rules.
update_8bit`) operation by operation, including where a value is rounded to
the parameter dtype, the tail-block padding (gradient 0, parameter 0,
signed codes 128, unsigned codes 0) and the NaN/Inf rule (a non-finite
gradient resets that element's state to 0 and keeps its parameter).

Kinds: "adam" (Adam, AdamW), "ademamix", "momentum" (SGD, optionally
nesterov), "rmsprop", "adagrad", "lion". Hyper-parameters that change
during training (lr, the step, the bias corrections, AdEMAMix's alpha and
beta3 schedules) and the betas, eps and weight decay come in as one small
float32 array, so a new learning rate or step never recompiles; only the
kind, nesterov, "weight decay > 0" (or None: decided per step from the
scalar, for a traced weight decay) and the dtypes are static.

Requantizing with lookup tables (`code_tables.quantize_tables`, built on
the host from a concrete map and checked there) gives the search's codes in
two lookups instead of five; without them the kernel runs the search.

This is a leaf module: it imports jax and `code_tables` only; the maps are
array inputs. Its `KINDS`, `TWO_STATE_KINDS` and `BLOCKSIZE` repeat
jaxbnb's (`jaxbnb._src.optim.rules` / `state`), which are their home;
tests/kernels/optim_8bit_test.py asserts that the two agree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _backend
from pallas_kernels import code_tables
from pallas_kernels._backend import pl
from pallas_kernels._backend import pltriton

__all__ = ["BLOCKSIZE", "KINDS", "SCALARS", "TWO_STATE_KINDS", "can_use",
           "num_states", "optimizer_update_8bit", "pack_scalars"]

BLOCKSIZE = 256
KINDS = ("adam", "ademamix", "lion", "momentum", "rmsprop", "adagrad")
TWO_STATE_KINDS = ("adam", "ademamix")
_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)

# Layout of the float32 scalar array (unused slots are ignored).
SCALARS = ("lr", "step", "beta1", "beta2", "eps", "weight_decay",
           "corr1", "corr2", "alpha", "beta3")
_S = {name: i for i, name in enumerate(SCALARS)}
# One derived slot the wrapper appends: Adam's step size
# `(-lr * corr2) / corr1`, a scalar division done once per call in XLA
# (IEEE, as the reference does it) instead of once per element.
_STEP_SIZE = len(SCALARS)


def num_states(kind: str) -> int:
  """2 for adam/ademamix, 1 for the 1-state kinds."""
  return 2 if kind in TWO_STATE_KINDS else 1


def can_use(kind: str, n: int, dtype) -> bool:
  """Whether the kernel serves this update (else use the reference).

  Args:
    kind: the update rule (one of `KINDS`).
    n: number of parameter elements.
    dtype: the parameter dtype.
  """
  return (_backend.available() and kind in KINDS and n > 0
          and n < 2**31 - 2 * BLOCKSIZE
          and jnp.dtype(dtype) in _DTYPES)


# ------------------------------------------------------------ float helpers


def _asm(op: str, nargs: int, *args):
  a = jnp.broadcast_arrays(*args)
  return pltriton.elementwise_inline_asm(
      f"{op}.f32 $0, " + ", ".join(f"${i + 1}" for i in range(nargs)) + ";",
      args=list(a),
      constraints="=r" + ",r" * nargs,
      pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(a[0].shape, jnp.float32)],
  )[0]


def _div(a, b, interpret):
  """IEEE fp32 division (Triton's `/` is the approximate `div.full`)."""
  if interpret:
    return a / b
  return _asm("div.rn", 2, a, b)


def _sqrt(a, interpret):
  """IEEE fp32 square root."""
  if interpret:
    return jnp.sqrt(a)
  return _asm("sqrt.rn", 1, a)


def _round_to(x, dtype, interpret):
  """bnb's `T(x)`: round to the parameter dtype, read back as float32.

  In interpret mode through `_backend.round_to_dtype` (XLA may otherwise
  drop the pair of conversions); Triton keeps them.
  """
  if dtype == jnp.float32:
    return x
  if interpret:
    return _backend.round_to_dtype(x, dtype)
  return x.astype(dtype).astype(jnp.float32)


def _apply_update(pf, new, interpret):
  """`pf + (new - pf)` in float32, each op rounded on its own (no FMA).

  `optax.apply_updates(p, u)` with the update `u = new - p` of jaxbnb's
  transformations: `new` itself may end in a product (weight decay), which
  the compiler must not contract into the subtraction.
  """
  if interpret:  # the barrier keeps XLA from fusing `new`'s product in
    new = jax.lax.optimization_barrier(new)
    return pf + (new - pf)
  return _asm("add.rn", 2, pf, _asm("sub.rn", 2, new, pf))


def _sgn(x):
  return (x > 0).astype(jnp.float32) - (x < 0).astype(jnp.float32)


def _if_decay(has_wd, wd, decayed, plain):
  """`decayed` with weight decay on; with `has_wd` None, where `wd > 0`."""
  return decayed if has_wd else jnp.where(wd > 0, decayed, plain)


# ----------------------------------------------------------- requantization


def _requantize(s, absmax, q_ref, signed, interpret, lut=None):
  """uint8-valued int32 codes of fp32 blocks `s` [R, 256] (+ sign fix).

  `lut`: the `(lo_ref, aux_ref)` of `quantize_tables`, or None for the
  binary search.
  """
  x = _div(s, absmax[:, None], interpret)
  if lut is None:
    code, value = code_tables.search(x, q_ref)
    negative = jnp.signbit(value)
  else:
    lo_ref, aux_ref = lut
    code = code_tables.quantize_lut(x, lo_ref, aux_ref)
    negative = code < aux_ref[256].astype(jnp.int32)
  if signed:
    flip = negative != jnp.signbit(s)
    code = jnp.where(flip, code + jnp.where(s > 0, 1, -1), code) & 255
  return code


# ------------------------------------------------------------------ kernel


def _kernel(*refs, kind, nesterov, has_wd, dtype, n, nblocks, block_rows,
            layout, apply_updates, lut, interpret):
  nst = num_states(kind)
  stacked = kind == "ademamix"
  refs = list(refs)
  h_ref, q1_ref = refs[:2]
  q2_ref = refs.pop(2) if nst == 2 else None
  refs = refs[2:]
  luts = {}
  if lut:
    luts[True] = (refs[0], refs[1])
    if nst == 2:
      luts[False] = (refs[2], refs[3])
    refs = refs[2 * nst:]
  if nst == 2:
    (p_ref, g_ref, c1_ref, a1_ref, c2_ref, a2_ref,
     po_ref, c1o_ref, a1o_ref, c2o_ref, a2o_ref) = refs
  else:
    (p_ref, g_ref, c1_ref, a1_ref, po_ref, c1o_ref, a1o_ref) = refs
  r = block_rows
  f32 = jnp.float32
  pid = pl.program_id(0)
  rows = pid * r + jnp.arange(r, dtype=jnp.int32)
  row_ok = rows < nblocks
  if layout == "flat":
    idx = pid * (r * BLOCKSIZE) + jnp.arange(r * BLOCKSIZE, dtype=jnp.int32)
    mask = idx < n
    shape2 = (r, BLOCKSIZE)

    def load(ref, other):
      return pltriton.load(ref, mask=mask, other=other).reshape(shape2)

    def store(ref, v):
      pltriton.store(ref, v.reshape(-1), mask=mask)
  else:
    mask = jnp.broadcast_to(row_ok[:, None], (r, BLOCKSIZE))

    def load(ref, other):
      return pltriton.load(ref, mask=mask, other=other)

    def store(ref, v):
      pltriton.store(ref, v, mask=mask)

  def sub(ref, k):  # the k-th stacked state (AdEMAMix's state1)
    return ref if k is None else ref.at[jnp.int32(k)]

  def load_state(c_ref, a_ref, q_ref, pad_code, k=None):
    c = load(sub(c_ref, k), pad_code).astype(jnp.int32)
    am = pltriton.load(sub(a_ref, k), mask=row_ok, other=0)
    return q_ref[c] * am[:, None]

  def store_state(s, c_ref, a_ref, q_ref, signed, k=None):
    am = jnp.max(jnp.abs(s), axis=1)
    code = _requantize(s, am, q_ref, signed, interpret, luts.get(signed))
    store(sub(c_ref, k), code.astype(jnp.uint8))
    pltriton.store(sub(a_ref, k), am, mask=row_ok)

  hs = lambda name: h_ref[_S[name]]
  lr, b1, b2 = hs("lr"), hs("beta1"), hs("beta2")
  eps, wd = hs("eps"), hs("weight_decay")
  one = f32(1.0)
  pf = load(p_ref, 0).astype(f32)
  gf = _round_to(load(g_ref, 0).astype(f32), dtype, interpret)
  finite = jnp.abs(gf) < jnp.inf
  zero = f32(0.0)

  if nst == 2:
    c1, c2 = hs("corr1"), hs("corr2")
    s2 = load_state(c2_ref, a2_ref, q2_ref, 0)
    s2 = jnp.where(finite, (s2 * b2) + (((one - b2) * gf) * gf), zero)
    if kind == "adam":
      s1 = load_state(c1_ref, a1_ref, q1_ref, 128)
      s1 = jnp.where(finite, (s1 * b1) + ((one - b1) * gf), zero)
      step_size = h_ref[_STEP_SIZE]
      new = _round_to(
          pf + (step_size * _div(s1, _sqrt(s2, interpret) + (c2 * eps),
                                 interpret)), dtype, interpret)
      states1 = [s1]
    else:
      alpha, b3 = hs("alpha"), hs("beta3")
      m1 = load_state(c1_ref, a1_ref, q1_ref, 128, 0)
      m2 = load_state(c1_ref, a1_ref, q1_ref, 128, 1)
      m1 = jnp.where(finite, (m1 * b1) + ((one - b1) * gf), zero)
      m2 = jnp.where(finite, (m2 * b3) + ((one - b3) * gf), zero)
      num = _div(m1, c1, interpret) + (alpha * m2)
      den = _div(_sqrt(s2, interpret), c2, interpret) + eps
      new = _round_to(pf - lr * _div(num, den, interpret), dtype, interpret)
      states1 = [m1, m2]
    if has_wd is not False:
      new = _if_decay(has_wd, wd,
                      _round_to(new * (one - (lr * wd)), dtype, interpret),
                      new)
    new = jnp.where(finite, new, pf)
    for k, s in enumerate(states1):
      store_state(s, c1o_ref, a1o_ref, q1_ref, True, k if stacked else None)
    store_state(s2, c2o_ref, a2o_ref, q2_ref, False)
  else:
    s1 = load_state(c1_ref, a1_ref, q1_ref, 128)
    gv, pf_l = gf, pf
    if has_wd is not False:
      if kind == "lion":
        pf_l = _if_decay(has_wd, wd,
                         _round_to(pf * (one - lr * wd), dtype, interpret),
                         pf)
      else:
        gv = _if_decay(has_wd, wd, gv + pf * wd, gv)
    if kind == "momentum":
      s1 = jnp.where(hs("step") == 1, gv, (s1 * b1) + gv)
    elif kind == "lion":
      upd = _round_to(lr * _sgn((s1 * b1) + ((one - b1) * gv)), dtype,
                      interpret)
      s1 = s1 * b2 + ((one - b2) * gv)
    elif kind == "rmsprop":
      s1 = s1 * b1 + ((one - b1) * (gv * gv))
    else:  # adagrad
      s1 = s1 + (gv * gv)
    s1 = jnp.where(finite, s1, zero)
    if kind == "momentum":
      d = gv + b1 * s1 if nesterov else s1
      new = pf - lr * d
    elif kind == "lion":
      new = pf_l - upd
    else:  # rmsprop, adagrad: the raw gradient in the numerator
      new = pf - lr * _div(gf, _sqrt(s1, interpret) + eps, interpret)
    new = jnp.where(finite, _round_to(new, dtype, interpret), pf)
    store_state(s1, c1o_ref, a1o_ref, q1_ref, True)
  if apply_updates:
    new = _apply_update(pf, new, interpret)
  store(po_ref, new.astype(dtype))


@functools.partial(
    jax.jit,
    static_argnames=("kind", "nesterov", "has_wd", "block_rows", "num_warps",
                     "layout", "alias", "apply_updates", "interpret"))
def optimizer_update_8bit(
    p: jax.Array,
    g: jax.Array,
    codes1: jax.Array,
    absmax1: jax.Array,
    codes2: jax.Array | None,
    absmax2: jax.Array | None,
    qmap1: jax.Array,
    qmap2: jax.Array | None,
    scalars: jax.Array,
    tables1: tuple[jax.Array, jax.Array] | None = None,
    tables2: tuple[jax.Array, jax.Array] | None = None,
    *,
    kind: str,
    nesterov: bool = False,
    has_wd: bool | None = False,
    block_rows: int = 4,
    num_warps: int = 4,
    layout: str | None = None,
    alias: bool = False,
    apply_updates: bool = False,
    interpret: bool = False,
):
  """One fused 8-bit blockwise optimizer step for one flat leaf.

  Args:
    p: parameters, flat [n], float32/float16/bfloat16.
    g: gradient, flat [n] (any float dtype; rounded to p's dtype first).
    codes1: uint8 codes of state1 (signed map), [n] (AdEMAMix: [2, n]).
    absmax1: float32 [nblocks] (AdEMAMix: [2, nblocks]).
    codes2: uint8 codes of state2 (unsigned map) [n], or None (1-state).
    absmax2: float32 [nblocks], or None.
    qmap1: the signed dynamic map, float32 [256].
    qmap2: the unsigned dynamic map, float32 [256], or None.
    scalars: float32 [len(SCALARS)]: lr, step, beta1, beta2, eps,
      weight_decay, corr1 = 1 - beta1^step, corr2 = sqrt(1 - beta2^step),
      alpha and beta3 (AdEMAMix, after their schedules).
    tables1: `code_tables.quantize_tables(qmap1)`, or None: the states are
      requantized by the binary search (same codes, more lookups).
    tables2: `quantize_tables(qmap2)` (2-state kinds, with `tables1`).
    kind: one of `KINDS`.
    nesterov: momentum only.
    has_wd: whether weight_decay > 0 (static, as in the reference), or
      None to decide it per step from the scalar (a traced weight decay).
    block_rows: 256-element blocks per program (power of two).
    num_warps: Triton warps per program.
    layout: "rows" (a [nblocks, 256] view; needs n % 256 == 0) or "flat"
      (1-D loads masked at n, any n); default "rows" when it applies.
    alias: write the states (and p) in place of their inputs
      (`input_output_aliases`; pays off when the caller donates them).
    apply_updates: write `p + (new_p - p)` (each op rounded on its own,
      then cast to p's dtype), which is what `optax.apply_updates` computes
      from the `new_p - p` update of jaxbnb's transformations, instead of
      `new_p`. Both are the same for most elements; not for all.
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    (new_p [n] in p's dtype, new codes1, new absmax1, new codes2, new
    absmax2); the last two are None for 1-state kinds.

  Examples:
    >>> n = 512
    >>> p = jnp.ones((n,))
    >>> z = jnp.zeros((n,), jnp.uint8)
    >>> a = jnp.zeros((n // BLOCKSIZE,))
    >>> q = jnp.linspace(-1.0, 1.0, 256)
    >>> sc = pack_scalars(lr=0.1, step=1, beta1=0.9)
    >>> out = optimizer_update_8bit(p, p, z, a, None, None, q, None, sc,
    ...                             kind="momentum", alias=True,
    ...                             apply_updates=True, interpret=True)
    >>> round(float(out[0][0]), 4), out[3] is None
    (0.9, True)
  """
  n = p.shape[0]
  nblocks = -(-n // BLOCKSIZE)
  has_wd = None if has_wd is None else bool(has_wd)
  nst = num_states(kind)
  stacked = kind == "ademamix"
  dtype = jnp.dtype(p.dtype)
  if layout is None:
    layout = "rows" if n % BLOCKSIZE == 0 else "flat"
  if layout == "rows" and n % BLOCKSIZE:
    raise ValueError(f"layout 'rows' needs n % {BLOCKSIZE} == 0, got n={n}.")
  r = block_rows
  lead = (2,) if stacked else ()
  if layout == "rows":
    view = lambda a, ld=(): a.reshape(ld + (nblocks, BLOCKSIZE))
    espec = lambda ld=(): pl.BlockSpec(
        ld + (r, BLOCKSIZE), lambda i: (0,) * len(ld) + (i, 0))
  else:
    view = lambda a, ld=(): a.reshape(ld + (n,))
    espec = lambda ld=(): pl.BlockSpec(
        ld + (r * BLOCKSIZE,), lambda i: (0,) * len(ld) + (i,))
  aspec = lambda ld=(): pl.BlockSpec(ld + (r,),
                                     lambda i: (0,) * len(ld) + (i,))
  full = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)
  scalars = scalars.astype(jnp.float32).reshape(len(SCALARS))
  step_size = jnp.float32(0.0)
  if kind == "adam":
    step_size = ((-scalars[_S["lr"]]) * scalars[_S["corr2"]]) / scalars[
        _S["corr1"]]
  scalars = jnp.concatenate([scalars, step_size[None]])
  qmap1 = qmap1.astype(jnp.float32)
  args = [scalars, qmap1]
  if nst == 2:
    qmap2 = qmap2.astype(jnp.float32)
    args.append(qmap2)
  lut = tables1 is not None
  if (tables2 is not None) != (lut and nst == 2):
    raise ValueError(f"optimizer_update_8bit({kind!r}): tables2 must be "
                     f"given with tables1 for a 2-state kind and not "
                     f"otherwise, got tables1={lut}, "
                     f"tables2={tables2 is not None}.")
  if lut:
    for tables in (tables1, tables2)[:nst]:
      args += [jnp.asarray(tables[0], jnp.uint8),
               jnp.asarray(tables[1], jnp.float32)]
  n_tables = len(args)
  args += [view(p), view(g), view(codes1, lead),
           absmax1.astype(jnp.float32).reshape(lead + (nblocks,))]
  specs = [full(a) for a in args[:n_tables]]
  specs += [espec(), espec(), espec(lead), aspec(lead)]
  if nst == 2:
    args += [view(codes2), absmax2.astype(jnp.float32).reshape(nblocks)]
    specs += [espec(), aspec()]
  args = _backend.same_vma(*args)
  like = args[n_tables]
  out_shape = [_backend.out_struct(args[n_tables].shape, dtype, like),
               _backend.out_struct(args[n_tables + 2].shape, jnp.uint8, like),
               _backend.out_struct(lead + (nblocks,), jnp.float32, like)]
  out_specs = [espec(), espec(lead), aspec(lead)]
  if nst == 2:
    out_shape += [_backend.out_struct(args[n_tables + 4].shape, jnp.uint8,
                                      like),
                  _backend.out_struct((nblocks,), jnp.float32, like)]
    out_specs += [espec(), aspec()]
  aliases = {}
  if alias:
    aliases = {n_tables: 0, n_tables + 2: 1, n_tables + 3: 2}
    if nst == 2:
      aliases.update({n_tables + 4: 3, n_tables + 5: 4})
  kernel = functools.partial(
      _kernel, kind=kind, nesterov=nesterov, has_wd=has_wd, dtype=dtype,
      n=n, nblocks=nblocks, block_rows=r, layout=layout,
      apply_updates=apply_updates, lut=lut, interpret=interpret)
  state_bytes = nst + (1 if stacked else 0)
  outs = pl.pallas_call(
      kernel,
      out_shape=tuple(out_shape),
      grid=(pl.cdiv(nblocks, r),),
      in_specs=specs,
      out_specs=tuple(out_specs),
      input_output_aliases=aliases,
      compiler_params=_backend.compiler_params(num_warps=num_warps,
                                               num_stages=1),
      interpret=interpret,
      name=f"jaxbnb_optim_8bit_{kind}",
      cost_estimate=pl.CostEstimate(
          flops=60 * n, transcendentals=2 * n,
          bytes_accessed=n * (2 * dtype.itemsize + g.dtype.itemsize
                              + 2 * state_bytes) + 8 * nblocks * state_bytes),
  )(*args)
  new_p = outs[0].reshape(n)
  c1 = outs[1].reshape(lead + (n,))
  a1 = outs[2]
  if nst == 2:
    return new_p, c1, a1, outs[3].reshape(n), outs[4]
  return new_p, c1, a1, None, None


def pack_scalars(**kw) -> jax.Array:
  """The float32 scalar array from keyword values (missing ones are 0)."""
  unknown = set(kw) - set(SCALARS)
  if unknown:
    raise ValueError(f"pack_scalars: unknown names {sorted(unknown)}; "
                     f"expected some of {SCALARS}.")
  return jnp.stack([jnp.asarray(kw.get(k, 0.0), jnp.float32).reshape(())
                    for k in SCALARS])

