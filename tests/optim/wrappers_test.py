"""Every `jaxbnb.optim` optimizer inside the training loops users write.

Per optimizer (8-bit, 32-bit and paged): `flax.nnx.Optimizer` under
`nnx.jit`, flax's `TrainState`, `optax.inject_hyperparams`,
`optax.MultiSteps` and `optax.chain` / `optax.multi_transform` /
`optax.masked`, each with an orbax save, a restore into the abstract state
and a resumed run that equals the uninterrupted one bit for bit. The model
is tiny, but its (64, 64) kernel has 4096 elements, so the 8-bit optimizers
keep 8-bit state for it (checked).

Results of two different compiled programs (e.g. an injected learning rate
against a constant one) are compared within `ATOL`: XLA may contract
multiply-adds differently in each, and an ulp can move an 8-bit code.
Inputs are committed to the device, as restored arrays are, so a resumed run
reuses the compiled step.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings

import flax.nnx as nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxbnb import optim
from jaxbnb._src.optim import paged as optim_paged
from tests import helpers
from tests.optim import _common

NAMES = sorted(
    name for name in optim.__all__
    if inspect.isfunction(getattr(optim, name))
    and name.endswith(("8bit", "32bit")) and not name.startswith("scale_by_"))
LR = 1e-3
ATOL = 2e-5  # 2% of a step of LR: an 8-bit code moved by one


def _commit(tree):
  """`tree` with every array committed where it is (memory kind kept) and
  not weakly typed, as orbax restores it."""
  def commit(x):
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
      return x
    return jax.device_put(jax.lax.convert_element_type(x, x.dtype),
                          x.sharding)
  return jax.tree.map(commit, tree)


X = _commit(jnp.asarray(np.random.default_rng(0).standard_normal((8, 64)),
                        jnp.float32))
Y = _commit(jnp.asarray(np.random.default_rng(1).standard_normal((8, 64)),
                        jnp.float32))


def _make(name):
  kwargs = {"momentum": 0.9} if name.startswith(("sgd", "lars")) else {}
  return getattr(optim, name)(learning_rate=LR, **kwargs)


def _params():
  rng = np.random.default_rng(2)
  return _commit({
      "w": jnp.asarray(rng.standard_normal((64, 64)) * 0.1, jnp.float32),
      "b": jnp.asarray(rng.standard_normal((64,)) * 0.1, jnp.float32)})


@functools.cache
def _grads(step: int, frozen: bool = False):
  """Deterministic gradients of step `step` (norm < 1: clipping is inert)."""
  rng = np.random.default_rng(100 + step)
  g = {k: jnp.asarray(0.01 * rng.standard_normal(v.shape), jnp.float32)
       for k, v in _params().items()}
  if frozen:
    g["frozen"] = jnp.asarray(0.01 * rng.standard_normal((8,)), jnp.float32)
  return _commit(g)


def _step_fn(tx):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


@functools.cache
def _plain(name):
  """Parameters after each of 3 plain optax steps on `_grads` (run eagerly:
  op by op, cheaper here than compiling one more step)."""
  tx = _make(name)
  params, state = _params(), tx.init(_params())
  out = []
  for i in range(3):
    updates, state = tx.update(_grads(i), state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out


def _assert_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0,
                               atol=ATOL)


def _save_restore(path, tree, abstract):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()
    return ckptr.restore(path, abstract)


@contextlib.contextmanager
def _restored():
  """Context of the steps after a restore: orbax restores arrays typed as
  device memory, where a paged state then stays, with a warning when the
  step is traced (see test_paged_state_keeps_its_memory_space)."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "paged_.* typed as device memory")
    yield


def _check_state(name, opt_state, restored=False):
  """The big leaf's state is 8-bit (codes, absmax) for the 8-bit optimizers,
  float32 otherwise, and lives in host memory for the paged ones (unless
  `restored`: see `_restored`)."""
  st = _common.state_of(opt_state)
  big = [s for s in jax.tree.leaves(
      st.state1, is_leaf=lambda x: isinstance(x, optim.Quantized8bit))
         if np.prod(s.shape) >= 4096]
  assert len(big) == 1, st
  if name.endswith("8bit"):
    assert isinstance(big[0], optim.Quantized8bit), type(big[0])
    assert big[0].codes.dtype == jnp.uint8, big[0].codes.dtype
    assert big[0].codes.shape[-2:] == (64, 64), big[0].codes.shape
  else:
    assert big[0].dtype == jnp.float32, big[0]
  kinds = set(jax.tree.leaves(optim_paged.memory_kinds((st.state1,
                                                        st.state2))))
  if not name.startswith("paged_"):
    assert not kinds & set(optim_paged.HOST_KINDS), kinds
  elif not restored:
    assert kinds <= set(optim_paged.HOST_KINDS), kinds


# ------------------------------------------------------------ flax.nnx


@nnx.jit
def _nnx_step(model, optimizer, x, y):
  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer(name, tmp_path):
  tx = _make(name)

  def create():
    model = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.update((model, optimizer), _commit(nnx.state((model, optimizer))))
    return model, optimizer

  model, optimizer = create()
  losses = [float(_nnx_step(model, optimizer, X, Y)) for _ in range(5)]
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  _check_state(name, nnx.as_pure(optimizer.opt_state))
  assert int(optimizer.step[...]) == 5
  full = nnx.state((model, optimizer))

  model, optimizer = create()
  for _ in range(2):
    _nnx_step(model, optimizer, X, Y)
  restored = _save_restore(tmp_path / "ckpt", nnx.state((model, optimizer)),
                           nnx.state(nnx.eval_shape(create)))
  model, optimizer = create()
  nnx.update((model, optimizer), restored)
  with _restored():
    for _ in range(3):
      _nnx_step(model, optimizer, X, Y)
  _check_state(name, nnx.as_pure(optimizer.opt_state), restored=True)
  _common.assert_trees_bitwise_equal(nnx.state((model, optimizer)), full)


# ------------------------------------------------- flax.training.TrainState


def _apply(params, x):
  return x @ params["w"] + params["b"]


@jax.jit
def _train_state_step(state, x, y):
  def loss_fn(params):
    return jnp.mean((state.apply_fn(params, x) - y) ** 2)
  return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))


@pytest.mark.parametrize("name", NAMES)
def test_train_state(name, tmp_path):
  tx = _make(name)

  def create():  # step as an int32 array, as restored: no recompile
    return train_state.TrainState.create(
        apply_fn=_apply, params=_params(), tx=tx).replace(
            step=jnp.zeros([], jnp.int32))

  state = _commit(create())
  for _ in range(3):
    state = _train_state_step(state, X, Y)
  _check_state(name, state.opt_state)
  assert int(state.step) == 3
  full = state

  state = _train_state_step(_commit(create()), X, Y)
  state = _save_restore(tmp_path / "ckpt", state, jax.eval_shape(create))
  assert isinstance(state, train_state.TrainState) and int(state.step) == 1
  with _restored():
    for _ in range(2):
      state = _train_state_step(state, X, Y)
  _check_state(name, state.opt_state, restored=True)
  _common.assert_trees_bitwise_equal(state, full)


# --------------------------------------------------- optax.inject_hyperparams


def _set(hyperparams, key, value):
  """A new value for an injected hyper-parameter, as users set it."""
  old = hyperparams[key]
  hyperparams[key] = jax.device_put(jnp.asarray(value, old.dtype),
                                    old.sharding)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams(name, tmp_path):
  kwargs = {"momentum": 0.9} if name.startswith(("sgd", "lars")) else {}
  tx = optax.inject_hyperparams(getattr(optim, name))(learning_rate=LR,
                                                       **kwargs)
  step = _step_fn(tx)
  params, state = _params(), _commit(tx.init(_params()))
  assert {"learning_rate", "weight_decay"} <= set(state.hyperparams)
  _check_state(name, state)
  for i in range(2):
    params, state = step(params, state, _grads(i))
  _assert_close(params, _plain(name)[1])

  # Orbax: restore into the abstract state, continue bit for bit. (Under
  # jax.eval_shape init sees traced settings; see the next test.)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          (params, tx.init(params)))
  p, s = _save_restore(tmp_path / "ckpt", (params, state), abstract)
  with _restored():
    _common.assert_trees_bitwise_equal(step(p, s, _grads(2)),
                                       step(params, state, _grads(2)))

  # The learning rate and the weight decay change at run time.
  _set(state.hyperparams, "learning_rate", 0.0)
  frozen, _ = step(params, state, _grads(2))
  _common.assert_trees_bitwise_equal(frozen, params)
  zero_grads = jax.tree.map(jnp.zeros_like, _grads(0))
  outs = []
  for wd in (0.0, 0.5):
    fresh = _commit(tx.init(params))
    _set(fresh.hyperparams, "weight_decay", wd)
    new_params, new_state = step(params, fresh, zero_grads)
    outs.append(jax.tree.leaves((new_params, new_state.inner_state)))
  _common.assert_trees_bitwise_equal(outs[0][:2], jax.tree.leaves(params))
  # Zero gradients: only the decay moves the parameters (the 8-bit RMSprop
  # and Adagrad, whose numerator is the raw gradient: only their state).
  assert any(not np.array_equal(a, b) for a, b in zip(*outs))


def test_inject_hyperparams_under_eval_shape():
  """jax.eval_shape traces the injected numbers: optim_bits and
  min_8bit_size must then be static_args (the error says so)."""
  with pytest.raises(ValueError, match=r"static_args=\('optim_bits', "
                     r"'min_8bit_size'\)"):
    jax.eval_shape(optax.inject_hyperparams(optim.adamw8bit)().init,
                   _params())
  tx = optax.inject_hyperparams(
      optim.adamw8bit, static_args=("optim_bits", "min_8bit_size"))()
  abstract = jax.eval_shape(tx.init, _params())
  assert abstract.inner_state.state1["w"].codes.dtype == jnp.uint8


# ---------------------------------------------------------- optax.MultiSteps


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps(name, tmp_path):
  tx = optax.MultiSteps(_make(name), every_k_schedule=2)
  step = _step_fn(tx)
  params, state = _params(), _commit(tx.init(_params()))
  _check_state(name, state)
  for i in range(2):  # each micro-batch twice: the mean is that gradient
    mid, state = step(params, state, _grads(i))
    _common.assert_trees_bitwise_equal(mid, params)  # accumulating only
    params, state = step(mid, state, _grads(i))
    _assert_close(params, _plain(name)[i])
  _check_state(name, state)

  abstract = jax.eval_shape(lambda: (_params(), tx.init(_params())))
  p, s = _save_restore(tmp_path / "ckpt", (params, state), abstract)
  with _restored():
    resumed = step(*step(p, s, _grads(2)), _grads(2))
  _common.assert_trees_bitwise_equal(
      resumed, step(*step(params, state, _grads(2)), _grads(2)))


def test_paged_state_keeps_its_memory_space():
  """An update keeps the state's memory space (part of its type under jit):
  a paged state that arrives in device memory (a restored checkpoint) stays
  there with a warning, so wrappers that select between old and new state
  still work; moved back as the warning says, it is paged again."""
  name = "paged_adamw8bit"
  tx = optax.MultiSteps(optim.paged_adamw8bit(LR), every_k_schedule=2)
  step = _step_fn(tx)
  params, state = _params(), tx.init(_params())
  state = jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device),
                       state)
  with pytest.warns(UserWarning, match="typed as device memory"):
    params, state = step(*step(params, state, _grads(0)), _grads(0))
  _assert_close(params, _plain(name)[0])
  inner = state.inner_opt_state
  kinds = set(jax.tree.leaves(optim_paged.memory_kinds(inner)))
  assert kinds == {optim_paged.DEVICE_KIND}, kinds

  host = jax.memory.Space.Host
  inner = inner._replace(state1=jax.device_put(inner.state1, host),
                         state2=jax.device_put(inner.state2, host))
  state = state._replace(inner_opt_state=inner)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    params, state = step(*step(params, state, _grads(1)), _grads(1))
  _assert_close(params, _plain(name)[1])
  _check_state(name, state)


# --------------------------- optax.chain / optax.multi_transform / masked


@pytest.mark.parametrize("name", NAMES)
def test_chain_multi_transform_masked(name, tmp_path):
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.multi_transform(
          {"train": optax.masked(
              _make(name), lambda p: jax.tree.map(lambda x: x.ndim == 2, p)),
           "freeze": optax.set_to_zero()},
          {"w": "train", "b": "train", "frozen": "freeze"}))
  step = _step_fn(tx)

  def create():
    params = dict(_params(), frozen=jnp.ones((8,)))
    return params, tx.init(params)

  params, state = _commit(create())
  _check_state(name, state)
  for i in range(2):
    new, state = step(params, state, _grads(i, frozen=True))
    # masked out: the (unclipped) gradient passes through; frozen: zero.
    np.testing.assert_array_equal(
        np.asarray(new["b"]),
        np.asarray(params["b"] + _grads(i, frozen=True)["b"]))
    _common.assert_trees_bitwise_equal(new["frozen"], params["frozen"])
    params = new
  # Leaves update independently: "w" follows the plain optimizer.
  _assert_close(params["w"], _plain(name)[1]["w"])

  p, s = _save_restore(tmp_path / "ckpt", (params, state),
                       jax.eval_shape(create))
  with _restored():
    resumed = step(p, s, _grads(2, frozen=True))
  _common.assert_trees_bitwise_equal(
      resumed, step(params, state, _grads(2, frozen=True)))


# ------------------------------- bfloat16 / float16: apply_if_finite, inject


def _f32(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bf16", "fp16"])
def test_apply_if_finite_with_low_precision_gradients(dtype):
  """As docs/optim.md says: jaxbnb returns float32 updates (the aliases to
  land on bnb's parameter exactly), while optax.apply_if_finite's skip
  branch returns zeros of the gradients' dtype, so lax.cond refuses
  bfloat16 / float16 gradients. Cast to float32 they work, as the
  unwrapped optimizer on the original gradients (its kernels round the
  gradient to the parameter's dtype anyway: the same arithmetic, bit for
  bit but where XLA:CPU contracts a multiply-add into an FMA in one
  program and not the other); so does a skip of one's own with
  `zeros_like(updates)`."""
  params = jax.tree.map(lambda x: x.astype(dtype), _params())
  grads = [jax.tree.map(lambda x: x.astype(dtype), _grads(i))
           for i in range(2)]
  for inner in (optim.adamw8bit(LR),
                optax.chain(optim.scale_by_adam8bit(),
                            optax.scale_by_learning_rate(LR))):
    tx = optax.apply_if_finite(inner, max_consecutive_errors=3)
    with pytest.raises(TypeError, match="cond branches must have equal "
                       "output types"):
      tx.update(grads[0], tx.init(params), params)

    @jax.jit
    def step(p, s, g, tx=tx):
      u, s = tx.update(_f32(g), s, p)
      return optax.apply_updates(p, u), s

    @jax.jit
    def plain_step(p, s, g, inner=inner):
      u, s = inner.update(g, s, p)
      return optax.apply_updates(p, u), s

    @jax.jit
    def skip_step(p, s, g, ok, inner=inner):
      u, new_s = inner.update(g, s, p)
      u, s = jax.lax.cond(ok, lambda: (u, new_s),
                          lambda: (jax.tree.map(jnp.zeros_like, u), s))
      return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    ref_p, ref_s = params, inner.init(params)
    own_p, own_s = params, inner.init(params)
    for g in grads:
      p, s = step(p, s, g)
      ref_p, ref_s = plain_step(ref_p, ref_s, g)
      own_p, own_s = skip_step(own_p, own_s, g, True)
      assert jax.tree.leaves(p)[0].dtype == dtype
    # Three programs: XLA:CPU may contract a multiply-add apart in each.
    helpers.assert_trees_equal_but_fma(p, ref_p)
    helpers.assert_trees_equal_but_fma(s.inner_state, ref_s)
    helpers.assert_trees_equal_but_fma(own_p, ref_p)
    # A non-finite gradient is skipped: parameters and state unchanged.
    bad = jax.tree.map(lambda x: x.at[0].set(jnp.nan), grads[0])
    p2, s2 = step(p, s, bad)
    _common.assert_trees_bitwise_equal(p2, p)
    _common.assert_trees_bitwise_equal(s2.inner_state, s.inner_state)
    assert int(s2.notfinite_count) == 1
    own_p2, own_s2 = skip_step(own_p, own_s, bad, False)
    _common.assert_trees_bitwise_equal((own_p2, own_s2), (own_p, own_s))


def test_inject_hyperparams_in_nnx_optimizer_on_a_bf16_model():
  """optax.inject_hyperparams casts the hyper-parameters to the parameters'
  dtype: bfloat16 scalars are numbers to jaxbnb (computed in float32 from
  the rounded value), but Adam's b2 = 0.999 rounds to 1.0, which is refused
  with the way out (optax.adam would return NaN); with
  hyperparam_dtype=jnp.float32 it is the plain optimizer."""
  def create(tx):
    model = nnx.Linear(64, 64, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  with pytest.raises(ValueError, match=r"adamw8bit: b2 must be in \[0, 1\), "
                     r"got b2=1.0. It arrived as a bfloat16 value.*"
                     r"hyperparam_dtype=jnp.float32"):
    create(optax.inject_hyperparams(optim.adamw8bit)(learning_rate=LR))

  runs = {}
  for key, tx in [
      ("inject f32", optax.inject_hyperparams(
          optim.adamw8bit, hyperparam_dtype=jnp.float32)(learning_rate=LR)),
      ("plain", optim.adamw8bit(LR)),
      # lion's betas survive the rounding (0.8984375, 0.98828125)
      ("inject bf16 lion", optax.inject_hyperparams(optim.lion8bit)(
          learning_rate=LR)),
      ("lion rounded", optim.lion8bit(
          float(jnp.bfloat16(LR)), b1=float(jnp.bfloat16(0.9)),
          b2=float(jnp.bfloat16(0.99))))]:
    model, optimizer = create(tx)
    losses = [float(_nnx_step(model, optimizer, X, Y)) for _ in range(3)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    runs[key] = nnx.state(model, nnx.Param)
  _common.assert_trees_bitwise_equal(runs["inject f32"], runs["plain"])
  _common.assert_trees_bitwise_equal(runs["inject bf16 lion"],
                                     runs["lion rounded"])
