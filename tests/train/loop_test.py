"""`finetune`: outputs, metrics, exact resume, output-folder rules."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jaxbnb import train
from jaxbnb._src.train import checkpoint
from jaxbnb.lora import LoRAConfig
from jaxbnb.lora import load_adapter
from tests.train import common

TOK = common.CharTokenizer()
TEXT = [common.TEXT * 3]
CONFIG = train.TrainConfig(steps=6, batch_size=2, seq_len=16,
                           learning_rate=3e-2, optimizer="adamw",
                           log_every=2, eval_every=3, save_every=3,
                           eval_split=0.2)


def _run(out, config=CONFIG, lora=common.LORA, **kw):
  kw.setdefault("progress", False)
  return train.finetune(common.tiny_model(), TOK, TEXT, config, lora, out,
                        rngs=nnx.Rngs(1), **kw)


def test_outputs_and_metrics(tmp_path):
  out = tmp_path / "run"
  result = _run(out)
  assert result.out_dir == str(out) and result.start_step == 0
  assert result.steps == (1, 2, 3, 4, 5, 6) and len(result.losses) == 6
  assert sorted(os.listdir(out)) == [
      "adapter_config.json", "adapter_model.safetensors", "checkpoints",
      "finetune.json", "loss.png", "metrics.jsonl"]
  assert sorted(os.listdir(out / "checkpoints")) == ["step_00000003",
                                                     "step_00000006"]
  with open(out / "loss.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  records = [json.loads(l) for l in (out / "metrics.jsonl").read_text()
             .splitlines()]
  logged = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in logged] == [2, 4, 6]
  assert [r["step"] for r in evals] == [0, 3, 6]
  lr = train.learning_rate_schedule(CONFIG)
  for r in logged:
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(r)
    assert r["loss"] == result.losses[r["step"] - 1]
    assert r["lr"] == pytest.approx(float(lr(r["step"] - 1)))
    assert r["tokens_per_s"] > 0 and r["tokens"] == 2 * 16
  for r, (step, loss, ppl) in zip(evals, result.evals):
    assert (r["step"], r["eval_loss"], r["eval_ppl"]) == (step, loss, ppl)
    assert ppl == pytest.approx(math.exp(loss))
  assert result.eval_ppl < result.evals[0][2]  # it learned something

  info = json.loads((out / "finetune.json").read_text())
  assert info["train_config"] == CONFIG.to_dict()
  assert info["lora_config"]["r"] == 4 and info["eval_sequences"] >= 1

  # the PEFT adapter reproduces the trained model on a fresh base
  fresh = load_adapter(common.tiny_model(), out)
  ids = jnp.asarray(TOK.encode("a single man"))[None]
  np.testing.assert_array_equal(common.logits(fresh, ids),
                                common.logits(result.model, ids))
  # and the final evaluation is the model's held-out loss
  held_out = train.prepare_data(TOK, TEXT, 16).split(0.2)[1]
  loss, _ = train.evaluate(result.model, held_out, CONFIG.batch_size)
  assert loss == pytest.approx(result.evals[-1][1], rel=1e-6)


class _Stop(KeyboardInterrupt):
  pass


def _interrupted_run(out, config, lora, *, after: int) -> None:
  """A run stopped (as by Ctrl-C) once step `after` is done."""
  def stop(step, record):
    del record
    if step == after:
      raise _Stop()

  with pytest.raises(_Stop):
    _run(out, config, lora, callback=stop)


def test_resume_gives_bit_identical_losses(tmp_path):
  """Interrupted after step 5 (last checkpoint: step 3), then resumed."""
  config = train.TrainConfig(steps=7, batch_size=2, grad_accum=2, seq_len=16,
                             learning_rate=3e-2, warmup_steps=2,
                             save_every=3, eval_every=3, eval_split=0.2)
  lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                    target_modules="all-linear")
  full = _run(tmp_path / "full", config, lora)

  out = tmp_path / "cut"
  _interrupted_run(out, config, lora, after=5)
  assert not (out / "adapter_model.safetensors").exists()
  assert [s for s, _ in checkpoint.list_checkpoints(out)] == [3]
  resumed = _run(out, config, lora, resume=True)
  assert resumed.start_step == 3 and resumed.steps == (4, 5, 6, 7)
  assert resumed.losses == full.losses[3:]  # bit for bit
  assert resumed.evals == full.evals[2:]
  for name in ("full", "cut"):
    assert [r.get("loss", r.get("eval_loss")) for r in
            train.read_metrics(tmp_path / name)] == [
                r.get("loss", r.get("eval_loss")) for r in
                train.read_metrics(tmp_path / "full")]
  a = safetensors.numpy.load_file(tmp_path / "full" /
                                  "adapter_model.safetensors")
  b = safetensors.numpy.load_file(out / "adapter_model.safetensors")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])

  # a finished run resumes to nothing; other settings are refused
  again = _run(out, config, lora, resume=True)
  assert again.steps == () and again.start_step == 7
  other = train.TrainConfig(**dict(config.to_dict(), learning_rate=1e-3))
  with pytest.raises(ValueError, match="learning_rate=0.03 in the "
                     "checkpoint, 0.001 now"):
    _run(out, other, lora, resume=True)
  # the message names each differing LoRA field with both values
  with pytest.raises(ValueError, match=r"LoRA settings differ: "
                     r"lora_dropout=0\.1 in the checkpoint, 0\.0 now; "
                     r"r=4 in the checkpoint, 2 now\. "):
    _run(out, config, LoRAConfig(r=2, lora_alpha=8,
                                 target_modules="all-linear"),
         resume=True)


def test_out_dir_rules(tmp_path):
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "notes.txt").write_text("mine")
  model = common.tiny_model()
  with pytest.raises(FileExistsError, match="not empty"):
    train.finetune(model, TOK, TEXT, CONFIG, common.LORA, busy,
                   rngs=nnx.Rngs(1), progress=False)
  assert not nnx.state(model, nnx.LoRAParam)  # untouched
  with pytest.raises(FileExistsError, match="no checkpoint to resume"):
    _run(busy, resume=True)
  with pytest.raises(ValueError, match="not both"):
    _run(busy, resume=True, overwrite=True)
  # overwrite replaces a run's files, keeps the others
  (busy / "metrics.jsonl").write_text("old\n")
  _run(busy, overwrite=True)
  assert (busy / "notes.txt").read_text() == "mine"
  assert len(train.read_metrics(busy)) == 6

  # a failure before the first checkpoint leaves nothing behind
  def boom(step, record):
    raise RuntimeError("boom")
  gone = tmp_path / "gone"
  with pytest.raises(RuntimeError):
    _run(gone, callback=boom)
  assert not gone.exists()
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(RuntimeError):
    _run(empty, callback=boom)
  assert empty.exists() and not os.listdir(empty)


@pytest.mark.parametrize("kw,error,match", [
    (dict(config=train.TrainConfig(seq_len=128)), ValueError,
     "exceeds the model's max_position_embeddings=64"),
    (dict(lora=LoRAConfig(target_modules=["qkv"])), ValueError,
     "matches no linear layer"),
    (dict(config="steps=3"), TypeError, "TrainConfig"),
])
def test_bad_inputs_write_nothing(tmp_path, kw, error, match):
  out = tmp_path / "out"
  with pytest.raises(error, match=match):
    _run(out, **kw)
  assert not out.exists()


def test_model_with_adapters(tmp_path):
  model = common.lora_model()
  with pytest.raises(ValueError, match="already has LoRA adapters"):
    train.finetune(model, TOK, TEXT, CONFIG, common.LORA, tmp_path / "x",
                   rngs=nnx.Rngs(1), progress=False)
  result = train.finetune(model, TOK, TEXT, CONFIG, None, tmp_path / "y",
                          rngs=nnx.Rngs(1), progress=False)
  assert result.model is model and len(result.losses) == 6
  assert jax.tree.leaves(nnx.state(model, nnx.LoRAParam))


def test_modules_to_save_train_resume_and_load(tmp_path):
  """A head trained whole (PEFT's modules_to_save) goes through the run,
  its checkpoints and the saved adapter like the LoRA weights."""
  config = train.TrainConfig(steps=4, batch_size=2, seq_len=16,
                             learning_rate=3e-2, save_every=2, eval_every=0,
                             eval_split=0.0)
  lora = LoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                    modules_to_save=["lm_head"])
  full = _run(tmp_path / "full", config, lora)
  head0 = common.tiny_model().lm_head.weight[...]
  assert np.abs(np.asarray(full.model.lm_head.weight[...] - head0)).max() > 0

  out = tmp_path / "cut"
  _interrupted_run(out, config, lora, after=3)
  resumed = _run(out, config, lora, resume=True)
  assert resumed.losses == full.losses[2:]  # bit for bit, head included
  saved = safetensors.numpy.load_file(out / "adapter_model.safetensors")
  np.testing.assert_array_equal(saved["base_model.model.lm_head.weight"],
                                np.asarray(full.model.lm_head.weight[...]))
  fresh = load_adapter(common.tiny_model(), out)
  ids = jnp.asarray(TOK.encode("a single man"))[None]
  np.testing.assert_array_equal(common.logits(fresh, ids),
                                common.logits(full.model, ids))
