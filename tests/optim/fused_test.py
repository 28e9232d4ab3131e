"""The fused in-place step (`optim.apply_updates_fused`, `optim.fused_step`).

Every check compares against the optax path, `tx.update` then
`optax.apply_updates`, bit for bit: parameters and every state array. The
CPU tests run the kernel in Pallas interpret mode (the in-place variant
and the plain one) or the reference rules; the `gpu` ones compile it.
"""

from __future__ import annotations

import warnings

from flax.training import train_state
import jax
import jax.numpy as jnp
import optax
import pytest

import jaxbnb
from jaxbnb import optim
from tests import helpers
from tests.optim import _common


def _tree(dtype, seed=0, n=(8, 100)):
  """An 8-bit leaf with a partial block (min_8bit_size=256), a 32-bit one."""
  k = jax.random.split(jax.random.key(seed), 2)
  p = {"w": jax.random.normal(k[0], n) * 0.05,
       "b": jax.random.normal(k[1], (40,))}
  # Values near 0 make `p + (new_p - p)` differ from `new_p`.
  p["w"] = p["w"].at[0, :8].set(jnp.array([0, 1e-6, -1e-6, 3e-5, -2e-4,
                                           1e-8, 5e-4, -0.0]))
  return jax.tree.map(lambda x: x.astype(dtype), p)


def _grads(params, step):
  k = jax.random.fold_in(jax.random.key(99), step)
  leaves, treedef = jax.tree.flatten(params)
  ks = jax.random.split(k, len(leaves))
  g = [jax.random.normal(kk, x.shape) * 0.1 for kk, x in zip(ks, leaves)]
  g[-1] = g[-1].at[0, 9].set(jnp.nan)  # "w": state reset, p kept
  return treedef.unflatten([x.astype(p.dtype) for x, p in zip(g, leaves)])


def _plain(tx):
  def step(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return jax.jit(step)


def _run_both(tx, params, steps, mode):
  """(plain, fused) results after `steps` steps, each from its own copy."""
  with jaxbnb.kernel_mode(mode):
    state = tx.init(params)
    plain, fused = _plain(tx), optim.fused_step(tx)
    pp, ps = params, state
    fp, fs = jax.tree.map(jnp.copy, (params, state))
    for t in range(steps):
      g = _grads(params, t)
      pp, ps = plain(g, ps, pp)
      fp, fs = fused(g, fs, fp)
  return (pp, ps), (fp, fs)


# (alias, kwargs, param dtype): every kernel kind, weight decay on/off,
# the three parameter dtypes, an 8-bit and a 32-bit leaf in each tree.
CASES = [
    ("adamw8bit", dict(learning_rate=1e-2), jnp.float32),
    ("adam8bit", dict(learning_rate=1e-2), jnp.bfloat16),
    ("lion8bit", dict(learning_rate=1e-2, weight_decay=0.5), jnp.float16),
    ("sgd8bit", dict(learning_rate=0.1, momentum=0.9, nesterov=True,
                     weight_decay=0.1), jnp.float32),
    ("rmsprop8bit", dict(learning_rate=1e-2, weight_decay=0.1), jnp.float32),
    ("adagrad8bit", dict(learning_rate=0.1), jnp.bfloat16),
    ("ademamix8bit", dict(learning_rate=1e-2, t_alpha=4, t_beta3=4),
     jnp.float32),
    # the 32-bit leaf clipped by the trust ratio, the 8-bit one by the kernel
    ("lamb8bit", dict(learning_rate=1e-2, weight_decay=1e-2), jnp.bfloat16),
    ("lars8bit", dict(learning_rate=0.1, momentum=0.9, weight_decay=0.1),
     jnp.float32),
]


@pytest.mark.parametrize("name,kw,dtype", CASES,
                         ids=[f"{c[0]}-{jnp.dtype(c[2]).name}" for c in CASES])
def test_bit_identical_to_optax_path_interpret(name, kw, dtype):
  """The in-place kernel against the plain one, both in interpret mode:
  the same arithmetic, but XLA:CPU compiles each program on its own and
  may contract a state's multiply-add into an FMA in one only (JAX 0.12.1
  does, for Adam's and LAMB's bfloat16 cases): bit for bit but for that
  (`assert_trees_equal_but_fma`). Compiled on the GPU both run one Triton
  kernel, bit for bit (`test_gpu_bit_identical_compiled`)."""
  tx = getattr(optim, name)(min_8bit_size=256, **kw)
  plain, fused = _run_both(tx, _tree(dtype), steps=3, mode="interpret")
  helpers.assert_trees_equal_but_fma(plain, fused)
  assert isinstance(fused[1].state1["w"], optim.Quantized8bit)


def test_reference_mode_32bit_and_paged():
  """Off the GPU (kernel mode "reference"), for 32-bit states and for a
  paged state the step is the plain computation in one program: the same
  bits."""
  for tx in (optim.adamw32bit(1e-2),
             optim.paged_lion8bit(1e-3, min_8bit_size=256)):
    plain, fused = _run_both(tx, _tree(jnp.bfloat16), steps=2,
                             mode="reference")
    _common.assert_trees_bitwise_equal(plain, fused)


def test_chain_clip_and_inject_hyperparams():
  """optax.chain(clip_by_global_norm, inject_hyperparams(adamw8bit)) with
  the learning rate and weight decay changed between steps."""
  tx = optax.chain(
      optax.clip_by_global_norm(0.5),
      optax.inject_hyperparams(optim.adamw8bit)(
          learning_rate=1e-2, weight_decay=0.1, min_8bit_size=256))
  params = _tree(jnp.float32, seed=3)
  with jaxbnb.kernel_mode("interpret"):
    plain, fused = _plain(tx), optim.fused_step(tx)
    ps = tx.init(params)
    fs = jax.tree.map(jnp.copy, ps)
    pp, fp = params, jax.tree.map(jnp.copy, params)
    for t, (lr, wd) in enumerate([(1e-2, 0.1), (3e-3, 0.0)]):
      for s in (ps, fs):
        s[1].hyperparams["learning_rate"] = jnp.float32(lr)
        s[1].hyperparams["weight_decay"] = jnp.float32(wd)
      g = _grads(params, t)
      pp, ps = plain(g, ps, pp)
      fp, fs = fused(g, fs, fp)
  _common.assert_trees_bitwise_equal((pp, ps), (fp, fs))


def test_donation_updates_in_place():
  tx = optim.adamw8bit(1e-2, min_8bit_size=256)
  params = _tree(jnp.float32)
  state = tx.init(params)
  step = optim.fused_step(tx)
  g = _grads(params, 0)
  with jaxbnb.kernel_mode("interpret"):
    compiled = step.lower(g, state, params).compile()
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # "donated buffers were not usable"
      new_params, new_state = step(g, state, params)
  # The inputs were donated and are gone; every parameter and state array
  # of the output reuses an input buffer (input_output_alias).
  donated = jax.tree.leaves((state, params))
  assert all(x.is_deleted() for x in donated)
  hlo = compiled.as_text()
  header = hlo[:hlo.index("\n")]
  outs = jax.tree.leaves((new_params, new_state))
  assert header.count("may-alias") + header.count("must-alias") == len(outs)
  assert not any(x.is_deleted() for x in outs)


def test_user_loop_and_train_state_loop():
  """A plain loop with the user's own jit, and a flax TrainState loop."""
  tx = optim.lion8bit(1e-3, weight_decay=0.1, min_8bit_size=256)
  params = _tree(jnp.bfloat16, seed=5)

  def loss_fn(p, x):
    return jnp.sum((x @ p["w"].astype(jnp.float32)) ** 2) + jnp.sum(
        p["b"].astype(jnp.float32) ** 2)

  x = jnp.ones((2, 8))

  @jax.jit
  def ref_step(ts):
    grads = jax.grad(loss_fn)(ts.params, x)
    return ts.apply_gradients(grads=grads)

  def fused_ts_step(ts):
    grads = jax.grad(loss_fn)(ts.params, x)
    params, opt_state = optim.apply_updates_fused(ts.tx, grads, ts.opt_state,
                                                  ts.params)
    return ts.replace(step=ts.step + 1, params=params, opt_state=opt_state)

  fused_ts_step = jax.jit(fused_ts_step, donate_argnums=0)

  def user_step(params, opt_state):
    grads = jax.grad(loss_fn)(params, x)
    return optim.apply_updates_fused(tx, grads, opt_state, params)

  user_step = jax.jit(user_step, donate_argnums=(0, 1))
  with jaxbnb.kernel_mode("interpret"):
    mk = lambda: train_state.TrainState.create(  # noqa: E731
        apply_fn=None, params=jax.tree.map(jnp.copy, params), tx=tx)
    ref, ts = mk(), mk()
    p, s = jax.tree.map(jnp.copy, (params, tx.init(params)))
    for _ in range(2):
      ref = ref_step(ref)
      ts = fused_ts_step(ts)
      p, s = user_step(p, s)
  _common.assert_trees_bitwise_equal((ref.params, ref.opt_state),
                                     (ts.params, ts.opt_state))
  _common.assert_trees_bitwise_equal((ref.params, ref.opt_state), (p, s))
  assert int(ts.step) == 2


def test_partly_served_multi_transform():
  """Leaves the alias does not own are applied as optax.apply_updates does."""
  tx = optax.multi_transform(
      {"8bit": optim.adamw8bit(1e-2, min_8bit_size=256),
       "sgd": optax.sgd(0.1)}, {"w": "8bit", "b": "sgd"})
  plain, fused = _run_both(tx, _tree(jnp.float32), steps=2,
                           mode="reference")
  _common.assert_trees_bitwise_equal(plain, fused)


@pytest.mark.parametrize("make", [
    lambda: optax.chain(optim.scale_by_adam8bit(),
                        optax.scale_by_learning_rate(1e-3)),
    lambda: optax.chain(optim.adamw8bit(1e-3), optax.scale(0.5)),
    lambda: optax.MultiSteps(optim.adamw8bit(1e-3), every_k_schedule=2),
    lambda: optax.adamw(1e-3),
], ids=["scale_by_block", "chained_after", "multisteps", "optax_adamw"])
def test_unserved_transformations_raise(make):
  tx = make()
  params = _tree(jnp.float32)
  state = tx.init(params)
  with pytest.raises(NotImplementedError, match="scale_by_\\*8bit"):
    optim.apply_updates_fused(tx, _grads(params, 0), state, params)


def test_bad_arguments():
  tx = optim.adamw8bit()
  params = _tree(jnp.float32)
  with pytest.raises(ValueError, match="tx must be an optax"):
    optim.apply_updates_fused(optax.adamw, params, None, params)
  with pytest.raises(ValueError, match="params=None"):
    optim.apply_updates_fused(tx, params, tx.init(params), None)


# ------------------------------------------------------------------- GPU


GPU_CASES = [
    ("adamw8bit", dict(learning_rate=1e-3), jnp.float32),
    ("adamw8bit", dict(learning_rate=1e-3), jnp.bfloat16),
    ("ademamix8bit", dict(learning_rate=1e-3), jnp.float16),
    ("lion8bit", dict(learning_rate=1e-4, weight_decay=0.1), jnp.float32),
    ("sgd8bit", dict(learning_rate=1e-2, momentum=0.9, weight_decay=0.01),
     jnp.bfloat16),
    ("lamb8bit", dict(learning_rate=1e-3, weight_decay=0.01), jnp.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,kw,dtype", GPU_CASES,
                         ids=[f"{c[0]}-{jnp.dtype(c[2]).name}"
                              for c in GPU_CASES])
def test_gpu_bit_identical_compiled(name, kw, dtype):
  """Compiled Triton kernel (in place) vs the optax path (kernel, then XLA
  applies the update): the same bits; the fused step moves no parameter-
  sized temporary (the plain one holds new_p and the update)."""
  tx = getattr(optim, name)(**kw)
  params = _tree(dtype, n=(96, 1000))  # 375 blocks: a partial program
  plain, fused = _run_both(tx, params, steps=3, mode="pallas")
  _common.assert_trees_bitwise_equal(plain, fused)
  with jaxbnb.kernel_mode("pallas"):
    state = tx.init(params)
    g = _grads(params, 0)
    mem = optim.fused_step(tx).lower(g, state, params).compile()
    mem = mem.memory_analysis()
  w_bytes = params["w"].size * params["w"].dtype.itemsize
  assert mem.temp_size_in_bytes < w_bytes, mem
