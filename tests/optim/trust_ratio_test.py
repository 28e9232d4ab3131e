"""LAMB and LARS (`jaxbnb.optim.lamb*` / `lars*`) against bitsandbytes.

Fixture: tests/golden/bnb_trust_ratio.npz from
tests/golden/make_bnb_trust_ratio_golden.py (bnb 0.50.2's torch version of
its CUDA LAMB/LARS kernels, and its `PytorchLARS`). Compared with bnb's own
32-bit optimizer test tolerance (rtol 1e-5, atol 1e-6) on the parameter
after every step. The float64 formulas below check the same rules on
bfloat16 parameters and under `optax.inject_hyperparams`.
"""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxbnb import optim

GOLDEN = pathlib.Path(__file__).parents[1] / "golden" / "bnb_trust_ratio.npz"


def _run(opt, p0, grads, dtype=jnp.float32):
  params = {"w": jnp.asarray(p0, dtype)}
  state = opt.init(params)
  out = []
  for g in grads:
    updates, state = opt.update({"w": jnp.asarray(g, dtype)}, state, params)
    params = optax.apply_updates(params, updates)
    out.append(np.asarray(params["w"], np.float32))
  return np.stack(out), state


def _make(cfg):
  name, lr, b1, b2, eps, wd, max_unorm = cfg
  if name == "lamb":
    return optim.lamb32bit(lr, b1, b2, eps, wd, max_unorm=max_unorm)
  return optim.lars32bit(lr, b1, weight_decay=wd, max_unorm=max_unorm)


@pytest.fixture(scope="module")
def golden():
  data = np.load(GOLDEN)
  return data, json.loads(str(data["meta"]))


@pytest.mark.parametrize("case", ["lamb", "lamb_wd", "lars", "lars_wd",
                                  "lars_unclipped", "pytorch_lars"])
def test_trajectory_matches_bitsandbytes(golden, case):
  data, meta = golden
  cfg = meta[case] if case in meta else meta["cases"][case]
  got, _ = _run(_make(cfg), data["p0"], data["grads"])
  np.testing.assert_allclose(got, data[case], rtol=1e-5, atol=1e-6)
  # The comparison means something: the trust ratio changed the trajectory
  # (except in the unclipped case, which must equal plain Adam / SGD).
  name, lr, b1, b2, eps, wd, _ = cfg
  plain = (optim.adam32bit(lr, b1, b2, eps, wd) if name == "lamb"
           else optim.sgd32bit(lr, b1, weight_decay=wd))
  unclipped, _ = _run(plain, data["p0"], data["grads"])
  moved = np.max(np.abs(unclipped - data[case]))
  if case == "lars_unclipped":
    assert moved < 1e-6
  else:
    assert moved > 100 * 1e-6


def _np_lamb(p, g, m, v, t, lr, b1, b2, eps, wd, max_unorm, dtype):
  """bnb's CUDA LAMB (kPreconditionOptimizer32bit2State + 2State), float64."""
  rnd = lambda x: np.asarray(np.asarray(x, dtype), np.float64)
  g = rnd(g)
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  unorm, limit = np.sqrt(np.sum(u * u)), max_unorm * np.linalg.norm(p)
  scale = limit / unorm if unorm > limit else 1.0
  c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
  p = rnd(p + scale * (-lr * c2 / c1) * (m / (np.sqrt(v) + eps * c2)))
  return rnd(p * (1 - lr * wd)), m, v


def _np_lars(p, g, s, t, lr, mom, wd, max_unorm, dtype):
  """bnb's CUDA LARS (kPreconditionOptimizer32bit1State + 1State), float64:
  the norm is of the momentum of the gradient *before* the weight decay."""
  rnd = lambda x: np.asarray(np.asarray(x, dtype), np.float64)
  g = rnd(g)
  pre = g if t == 1 else mom * s + g
  gd = rnd(g + wd * p)
  s = gd if t == 1 else mom * s + gd
  unorm, limit = np.sqrt(np.sum(pre * pre)), max_unorm * np.linalg.norm(p)
  scale = limit / unorm if unorm > limit else 1.0
  return rnd(p - scale * lr * s), s


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["lamb", "lars"])
def test_rules_match_the_cuda_formulas(kind, dtype):
  rng = np.random.default_rng(1)
  npdt = np.float32 if dtype == jnp.float32 else jnp.bfloat16
  p0 = np.asarray(np.asarray(rng.normal(0, 0.1, (33, 17)), npdt), np.float64)
  grads = [rng.normal(0, 0.05, p0.shape) for _ in range(4)]
  if kind == "lamb":
    opt = optim.lamb32bit(1e-2, weight_decay=1e-2, max_unorm=0.1)
  else:
    opt = optim.lars32bit(0.3, 0.9, weight_decay=1e-2, max_unorm=0.02)
  got, _ = _run(opt, p0, [np.asarray(g, npdt) for g in grads], dtype)
  p, m, v, s = p0, np.zeros_like(p0), np.zeros_like(p0), np.zeros_like(p0)
  for t, g in enumerate(grads, 1):
    g = np.asarray(np.asarray(g, npdt), np.float64)
    if kind == "lamb":
      p, m, v = _np_lamb(p, g, m, v, t, 1e-2, 0.9, 0.999, 1e-8, 1e-2, 0.1,
                         npdt)
    else:
      p, s = _np_lars(p, g, s, t, 0.3, 0.9, 1e-2, 0.02, npdt)
    # one ulp of p's dtype per rounding of p (two for LAMB: step, decay)
    ulp = (2 ** -23 if dtype == jnp.float32 else 2 ** -7) * np.abs(p)
    np.testing.assert_array_less(np.abs(got[t - 1] - p), 2 * ulp + 1e-7)


def test_zero_parameters_never_move():
  """bnb's ratio bounds the update by max_unorm * ||p||: 0 for p = 0."""
  params = {"w": jnp.zeros((8,))}
  for opt in (optim.lamb32bit(), optim.lars32bit(0.1, 0.9)):
    updates, _ = opt.update({"w": jnp.ones((8,))}, opt.init(params), params)
    assert not np.any(np.asarray(updates["w"]))


@pytest.mark.parametrize("kind", ["lamb", "lars"])
def test_8bit_leaves_take_the_plain_8bit_step(kind):
  """bnb's 8-bit blockwise kernels have no update-norm clipping: a leaf
  with 8-bit states steps as Adam8bit / SGD8bit (bit for bit), a leaf under
  min_8bit_size as LAMB32bit / LARS32bit."""
  rng = np.random.default_rng(2)
  params = {"big": jnp.asarray(rng.normal(0, 0.1, (64, 80)), jnp.float32),
            "small": jnp.asarray(rng.normal(0, 0.1, (12,)), jnp.float32)}
  if kind == "lamb":
    opt, big, small = (optim.lamb8bit(1e-2), optim.adam8bit(1e-2),
                       optim.lamb32bit(1e-2))
  else:
    opt, big, small = (optim.lars8bit(0.5, 0.9), optim.sgd8bit(0.5, 0.9),
                       optim.lars32bit(0.5, 0.9))
  states = [o.init(params) for o in (opt, big, small)]
  assert isinstance(states[0].state1["big"], optim.Quantized8bit)
  for _ in range(3):
    g = jax.tree.map(lambda x: jnp.asarray(
        rng.normal(0, 0.05, x.shape), jnp.float32), params)
    outs = [o.update(g, s, params) for o, s in zip((opt, big, small), states)]
    states = [s for _, s in outs]
    (u, _), (u_big, _), (u_small, _) = outs
    np.testing.assert_array_equal(u["big"], u_big["big"])
    np.testing.assert_array_equal(u["small"], u_small["small"])
    params = optax.apply_updates(params, u)


@pytest.mark.parametrize("make", [
    optim.lamb32bit, functools.partial(optim.lars32bit, momentum=0.9)])
@pytest.mark.parametrize("max_unorm", [0.0, 0.05])
def test_inject_hyperparams_matches_static(make, max_unorm):
  """A traced max_unorm (0: off, decided per step) gives the static result;
  so does a learning rate changed between steps."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(0, 0.1, (40, 9)), jnp.float32)}
  grads = [{"w": jnp.asarray(rng.normal(0, 0.05, (40, 9)), jnp.float32)}
           for _ in range(3)]
  injected = optax.inject_hyperparams(make)(learning_rate=0.1,
                                            max_unorm=max_unorm)
  static = make(learning_rate=0.1, max_unorm=max_unorm)
  s_inj, s_sta = injected.init(params), static.init(params)
  step = jax.jit(lambda g, s, p: injected.update(g, s, p))
  for g in grads:
    u1, s_inj = step(g, s_inj, params)
    u2, s_sta = static.update(g, s_sta, params)
    # jit may round p differently by one float32 ulp (|p| < 0.5: 3e-8)
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6, atol=3e-8)
    params = optax.apply_updates(params, u2)


def test_in_nnx_optimizer_trains():
  """The way a Flax user calls it: nnx.Optimizer, jitted step."""

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.a = nnx.Linear(64, 80, rngs=rngs)
      self.b = nnx.Linear(80, 1, rngs=rngs)

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  model = Model(nnx.Rngs(0))
  opt = nnx.Optimizer(model, optim.lamb8bit(1e-3), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (32, 64))
  y = jnp.sum(x[:, :4], axis=1, keepdims=True)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(
        lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, grads)
    return loss

  losses = [float(step(model, opt)) for _ in range(30)]
  assert losses[-1] < 0.5 * losses[0], losses
  sd = optim.to_torch_state_dict(opt.opt_state, nnx.state(model, nnx.Param),
                                 unorm_vec=True)
  quant = [e["__bnb_optimizer_quant_state__"] for e in sd["state"].values()]
  assert all(q["unorm_vec"].shape == (1,) for q in quant)
  assert sum("absmax1" in q for q in quant) == 1  # a.kernel: 5,120 >= 4,096


def test_state_dict_round_trip_ignores_unorm_vec():
  params = {"w": jnp.ones((64, 80)), "b": jnp.ones((5,))}
  opt = optim.lamb8bit()
  state = opt.update(jax.tree.map(jnp.ones_like, params), opt.init(params),
                     params)[1]
  sd = optim.to_bnb_state_dict(state, params, unorm_vec=True)
  assert sorted(sd["['b']"]) == ["state1", "state2", "step", "unorm_vec"]
  back = optim.from_bnb_state_dict(sd, params, opt.init(params))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert "unorm_vec" not in optim.to_bnb_state_dict(state, params)["['b']"]


@pytest.mark.parametrize("make, match", [
    (lambda: optim.lamb8bit(max_unorm=0.5),
     r"lamb8bit: max_unorm must be 1.0 with optim_bits=8, got max_unorm=0.5"),
    (lambda: optim.lamb32bit(max_unorm=-1.0),
     r"lamb32bit: max_unorm must be a finite number >= 0, got max_unorm=-1"),
    (lambda: optim.lars8bit(0.1, 0.9, max_unorm=float("inf")),
     r"lars8bit: max_unorm must be a finite number >= 0, got max_unorm=inf"),
    (lambda: optim.lars32bit(0.1, 0.9, dampening=0.1),
     r"lars32bit: dampening must be 0, got dampening=0.1"),
    (lambda: optim.lars8bit(0.1, 0.0),
     r"lars8bit: momentum must be in \(0, 1\)"),
    (lambda: optim.lamb32bit(b2=1.0), r"lamb32bit: b2 must be in \[0, 1\)"),
    (lambda: optim.adamw8bit(float("inf")),
     r"adamw8bit: learning_rate must be a finite number >= 0, got "
     r"learning_rate=inf"),
    (lambda: optim.sgd8bit(0.1, 0.9, weight_decay=float("nan")),
     r"sgd8bit: weight_decay must be a finite number >= 0"),
    (lambda: optim.Hyper("lion", max_unorm=1.0),
     r"max_unorm \(update-norm clipping\) applies to kinds"),
])
def test_bad_hyperparameters_name_the_argument(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_lamb8bit_with_32bit_states_takes_any_max_unorm():
  opt = optim.lamb8bit(max_unorm=0.5, optim_bits=32)
  state = opt.init({"w": jnp.ones((64, 80))})
  assert state.state1["w"].dtype == jnp.float32


@pytest.mark.parametrize("make", [
    lambda: optim.lars32bit(0.1, 0.9, nesterov="yes"),
    lambda: optim.sgd8bit(0.1, 0.9, nesterov=1),
])
def test_nesterov_must_be_a_bool(make):
  with pytest.raises(ValueError, match=r"nesterov must be a bool, got "
                     r"nesterov="):
    make()
