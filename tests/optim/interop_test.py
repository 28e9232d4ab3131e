"""Export / import of the optimizer state in bitsandbytes' layout."""

from __future__ import annotations

import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbnb import optim
from jaxbnb._src.optim import interop as optim_interop
from jaxbnb._src.optim import paged as optim_paged
from jaxbnb._src.optim import state as optim_state
from tests.optim import _common

KERNEL = "['dense']['kernel']"  # 5120 elements: 8-bit, 20 blocks
BIAS = "['dense']['bias']"  # 80 elements: 32-bit (< min_8bit_size)
EMBED = "['embed']"  # 4290 elements: 8-bit, 17 blocks (last one partial)


def _trained(name, steps=3):
  opt = _common.optimizer(name)[0]
  params = _common.make_params()
  params, state = _common.train(name, params, opt.init(params), 0, steps)
  return opt, params, state


def test_layout_two_state():
  _, params, state = _trained("adamw8bit")
  sd = optim.to_bnb_state_dict(state, params)
  assert list(sd) == [BIAS, KERNEL, EMBED]  # jax.tree.leaves order
  k = sd[KERNEL]
  assert sorted(k) == ["absmax1", "absmax2", "qmap1", "qmap2", "state1",
                       "state2", "step"]
  assert k["step"] == 3
  assert k["state1"].dtype == k["state2"].dtype == np.uint8
  assert k["state1"].shape == k["state2"].shape == (64, 80)
  assert k["absmax1"].dtype == np.float32 and k["absmax1"].shape == (20,)
  assert sd[EMBED]["absmax2"].shape == (17,)
  np.testing.assert_array_equal(k["qmap1"], optim_state.signed_map())
  np.testing.assert_array_equal(k["qmap2"], optim_state.unsigned_map())
  assert k["qmap1"].min() < 0 <= k["qmap2"].min()
  b = sd[BIAS]
  assert sorted(b) == ["state1", "state2", "step"]
  assert b["state1"].dtype == np.float32 and b["state1"].shape == (80,)
  # The exported codes and absmax are the state: they dequantize to it.
  st = _common.state_of(state)
  m = k["qmap1"][k["state1"].reshape(-1)]
  m = np.pad(m, (0, 20 * 256 - m.size)).reshape(20, 256) * k["absmax1"][:,
                                                                          None]
  np.testing.assert_array_equal(
      m.reshape(-1)[:5120].reshape(64, 80),
      np.asarray(st.state1["dense"]["kernel"].dequantize()))


def test_layout_one_state_and_ademamix():
  _, params, state = _trained("lion8bit", steps=1)
  sd = optim.to_bnb_state_dict(state, params)
  assert sorted(sd[KERNEL]) == ["absmax1", "qmap1", "state1", "step"]
  assert sorted(sd[BIAS]) == ["state1", "step"]
  _, params, state = _trained("ademamix8bit", steps=1)
  sd = optim.to_bnb_state_dict(state, params)
  assert sd[KERNEL]["state1"].shape == (2, 64, 80)
  assert sd[KERNEL]["absmax1"].shape == (2, 20)
  assert sd[KERNEL]["state2"].shape == (64, 80)
  assert sd[BIAS]["state1"].shape == (2, 80)


@pytest.mark.parametrize("name,layout", [
    ("adamw8bit", "paths"), ("adamw8bit", "torch"),
    ("adamw8bit", "torch-unwrapped"), ("lion8bit", "torch"),
    ("ademamix8bit", "paths")])
def test_round_trip_bit_identical_and_training_continues(name, layout):
  opt, params, state = _trained(name)
  if layout == "paths":
    sd = optim.to_bnb_state_dict(state, params)
  else:
    sd = optim.to_torch_state_dict(
        state, params, {"lr": 1e-3}, wrap=layout == "torch")
    assert sd["param_groups"] == [{"lr": 1e-3, "params": [0, 1, 2]}]
    if layout == "torch":
      assert sorted(sd["state"][1]) == [optim_interop.QUANT_STATE_KEY, "step"]
    else:  # torch.save / json turn int keys into str keys: accept both
      sd["state"] = {str(i): v for i, v in sd["state"].items()}
  template = opt.init(params)
  back = optim.from_bnb_state_dict(sd, params, template)
  _common.assert_trees_bitwise_equal(back, state)
  cont = _common.train(name, params, back, 3, 5)
  ref = _common.train(name, params, state, 3, 5)
  _common.assert_trees_bitwise_equal(cont, ref)


def test_import_into_paged_optimizer_stays_on_host():
  _, params, state = _trained("adamw8bit")
  sd = optim.to_bnb_state_dict(state, params)
  paged = optim.paged_adamw8bit(1e-3)
  back = optim.from_bnb_state_dict(sd, params, paged.init(params))
  st = _common.state_of(back)
  kinds = set(jax.tree.leaves(optim_paged.memory_kinds((st.state1,
                                                        st.state2))))
  assert kinds == {optim_paged.host_memory_kind()}
  _common.assert_trees_bitwise_equal(optim_paged.to_device(st),
                                     _common.state_of(state))


def _bad(sd, key, field, value):
  sd = {k: dict(v) for k, v in sd.items()}
  sd[key][field] = value
  return sd


def test_import_errors_are_clear():
  opt, params, state = _trained("adamw8bit", steps=1)
  sd = optim.to_bnb_state_dict(state, params)
  tmpl = opt.init(params)
  imp = lambda d: optim.from_bnb_state_dict(d, params, tmpl)
  with pytest.raises(ValueError, match=r"state1: expected uint8 of shape "
                     r"\(64, 80\), got uint8 of shape \(80, 64\)"):
    imp(_bad(sd, KERNEL, "state1", sd[KERNEL]["state1"].T))
  with pytest.raises(ValueError, match=r"absmax1: expected float32 of shape "
                     r"\(20,\), got float32 of shape \(3,\).*blocksize 2048"):
    imp(_bad(sd, KERNEL, "absmax1", np.ones(3, np.float32)))
  with pytest.raises(ValueError, match="absmax2: expected float32.*float16"):
    imp(_bad(sd, KERNEL, "absmax2", sd[KERNEL]["absmax2"].astype(np.float16)))
  with pytest.raises(ValueError, match="qmap2: not bnb's unsigned dynamic"):
    imp(_bad(sd, KERNEL, "qmap2", optim_state.signed_map()))
  with pytest.raises(ValueError, match="8-bit .uint8. state but this "
                     "optimizer keeps a 32-bit state"):
    imp(_bad(sd, BIAS, "state1", np.zeros(80, np.uint8)))
  with pytest.raises(ValueError, match="different steps"):
    imp(_bad(sd, BIAS, "step", 7))
  with pytest.raises(ValueError, match=r"no entry for parameter.*embed"):
    imp({k: v for k, v in sd.items() if k != EMBED})
  with pytest.raises(ValueError, match="missing 'absmax1'"):
    imp({**sd, KERNEL: {k: v for k, v in sd[KERNEL].items()
                        if k != "absmax1"}})
  with pytest.raises(ValueError, match="param_groups list 2 parameters"):
    imp({"state": {}, "param_groups": [{"params": [0, 1]}]})
  with pytest.raises(ValueError, match="exactly one jaxbnb Optimizer8bit"):
    optim.to_bnb_state_dict((), params)
  with pytest.raises(TypeError, match="state_dict: expected a mapping"):
    imp([1, 2])


# ------------------------------------------- nnx.Optimizer, masked, frozen


def test_nnx_optimizer_state_round_trip():
  """`optimizer.opt_state` of an `nnx.Optimizer` (arrays boxed in
  OptVariable / OptArray) with `nnx.state(model, nnx.Param)` or its pure
  dict: exported, imported back into a fresh optimizer's `opt_state` with
  its boxes, and training continues bit for bit."""
  x = jax.random.normal(jax.random.key(0), (8, 64))

  def create():
    model = nnx.Linear(64, 64, rngs=nnx.Rngs(0))  # 4096: an 8-bit kernel
    return model, nnx.Optimizer(model, optim.adamw8bit(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
    optimizer.update(model, grads)

  model, optimizer = create()
  for _ in range(3):
    step(model, optimizer)
  params = nnx.state(model, nnx.Param)
  sd = optim.to_bnb_state_dict(optimizer.opt_state, params)
  assert sorted(sd) == ["['bias']", "['kernel']"]
  assert sd["['kernel']"]["state1"].dtype == np.uint8
  assert sd["['kernel']"]["step"] == 3
  assert sd["['bias']"]["state1"].shape == (64,)
  pure = nnx.to_pure_dict(params)
  _common.assert_trees_bitwise_equal(
      optim.to_bnb_state_dict(optimizer.opt_state, pure), sd)
  torch_sd = optim.to_torch_state_dict(optimizer.opt_state, params)
  assert list(torch_sd["state"]) == [0, 1]  # bias, kernel

  for layout, p in (("paths", params), ("torch", pure)):
    model2, optimizer2 = create()
    nnx.update(model2, nnx.state(model))
    back = optim.from_bnb_state_dict(sd if layout == "paths" else torch_sd,
                                     p, optimizer2.opt_state)
    assert jax.tree.structure(back) == jax.tree.structure(
        optimizer2.opt_state)
    _common.assert_trees_bitwise_equal(back, optimizer.opt_state)
    optimizer2.opt_state = back
    for _ in range(2):
      step(model2, optimizer2)
    model3, optimizer3 = create()  # the uninterrupted run, 5 steps
    for _ in range(5):
      step(model3, optimizer3)
    _common.assert_trees_bitwise_equal(nnx.state(model2), nnx.state(model3))
    _common.assert_trees_bitwise_equal(optimizer2.opt_state,
                                       optimizer3.opt_state)


@pytest.mark.parametrize("wrapper", ["masked", "multi_transform"])
def test_masked_out_parameters_are_not_exported(wrapper):
  """Under optax.masked / multi_transform only the optimized parameters are
  written (torch index = position among them), and the round trip is bit
  identical, in both layouts."""
  inner = optim.adamw8bit(1e-3)
  if wrapper == "masked":
    tx = optax.masked(inner, {"dense": {"kernel": True, "bias": False},
                              "embed": True})
  else:
    tx = optax.multi_transform(
        {"a": inner, "z": optax.set_to_zero()},
        {"dense": {"kernel": "a", "bias": "z"}, "embed": "a"})
  params = _common.make_params()
  step = _common.make_step(tx)
  state = tx.init(params)
  for i in range(3):
    params, state = step(params, state, _common.grads_at(params, i))
  sd = optim.to_bnb_state_dict(state, params)
  assert list(sd) == [KERNEL, EMBED]
  assert all(v["state1"].dtype == np.uint8 for v in sd.values())
  torch_sd = optim.to_torch_state_dict(state, params, {"lr": 1e-3})
  assert torch_sd["param_groups"] == [{"lr": 1e-3, "params": [0, 1]}]
  # a torch optimizer that also lists the frozen bias (no state for it)
  with_frozen = {"state": {1: torch_sd["state"][0], 2: torch_sd["state"][1]},
                 "param_groups": [{"params": [0, 1, 2]}]}
  for layout in (sd, torch_sd, with_frozen):
    back = optim.from_bnb_state_dict(layout, params, tx.init(params))
    _common.assert_trees_bitwise_equal(back, state)
    g = _common.grads_at(params, 3)
    _common.assert_trees_bitwise_equal(step(params, back, g),
                                       step(params, state, g))
  with pytest.raises(ValueError, match=r"param_groups list 1 parameters, "
                     r"but the optimizer holds state for 2 of the params "
                     r"tree's 3 leaves"):
    optim.from_bnb_state_dict({"state": {}, "param_groups": [{"params": [0]}]},
                              params, tx.init(params))


def test_params_of_another_tree_are_refused():
  _, params, state = _trained("adamw8bit", steps=1)
  other = {"dense": params["dense"]}  # no "embed"
  with pytest.raises(ValueError, match=r"holds state for \['embed'\], which "
                     r"are not leaves of params"):
    optim.to_bnb_state_dict(state, other)


def test_linen_partitioned_params_give_the_unboxed_paths():
  """nn.Partitioned parameters (boxed, one 8-bit and one 32-bit leaf) give
  the paths of their unboxed tree, and the state comes back as it was."""
  params = {"params": {
      "kernel": nn.Partitioned(jnp.ones((64, 80)), names=("a", "b")),
      "bias": nn.Partitioned(jnp.ones((80,)), names=("b",))}}
  tx = optim.adamw8bit(1e-3)
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  _, state = tx.update(grads, tx.init(params), params)
  sd = optim.to_bnb_state_dict(state, params)
  assert list(sd) == ["['params']['bias']", "['params']['kernel']"]
  _common.assert_trees_bitwise_equal(
      optim.to_bnb_state_dict(state, nn.unbox(params)), sd)
  _common.assert_trees_bitwise_equal(
      optim.from_bnb_state_dict(sd, params, tx.init(params)), state)
