"""Paged optimizers: state placement in host memory (JAX memory kinds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import optim

from jaxbnb._src.optim import paged as optim_paged
from jaxbnb._src.optim import state as optim_state
from tests.optim import _common

HOST = optim_paged.host_memory_kind()


def _state_kinds(opt_state):
  st = _common.state_of(opt_state)
  return {k for k in jax.tree.leaves(optim_paged.memory_kinds(
      (st.state1, st.state2)))}


def test_to_host_and_back_keeps_values_and_static_fields():
  assert HOST in optim_paged.HOST_KINDS  # CPU exposes pinned_host
  q = optim_state.quantize_state(jnp.linspace(-1, 1, 600), signed=True)
  tree = {"q": q, "f": jnp.arange(5.0), "none": None, "n": 3}
  host = optim_paged.to_host(tree)
  kinds = optim_paged.memory_kinds(host)
  assert kinds["q"].codes == kinds["q"].absmax == kinds["f"] == HOST
  assert kinds["none"] is None and host["n"] == 3 and host["q"].signed
  back = optim_paged.to_device(host)
  assert optim_paged.memory_kinds(back)["f"] == optim_paged.DEVICE_KIND
  _common.assert_trees_bitwise_equal(back, tree)


def test_jitted_round_trip_outputs_host_memory_and_keeps_sharding():
  mesh = jax.make_mesh((len(jax.devices()),), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
  x = optim_paged.to_host(jax.device_put(jnp.arange(64.0), sharding))
  assert x.sharding.memory_kind == HOST

  @jax.jit
  def f(s):
    return optim_paged.to_host(optim_paged.to_device(s) * 2)

  y = f(x)
  assert y.sharding.memory_kind == HOST
  assert y.sharding.spec == sharding.spec
  np.testing.assert_array_equal(np.asarray(y), 2 * np.arange(64.0))


@pytest.mark.parametrize("sharded", [False, True])
def test_paged_state_moves_back_to_device_memory(sharded):
  """A jitted program's host-memory output back in device memory, typed so
  (the next op takes it beside device arrays). JAX 0.12.1's CPU refuses
  `device_put` for such an array ("Unsupported layout"); `to_device`
  then moves it in a jitted `device_put`."""
  x = jnp.arange(64.0)
  if sharded:
    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    x = jax.device_put(x, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("x")))
  y = jax.jit(lambda s: optim_paged.to_host(optim_paged.to_device(s) * 2))(
      optim_paged.to_host(x))
  assert y.sharding.memory_kind == HOST
  back = optim_paged.to_device(y)
  assert back.sharding.memory_kind == optim_paged.DEVICE_KIND
  assert back.sharding.is_equivalent_to(x.sharding, 1)
  assert not optim_paged.in_host_memory(back)
  np.testing.assert_array_equal(np.asarray(back + x), 3 * np.arange(64.0))


def test_paged_state_on_host_and_bitwise_equal_to_unpaged(name="adamw8bit"):
  params = _common.make_params()
  paged_opt, step = _common.optimizer("paged_" + name)
  opt = _common.optimizer(name)[0]
  ps, pst = params, paged_opt.init(params)
  assert _state_kinds(pst) == {HOST}
  ps, pst = _common.train("paged_" + name, ps, pst, 0, 3)
  assert _state_kinds(pst) == {HOST}
  assert len(step.traces) == 1, "paged step retraced"
  p, st = _common.train(name, params, opt.init(params), 0, 3)
  assert _state_kinds(st) == {optim_paged.DEVICE_KIND}
  _common.assert_trees_bitwise_equal(ps, p)
  _common.assert_trees_bitwise_equal(
      optim_paged.to_device(_common.state_of(pst)), _common.state_of(st))


@pytest.mark.parametrize("committed", [False, True])
def test_jitted_step_compiles_once(committed):
  """The second step reuses the first one's program: `init` commits the
  step count beside the (committed) host states, as the step's outputs
  are, so the inputs' types do not change after step 1."""
  params = {"w": jnp.ones((64, 67)), "b": jnp.ones((67,))}
  if committed:
    params = jax.device_put(params, jax.devices()[0])
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  for name in ("paged_adamw8bit", "paged_lion32bit"):
    tx = getattr(optim, name)(1e-3)
    update = jax.jit(lambda g, s, p, tx=tx: tx.update(g, s, p))
    state = tx.init(params)
    for _ in range(3):
      _, state = update(grads, state, params)
    assert update._cache_size() == 1, name  # pylint: disable=protected-access
    assert _state_kinds(state) == {HOST}


def test_paged_state_is_sharded_like_its_parameter():
  """Parameters sharded over a mesh: the host states follow their sharding
  (a state of the parameter's shape as it, the absmax replicated), so the
  step runs on the mesh, bit for bit as the unpaged optimizer. (Auto
  axes: the rules reshape each leaf into blocks, which explicit sharding
  would ask to spell out.)"""
  mesh = jax.make_mesh((len(jax.devices()),), ("x",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  spec = jax.sharding.PartitionSpec("x", None)
  params = {"w": jax.device_put(
      jnp.asarray(np.random.default_rng(0).standard_normal((64, 67)),
                  jnp.float32), jax.sharding.NamedSharding(mesh, spec)),
            "b": jax.device_put(jnp.ones((67,)), jax.sharding.NamedSharding(
                mesh, jax.sharding.PartitionSpec()))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  for name in ("adamw8bit", "ademamix8bit"):
    paged, plain = getattr(optim, "paged_" + name)(1e-3), getattr(
        optim, name)(1e-3)
    st, ref = paged.init(params), plain.init(params)
    w = _common.state_of(st).state1["w"]
    assert w.codes.sharding.device_set == set(jax.devices())
    lead = (None,) if name == "ademamix8bit" else ()
    assert tuple(w.codes.sharding.spec) == lead + tuple(spec)
    assert _state_kinds(st) == {HOST}
    update = jax.jit(lambda g, s, p, tx=paged: tx.update(g, s, p))
    ref_update = jax.jit(lambda g, s, p, tx=plain: tx.update(g, s, p))
    for _ in range(2):
      u, st = update(grads, st, params)
      ref_u, ref = ref_update(grads, ref, params)
      _common.assert_trees_bitwise_equal(u, ref_u)
    assert _state_kinds(st) == {HOST}
    _common.assert_trees_bitwise_equal(
        optim_paged.to_device(_common.state_of(st)), _common.state_of(ref))
