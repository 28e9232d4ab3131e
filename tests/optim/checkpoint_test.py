"""Orbax checkpoints of the 8-bit optimizer state and resumed training."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
import pytest

from jaxbnb._src.optim import state as optim_state
from tests.optim import _common

NAMES = ["adamw8bit", "lion8bit", "ademamix8bit"]


def _save_restore(path, tree):
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, tree)
  ckptr.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  return ckptr.restore(path, abstract)


@pytest.mark.parametrize("name", NAMES)
def test_orbax_round_trip_is_bit_identical(tmp_path, name):
  opt = _common.optimizer(name)[0]
  params = _common.make_params()
  params, state = _common.train(name, params, opt.init(params), 0, 2)
  st = _common.state_of(state)
  leaves = jax.tree.leaves((st.state1, st.state2),
                           is_leaf=lambda x: isinstance(
                               x, optim_state.Quantized8bit))
  assert any(isinstance(x, optim_state.Quantized8bit) for x in leaves)
  assert any(not isinstance(x, optim_state.Quantized8bit) for x in leaves)
  restored = _save_restore(tmp_path / "ckpt", {"params": params,
                                               "opt_state": state})
  _common.assert_trees_bitwise_equal(restored["opt_state"], state)
  _common.assert_trees_bitwise_equal(restored["params"], params)
  assert int(_common.state_of(restored["opt_state"]).count) == 2


@pytest.mark.parametrize("name", ["adamw8bit", "ademamix8bit"])
def test_resumed_training_matches_uninterrupted(tmp_path, name):
  opt, step = _common.optimizer(name)
  params = _common.make_params()
  full_p, full_s = _common.train(name, params, opt.init(params), 0, 6)
  assert len(step.traces) == 1, "the second step recompiled"

  p, s = _common.train(name, params, opt.init(params), 0, 3)
  restored = _save_restore(tmp_path / "ckpt", {"params": p, "opt_state": s})
  del p, s
  p, s = _common.train(name, restored["params"], restored["opt_state"], 3, 6)
  assert len(step.traces) == 1, "the restored state retraced the step"
  _common.assert_trees_bitwise_equal(p, full_p)
  _common.assert_trees_bitwise_equal(s, full_s)
