"""Tests of the 8-bit state format and the per-leaf update rules.

`update_32bit` is checked against independent float64 numpy versions of
bnb's 32-bit CUDA formulas; `quantize_state` against a brute-force nearest
code search; the 8-bit rules for bnb's NaN/Inf reset and sign fix.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxbnb._src.optim import rules as optim_rules
from jaxbnb._src.optim import state as optim_state
from jaxbnb._src.optim.rules import Hyper
from tests import helpers

# Honest bounds of `update_32bit` against the float64 formulas (derived, not
# tuned; tests/helpers.py `ulp`). Both sides round p to its dtype at the same
# points (bnb's T registers), so the only differences are (a) a value that
# jaxbnb computes in float32 and numpy in float64 can fall on either side of
# a rounding midpoint: one ulp of p's dtype at the result's magnitude per
# rounding of p (bf16: 8 bits of mantissa, ulp = 2**-7 relative), and (b)
# float32 arithmetic on the update itself (a few eps of |update|).
# Roundings of p per step: adam/ademamix/lion round the update and the
# weight decay separately (2); momentum/rmsprop/adagrad round once.
P_ROUNDINGS = {"adam": 2, "ademamix": 2, "lion": 2, "momentum": 1,
               "rmsprop": 1, "adagrad": 1}
F32_OPS = 16  # float32 roundings in the longest update chain (ademamix)


def _coef_rel(h: Hyper) -> float:
  """Relative error of the update from the betas held in float32 (as bnb
  does): |beta_f32 - beta| <= eps/2, so (1 - beta) and the bias corrections
  1 - beta^t are off by up to eps/2 / (1 - beta) relative (0.999: 6e-5)."""
  betas = [h.beta1, h.beta2] + ([h.beta3] if h.kind == "ademamix" else [])
  if h.kind not in ("adam", "ademamix", "rmsprop"):
    return 0.0
  return sum(helpers.F32_EPS / (1 - b) for b in betas if 0 < b < 1)
# For bf16, p starts at 1e-3 x the fp32 scale, so that every update (lr x
# O(1) direction, >= 1e-4) is hundreds of bf16 ulp of p: with p ~ 0.1 one
# bf16 ulp (2**-11 ~ 5e-4) is larger than Lion's or SGD's whole step, and a
# no-op update would pass any honest bound on p alone.
P_SCALE = {jnp.float32: 0.1, jnp.bfloat16: 1e-4}

HYPERS = {
    "adam": Hyper("adam", weight_decay=1e-2),
    "ademamix": Hyper("ademamix", weight_decay=1e-2),
    "ademamix_sched": Hyper("ademamix", t_alpha=10, t_beta3=10,
                            weight_decay=1e-2),
    "lion": Hyper("lion", beta1=0.9, beta2=0.99, weight_decay=1e-2),
    "momentum": Hyper("momentum", beta1=0.9, beta2=0.0, weight_decay=1e-2),
    "nesterov": Hyper("momentum", beta1=0.9, beta2=0.0, nesterov=True),
    "rmsprop": Hyper("rmsprop", beta1=0.9, beta2=0.0, weight_decay=1e-2),
    "adagrad": Hyper("adagrad", beta1=0.0, beta2=0.0, eps=1e-10,
                     weight_decay=1e-2),
}
LRS = {"adam": 1e-3, "ademamix": 1e-3, "lion": 1e-4, "momentum": 1e-2,
       "rmsprop": 1e-2, "adagrad": 1e-2}


def _np_step(h: Hyper, p, g, s1, s2, lr, t, dtype):
  """bnb's 32-bit formulas in float64, rounding p to `dtype` where bnb does."""
  rnd = lambda x: np.asarray(x, dtype).astype(np.float64)
  g = rnd(g)
  if h.kind in ("adam", "ademamix"):
    c1 = 1 - h.beta1 ** t
    c2 = math.sqrt(1 - h.beta2 ** t)
    if h.kind == "adam":
      s1 = h.beta1 * s1 + (1 - h.beta1) * g
      s2 = h.beta2 * s2 + (1 - h.beta2) * g * g
      p = rnd(p - lr * c2 / c1 * s1 / (np.sqrt(s2) + h.eps * c2))
    else:
      alpha = min(t * h.alpha / h.t_alpha, h.alpha) if h.t_alpha else h.alpha
      b3 = h.beta3
      if h.t_beta3:
        l1, l3, s = math.log(h.beta1), math.log(h.beta3), t / h.t_beta3
        b3 = min(math.exp(l1 * l3 / ((1 - s) * l3 + s * l1)), h.beta3)
      m1 = h.beta1 * s1[0] + (1 - h.beta1) * g
      m2 = b3 * s1[1] + (1 - b3) * g
      s2 = h.beta2 * s2 + (1 - h.beta2) * g * g
      p = rnd(p - lr * (m1 / c1 + alpha * m2) / (np.sqrt(s2) / c2 + h.eps))
      s1 = np.stack([m1, m2])
    if h.weight_decay:
      p = rnd(p * (1 - lr * h.weight_decay))
    return p, s1, s2
  if h.weight_decay and h.kind != "lion":
    g = rnd(g + h.weight_decay * p)
  if h.kind == "momentum":
    s1 = g if t == 1 else h.beta1 * s1 + g
    p = rnd(p - lr * (g + h.beta1 * s1 if h.nesterov else s1))
  elif h.kind == "lion":
    p = rnd(p * (1 - lr * h.weight_decay))
    p = rnd(p - lr * np.sign(h.beta1 * s1 + (1 - h.beta1) * g))
    s1 = h.beta2 * s1 + (1 - h.beta2) * g
  elif h.kind == "rmsprop":
    s1 = h.beta1 * s1 + (1 - h.beta1) * g * g
    p = rnd(p - lr * g / (np.sqrt(s1) + h.eps))
  else:
    s1 = s1 + g * g
    p = rnd(p - lr * g / (np.sqrt(s1) + h.eps))
  return p, s1, None


def _states32(h, shape):
  lead = (2,) if h.kind == "ademamix" else ()
  s1 = np.zeros(lead + shape)
  s2 = np.zeros(shape) if h.kind in ("adam", "ademamix") else None
  return s1, s2


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(HYPERS))
def test_update_32bit_matches_float64_formulas(name, dtype):
  h = HYPERS[name]
  lr = LRS[h.kind]
  shape = (64, 33)
  rng = np.random.default_rng(0)
  p0 = rng.standard_normal(shape).astype(np.float32) * P_SCALE[dtype]
  p = jnp.asarray(p0, dtype)
  s1, s2 = _states32(h, shape)
  s1j = jnp.asarray(s1, jnp.float32)
  s2j = None if s2 is None else jnp.asarray(s2, jnp.float32)
  pn = np.asarray(p, np.float64)
  step = jax.jit(lambda p, g, a, b, t: optim_rules.update_32bit(
      h.kind, p, g, a, b, lr=lr, step=t, hyper=h))
  np_dtype = np.float32 if dtype == jnp.float32 else ml_dtypes.bfloat16
  rnd = lambda x: np.asarray(x, np_dtype).astype(np.float64)
  for t in range(1, 11):
    g = (0.01 * rng.standard_normal(shape)).astype(np.float32)
    gn = np.asarray(jnp.asarray(g, dtype), np.float64)
    # The gradient the rule uses: bnb rounds g + wd p to p's dtype (not Lion,
    # not the 2-state rules); float32 vs float64 can land one ulp apart there.
    g_rounded = h.weight_decay and h.kind in ("momentum", "rmsprop",
                                              "adagrad")
    g_eff = rnd(gn + h.weight_decay * pn) if g_rounded else gn
    # Its error: the float32 sum g + wd p (one float32 ulp of |g| + |wd p|,
    # which can be large next to a cancelled g_eff) and the rounding to p's
    # dtype on the other side of a midpoint (one ulp of g_eff there).
    g_err = (helpers.ulp(g_eff, np_dtype) + helpers.ulp(
        np.abs(gn) + np.abs(h.weight_decay * pn), np.float32)
             if g_rounded else 0.0)
    p_old, s1_old, s2_old = pn, s1, s2
    p, s1j, s2j = step(p, jnp.asarray(g, dtype), s1j, s2j, t)
    pn, s1, s2 = _np_step(h, pn, gn, s1, s2, lr, t, np_dtype)
    got = np.asarray(p, np.float64)
    want_upd = pn - p_old
    # Bound on the update: (a) + (b) above, plus g_err carried by the
    # direction (momentum: lr (1 + b1) g_err; rmsprop/adagrad: the
    # derivative of g / (sqrt(s) + eps) in g is at most 2 / (sqrt(s) + eps)).
    mag = np.abs(p_old) + np.abs(want_upd)
    s_new = s1 if h.kind in ("rmsprop", "adagrad") else 1.0
    bound = (P_ROUNDINGS[h.kind] * helpers.ulp(mag, np_dtype)
             + F32_OPS * helpers.F32_EPS * mag
             + _coef_rel(h) * np.abs(want_upd)
             + (lr * (1 + h.beta1) * g_err if h.kind == "momentum"
                else lr * 2 * g_err / (np.sqrt(s_new) + h.eps)))
    # The bound must be much smaller than the update itself, or a no-op or a
    # half-strength update could pass (the old atol 1e-3 let both through for
    # bf16 Lion and SGD). At most a quarter of the update on the median
    # element, so a no-op (error |upd|) and a half-strength update (error
    # |upd| / 2) both fail on at least half the elements. (bf16 Lion is the
    # loosest: after 10 steps |p| ~ 1e-3 and lr = 1e-4 is ~13 bf16 ulp.)
    assert np.median(bound / np.maximum(np.abs(want_upd), 1e-30)) < 0.25, (
        t, np.median(bound / np.abs(want_upd)))
    helpers.assert_within(got - p_old, want_upd, bound,
                          err_msg=f"{name} {dtype.__name__} step {t} update")
    # States are float32 on both sides: float32 arithmetic on |s| and on its
    # two terms (decayed old state, new gradient term g or g*g), including the
    # float32 rounding of the betas (|beta_f32 - beta| <= eps/2, which is
    # eps/2 |x| absolute in (1 - beta) x), plus g_err where the state takes
    # g + wd p (s1 += g, or += (1 - b1) g*g: 2 |g| g_err).
    s_g = {"momentum": g_err,
           "rmsprop": (1 - h.beta1) * 2 * np.abs(g_eff) * g_err,
           "adagrad": 2 * np.abs(g_eff) * g_err}.get(h.kind, 0.0)
    x = np.abs(g_eff) + g_eff * g_eff
    helpers.assert_within(
        np.asarray(s1j), s1,
        F32_OPS * helpers.F32_EPS * (np.abs(s1) + np.abs(s1_old) + x) + s_g,
        err_msg=f"{name} step {t} state1")
    if s2 is not None:
      helpers.assert_within(
          np.asarray(s2j), s2,
          F32_OPS * helpers.F32_EPS * (np.abs(s2) + np.abs(s2_old) + x),
          err_msg=f"{name} step {t} state2")
    # Resync the reference to the tested values (bnb's harness does too).
    pn = got
    s1 = np.asarray(s1j, np.float64)
    if s2 is not None:
      s2 = np.asarray(s2j, np.float64)


# ----------------------------------------------------------- quantize_state


def _brute_codes(x, signed):
  """Nearest code by exhaustive search + bnb's sign fix, and tie flags."""
  qmap = np.asarray(optim_state.signed_map() if signed
                    else optim_state.unsigned_map(), np.float64)
  n = x.size
  blocks = np.zeros(math.ceil(n / 256) * 256)
  blocks[:n] = x
  blocks = blocks.reshape(-1, 256)
  absmax = np.abs(blocks).max(axis=1)
  scaled = (blocks.astype(np.float32) / absmax[:, None].astype(np.float32))
  d = np.abs(scaled.astype(np.float64)[..., None] - qmap)
  codes = d.argmin(-1)
  srt = np.sort(d, axis=-1)
  tie = srt[..., 0] == srt[..., 1]
  if signed:
    flip = np.signbit(qmap[codes]) != np.signbit(blocks)
    codes = np.where(flip, codes + np.where(blocks > 0, 1, -1), codes) % 256
  return (codes.reshape(-1)[:n].astype(np.uint8), tie.reshape(-1)[:n],
          absmax.astype(np.float32))


@pytest.mark.parametrize("signed", [True, False])
def test_quantize_state_is_nearest_code(signed):
  rng = np.random.default_rng(1)
  x = rng.standard_normal(5000) * np.exp(rng.uniform(-12, 2, 5000))
  if not signed:
    x = np.abs(x)
  x = x.astype(np.float32)
  q = optim_state.quantize_state(jnp.asarray(x), signed)
  want, tie, absmax = _brute_codes(x, signed)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  got = np.asarray(q.codes)
  assert np.all((got == want) | tie), np.flatnonzero((got != want) & ~tie)
  assert tie.sum() < 5


def test_sign_fix_keeps_every_state_sign():
  rng = np.random.default_rng(2)
  # Tiny values next to a large one quantize to 0 (code 127) or the wrong
  # side without the sign fix.
  x = rng.standard_normal(4096).astype(np.float32) * 1e-6
  x[::256] = 1.0
  x[5] = -0.0
  q = optim_state.quantize_state(jnp.asarray(x), signed=True)
  vals = np.asarray(optim_state.signed_map())[np.asarray(q.codes)]
  assert np.all(np.signbit(vals) == np.signbit(x))
  assert np.all(vals[x < 0] < 0)


def test_zero_block_codes_match_cuda():
  q1 = optim_state.quantize_state(jnp.zeros((300,)), signed=True)
  q2 = optim_state.quantize_state(jnp.zeros((300,)), signed=False)
  # 0/0 = NaN searches down to code 0; the signed sign fix wraps it to 255.
  assert np.all(np.asarray(q1.codes) == 255)
  assert np.all(np.asarray(q2.codes) == 0)
  assert np.all(np.asarray(q1.dequantize()) == 0.0)
  assert np.asarray(q1.absmax).tolist() == [0.0, 0.0]


def test_stacked_state_has_one_absmax_row_per_state():
  x = jnp.stack([jnp.full((300,), 2.0), jnp.full((300,), -0.5)])
  q = optim_state.quantize_state(x, signed=True, stacked=True)
  assert q.absmax.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(q.absmax), [[2, 2], [.5, .5]])
  # -1.0 is not in the signed map: -max|x| comes back as code 0 (-0.99297).
  want = np.asarray(x) * np.array([[1.0], [-optim_state.signed_map()[0]]])
  np.testing.assert_allclose(np.asarray(q.dequantize()), want, rtol=1e-7)


def test_quantized8bit_is_a_pytree_with_static_sign():
  q = optim_state.Quantized8bit.zeros((10,), signed=False)
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 2
  assert jax.tree.unflatten(treedef, leaves).signed is False
  out = jax.jit(lambda q: q)(q)
  assert out.signed is False and out.codes.dtype == jnp.uint8


# ------------------------------------------------------------- 8-bit rules


def _zeros8(h, shape):
  s1 = optim_state.Quantized8bit.zeros(
      shape, True, leading=2 if h.kind == "ademamix" else None)
  s2 = (optim_state.Quantized8bit.zeros(shape, False)
        if h.kind in ("adam", "ademamix") else None)
  return s1, s2


@pytest.mark.parametrize("name", ["adam", "ademamix", "lion", "momentum",
                                  "rmsprop", "adagrad"])
def test_nonfinite_gradient_resets_only_that_element(name):
  h = HYPERS[name]
  shape = (16, 40)
  rng = np.random.default_rng(3)
  p = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  s1, s2 = _zeros8(h, shape)
  step = jax.jit(lambda p, g, a, b, t: optim_rules.update_8bit(
      h.kind, p, g, a, b, lr=1e-2, step=t, hyper=h))
  for t in (1, 2):
    g = jnp.asarray(0.01 * rng.standard_normal(shape), jnp.float32)
    p, s1, s2 = step(p, g, s1, s2, t)
  g = g.at[3, 4].set(jnp.nan).at[7, 0].set(jnp.inf)
  new_p, n1, n2 = step(p, g, s1, s2, 3)
  for i in [(3, 4), (7, 0)]:
    assert float(new_p[i]) == float(p[i])
    d1 = n1.dequantize()
    assert np.all(np.asarray(d1[..., i[0], i[1]]) == 0.0)
    if n2 is not None:
      assert float(n2.dequantize()[i]) == 0.0
  ok = np.isfinite(np.asarray(g))
  assert np.all(np.isfinite(np.asarray(new_p)))
  assert np.mean(np.asarray(new_p)[ok] != np.asarray(p)[ok]) > 0.9
  assert np.all(np.asarray(n1.dequantize())[..., ok] != 0.0)


def test_8bit_states_requantized_with_new_absmax():
  h = HYPERS["adam"]
  shape = (8, 100)
  rng = np.random.default_rng(4)
  p = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  s1, s2 = _zeros8(h, shape)
  _, n1, n2 = optim_rules.update_8bit("adam", p, g, s1, s2, lr=1e-3, step=1,
                                      hyper=h)
  gf = np.asarray(g).reshape(-1)
  want1 = np.zeros(1024)
  want1[:800] = np.abs(np.float32(0.1) * gf)
  # Padded tail elements load code 128 with absmax 0: they contribute 0.
  np.testing.assert_allclose(np.asarray(n1.absmax),
                             want1.reshape(4, 256).max(1), rtol=1e-6)
  assert np.asarray(n2.absmax).shape == (4,)
  d1 = np.asarray(n1.dequantize()).reshape(-1)
  np.testing.assert_allclose(d1, 0.1 * gf, rtol=0.05, atol=1e-3 * 0.1 * 3)


@pytest.mark.parametrize("name", sorted(HYPERS))
def test_first_step_8bit_close_to_32bit(name):
  """From zero states, one 8-bit step moves p like the 32-bit rule."""
  h = HYPERS[name]
  if h.kind in ("rmsprop", "adagrad"):  # see the decay quirk test below
    h = dataclasses.replace(h, weight_decay=0.0)
  shape = (32, 300)
  rng = np.random.default_rng(5)
  p = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  g = jnp.asarray(0.01 * rng.standard_normal(shape), jnp.float32)
  s1, s2 = _zeros8(h, shape)
  z1, z2 = _states32(h, shape)
  p8, n1, _ = optim_rules.update_8bit(h.kind, p, g, s1, s2, lr=LRS[h.kind],
                                      step=1, hyper=h)
  p32, m1, _ = optim_rules.update_32bit(
      h.kind, p, g, jnp.asarray(z1, jnp.float32),
      None if z2 is None else jnp.asarray(z2, jnp.float32),
      lr=LRS[h.kind], step=1, hyper=h)
  np.testing.assert_allclose(np.asarray(p8), np.asarray(p32), atol=1e-6,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(n1.dequantize()), np.asarray(m1),
                             atol=3e-3, rtol=1e-3)


def test_hyper_rejects_unknown_kind():
  with pytest.raises(ValueError, match="unknown kind 'adamx'"):
    Hyper("adamx")


@pytest.mark.parametrize("kind", ["rmsprop", "adagrad"])
def test_8bit_rmsprop_adagrad_numerator_is_the_raw_gradient(kind):
  """bnb's 1-state 8-bit kernel decays the state's gradient (g + wd p) but
  divides the raw g (its 32-bit kernel divides g + wd p); we follow each."""
  h = Hyper(kind, beta1=0.9 if kind == "rmsprop" else 0.0, beta2=0.0,
            eps=0.0, weight_decay=0.5)
  p = jnp.full((4,), 2.0)
  g = jnp.full((4,), 1.0)
  s1, _ = _zeros8(h, (4,))
  p8, n1, _ = optim_rules.update_8bit(kind, p, g, s1, None, lr=0.1, step=1,
                                      hyper=h)
  p32, m1, _ = optim_rules.update_32bit(kind, p, g, jnp.zeros((4,)), None,
                                        lr=0.1, step=1, hyper=h)
  gd = 1.0 + 0.5 * 2.0
  v = gd * gd * (0.1 if kind == "rmsprop" else 1.0)
  np.testing.assert_allclose(np.asarray(n1.dequantize()), v, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(m1), v, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(p8), 2.0 - 0.1 * 1.0 / math.sqrt(v),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(p32), 2.0 - 0.1 * gd / math.sqrt(v),
                             rtol=1e-6)
