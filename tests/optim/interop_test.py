"""Export / import of the optimizer state in bitsandbytes' layout."""

from __future__ import annotations

import jax
import numpy as np
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
