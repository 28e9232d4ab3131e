"""Tests of the orbax save/restore of (quantized) models."""

import json
import os

import jax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxbnb._src.io import orbax_io
from jaxbnb._src.quant.weights import Params4bit
from tests.io import common


@pytest.mark.parametrize("variant", common.QUANTIZED + ("orig",))
def test_roundtrip_bit_identical(variant, tmp_path):
  model = common.load(variant)
  path = tmp_path / "ckpt"
  orbax_io.save_checkpoint(model, path)
  restored = orbax_io.restore_checkpoint(path)
  assert restored.config == model.config
  assert restored.quantization == model.quantization
  assert (restored.dtype, restored.param_dtype) == (model.dtype,
                                                    model.param_dtype)
  common.assert_states_identical(model, restored)
  for (_, a), (_, b) in zip(model.iter_variables(),
                            restored.iter_variables()):
    a, b = a.get_value(), b.get_value()
    if isinstance(a, Params4bit):  # static metadata survives too
      assert a.quant_state.shape == b.quant_state.shape
      assert a.quant_state.dtype == b.quant_state.dtype
      assert a.quant_state.nested == b.quant_state.nested
      assert b.data.dtype == a.data.dtype


def test_restore_like_and_overwrite(tmp_path):
  model = common.load("fp4_fp32")
  path = tmp_path / "ckpt"
  orbax_io.save_checkpoint(model, path)
  with pytest.raises(FileExistsError, match="overwrite"):
    orbax_io.save_checkpoint(model, path)
  orbax_io.save_checkpoint(model, path, overwrite=True)
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(ValueError, match="a_file' is a file, not a folder"):
    orbax_io.save_checkpoint(model, tmp_path / "a_file" / "ckpt")
  abstract = nnx.eval_shape(lambda: model)
  assert isinstance(jax.tree.leaves(nnx.state(abstract))[0],
                    jax.ShapeDtypeStruct)
  common.assert_states_identical(orbax_io.restore_checkpoint(path, like=abstract),
                          model)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a jaxbnb orbax"):
    orbax_io.restore_checkpoint(tmp_path)


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  model = common.load("fp4_fp32")
  path = tmp_path / "ckpt"
  orbax_io.save_checkpoint(model, path)
  before = sorted(os.listdir(path))

  def fail(self):  # after orbax has written the new state
    raise OSError("disk full")

  monkeypatch.setattr(ocp.StandardCheckpointer, "wait_until_finished", fail)
  with pytest.raises(OSError, match="disk full"):
    orbax_io.save_checkpoint(common.load("orig"), path, overwrite=True)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["ckpt"]  # no temporary folder left
  assert sorted(os.listdir(path)) == before
  common.assert_states_identical(orbax_io.restore_checkpoint(path), model)


def test_restores_layouts_without_format(tmp_path):
  """Checkpoints of jaxbnb 0.1 have 4-bit layouts without "format"."""
  model = common.load("nf4_dq_bf16")
  path = tmp_path / "ckpt"
  orbax_io.save_checkpoint(model, path)
  meta_path = path / "jaxbnb_model.json"
  meta = json.loads(meta_path.read_text())
  assert {v.pop("format") for v in meta["quantized_weights"].values()} == {
      "4bit"}
  meta_path.write_text(json.dumps(meta))
  common.assert_states_identical(orbax_io.restore_checkpoint(path), model)


@pytest.mark.parametrize("targets", [["q_proj"], "all-linear"])
def test_merged_float_linears_restore_without_like(targets, tmp_path):
  # merge_lora(requantize=False) leaves float linears in a quantized model:
  # the metadata lists them (llm_int8_skip_modules, as save_pretrained
  # writes), so restore_checkpoint rebuilds the same model on its own.
  from jaxbnb.lora import LoRAConfig, apply_lora, merge_lora
  from jaxbnb._src.io.convert import saved_quantization
  model = apply_lora(nnx.clone(common.load("nf4_dq_bf16")),
                     LoRAConfig(r=4, target_modules=targets,
                                init_lora_weights=False),
                     rngs=nnx.Rngs(1))
  merged = merge_lora(model, requantize=False)
  path = tmp_path / "ckpt"
  orbax_io.save_checkpoint(merged, path)
  restored = orbax_io.restore_checkpoint(path)
  assert restored.quantization == saved_quantization(merged)
  q_proj = restored.model.layers[0].self_attn.q_proj
  assert not isinstance(q_proj.weight.get_value(), Params4bit)
  common.assert_states_identical(merged, restored)
