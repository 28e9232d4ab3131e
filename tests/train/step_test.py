"""The train step: adapters only, loss decrease, accumulation, remat."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxbnb import models
from jaxbnb import train
from jaxbnb._src.train import step as step_lib
from jaxbnb.lora import LoRAConfig
from tests.train import common

TOK = common.CharTokenizer()
# Float model, optax AdamW: the quickest program to compile.
FAST = train.TrainConfig(steps=30, batch_size=4, seq_len=16,
                         learning_rate=3e-2, optimizer="adamw",
                         max_grad_norm=1.0, eval_split=0)
# Plain SGD with rate 1: a step moves each adapter by minus its gradient,
# so comparing steps compares gradients (Adam's first step is about
# lr * sign(g), which hides small gradient differences and magnifies noise).
SGD = optax.sgd(1.0)


def _batch(data, index, shape):
  idx = np.asarray(index)
  part = data.take(idx)
  full = tuple(shape) + (data.seq_len,)
  return {"input_ids": jnp.asarray(part.input_ids.reshape(full)),
          "attention_mask": jnp.asarray(part.attention_mask.reshape(full)),
          "loss_mask": jnp.asarray(part.loss_mask.reshape(full))}


def _optimizer(model, config):
  return nnx.Optimizer(model, train.make_optimizer(config),
                       wrt=nnx.LoRAParam)


def _chat_like():
  """Sequences with uneven target counts (padding, masked prompts)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, (4, 16))
  length = np.array([16, 7, 12, 9])[:, None]     # real tokens
  first = np.array([1, 5, 2, 4])[:, None]        # first target
  pos = np.arange(16)[None]
  return train.TokenizedData(ids, pos < length, (pos < length) & (pos >= first))


def test_qlora_step_changes_only_the_adapters():
  """NF4 base in bfloat16, 8-bit AdamW: the frozen weights stay
  bit-identical, the adapters (float32) all move."""
  model = common.lora_model(
      quantization=models.QuantizationConfig.nf4(compute_dtype="bfloat16"),
      dtype=jnp.bfloat16,
      lora=LoRAConfig(r=4, target_modules="all-linear",
                      init_lora_weights=False))
  assert {x.dtype for x in common.lora_arrays(model)} == {
      np.dtype(np.float32)}
  config = train.TrainConfig(steps=2, seq_len=16)
  assert config.optimizer == "adamw8bit"
  opt = _optimizer(model, config)
  not_trained = nnx.Not(nnx.Any(nnx.LoRAParam, nnx.RngState))
  before = [np.asarray(x) for x in jax.tree.leaves(
      nnx.state(model, not_trained))]
  lora_before = common.lora_arrays(model)
  out = train.train_step(model, opt, _batch(_chat_like(), np.arange(4),
                                            (1, 4)))
  assert out["loss"].dtype == jnp.float32
  assert np.isfinite(float(out["loss"]))
  assert int(out["targets"]) == 15 + 2 + 10 + 5
  after = jax.tree.leaves(nnx.state(model, not_trained))
  assert len(after) == len(before)
  for x, y in zip(before, after):
    np.testing.assert_array_equal(x, np.asarray(y))
  lora_after = common.lora_arrays(model)
  assert all(not np.array_equal(a, b) for a, b in zip(lora_before,
                                                      lora_after))
  assert {x.dtype for x in lora_after} == {np.dtype(np.float32)}
  assert int(opt.step[...]) == 1


def test_loss_decreases_on_repeated_text():
  data = train.pack_texts(TOK, [common.TEXT * 4], seq_len=16)
  model = common.lora_model()
  opt = _optimizer(model, FAST)
  losses = []
  for s in range(FAST.steps):
    index = train.batch_indices(len(data), 4 * s, 4, seed=0)
    losses.append(float(train.train_step(model, opt,
                                         _batch(data, index, (1, 4)))["loss"]))
  assert losses[-1] < 0.6 * losses[0], losses
  assert np.mean(losses[-5:]) < np.mean(losses[:5])


def _sgd_step(data, index, shape, remat=False):
  """Loss, grad norm, targets and the gradient (minus the SGD update)."""
  model = common.lora_model(lora=LoRAConfig(
      r=4, target_modules="all-linear", init_lora_weights=False))
  before = common.lora_arrays(model)
  opt = nnx.Optimizer(model, SGD, wrt=nnx.LoRAParam)
  out = train.train_step(model, opt, _batch(data, index, shape), remat=remat)
  grads = [b - a for a, b in zip(common.lora_arrays(model), before)]
  return out, grads, model


def _assert_same_step(a, b, rtol):
  (out_a, g_a, _), (out_b, g_b, _) = a, b
  np.testing.assert_allclose(float(out_a["loss"]), float(out_b["loss"]),
                             rtol=1e-6)
  np.testing.assert_allclose(float(out_a["grad_norm"]),
                             float(out_b["grad_norm"]), rtol=rtol)
  assert int(out_a["targets"]) == int(out_b["targets"])
  scale = max(float(np.abs(g).max()) for g in g_b)
  for x, y in zip(g_a, g_b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale)


def test_grad_accumulation_equals_the_big_batch():
  """2 micro-batches of 2 == 1 batch of 4, with uneven target counts."""
  data = _chat_like()
  index = np.arange(4)
  big = _sgd_step(data, index, (1, 4))
  acc = _sgd_step(data, index, (2, 2))
  _assert_same_step(acc, big, rtol=1e-5)
  # a mean of the two micro-batches' mean losses would differ here
  model = big[2]
  halves = []
  for part in (np.arange(2), np.arange(2, 4)):
    b = _batch(data, part, (2,))
    halves.append(float(train.causal_lm_loss(
        common.logits(model, b["input_ids"]), b["input_ids"],
        b["loss_mask"])))
  n = [int(data.loss_mask[p].sum()) for p in (np.arange(2), np.arange(2, 4))]
  assert n[0] != n[1]
  assert float(np.dot(halves, n) / sum(n)) != pytest.approx(np.mean(halves))


def test_remat_gives_the_same_loss_and_gradients():
  data = _chat_like()
  plain = _sgd_step(data, np.arange(4), (1, 4))
  remat = _sgd_step(data, np.arange(4), (1, 4), remat=True)
  _assert_same_step(remat, plain, rtol=1e-5)
  # the layers are unwrapped again (paths, adapter names unchanged)
  assert all(type(l).__name__ == "DecoderLayer"
             for l in remat[2].model.layers)


def test_remat_checkpoints_each_decoder_layer():
  model = common.lora_model()
  graphdef, state = nnx.split(model)
  ids = jnp.ones((1, 8), jnp.int32)

  def loss(state, remat):
    m = nnx.merge(graphdef, state)
    with (step_lib.rematerialized(m) if remat
          else contextlib.nullcontext()):
      return m(ids)[0].sum()

  for remat, want in ((False, 0), (True, common.CFG.num_hidden_layers)):
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda s: loss(s, remat)))(state))
    assert jaxpr.count("checkpoint[") + jaxpr.count("remat") == want


def test_remat_needs_decoder_layers():
  with pytest.raises(ValueError, match="model.model.layers"):
    with step_lib.rematerialized(nnx.Linear(2, 2, rngs=nnx.Rngs(0))):
      pass


def test_learning_rate_schedule_and_config_errors():
  lr = train.learning_rate_schedule(
      train.TrainConfig(steps=10, warmup_steps=2, learning_rate=1.0))
  values = [float(lr(c)) for c in range(10)]
  assert values[:3] == [0.5, 1.0, 1.0] and all(v > 0 for v in values)
  assert all(a >= b for a, b in zip(values[1:], values[2:]))
  for kw, match in (({"steps": 0}, "steps"), ({"warmup_steps": 200},
                                               "at most `steps`"),
                    ({"optimizer": "sgd"}, "optimizer"),
                    ({"eval_split": 1.0}, "eval_split"),
                    ({"learning_rate": 0}, "learning_rate")):
    with pytest.raises(ValueError, match=match):
      train.TrainConfig(**kw)
  assert train.make_optimizer(FAST) is train.make_optimizer(
      train.TrainConfig(**FAST.to_dict()))


def test_train_step_does_not_copy_the_frozen_weights():
  """The compiled step returns the adapters, optimizer state and RNG counts
  only (an `nnx.jit` over the model returned, so copied, every frozen
  weight each step)."""
  model = common.lora_model()
  opt = _optimizer(model, FAST)
  batch = _batch(_chat_like(), np.arange(2), (1, 2))
  parts = nnx.split((model, opt), step_lib.MUTABLE, ...)
  compiled = step_lib._train_step.lower(*parts, batch, False).compile()
  out = compiled.memory_analysis().output_size_in_bytes
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  assert out <= nbytes(parts[1]) + 1024  # + the three scalars
  assert nbytes(parts[2]) > 2 * out  # the frozen weights stay in


def test_commit_to_device_makes_the_second_step_reuse_the_program():
  """A fresh model holds uncommitted arrays, the paged optimizer's state is
  committed (pinned host memory) and a step returns committed ones; `jax.jit`
  keys its cache on that, so without `commit_to_device` the second step
  compiles the whole step again."""
  batch = _batch(_chat_like(), np.arange(2), (1, 2))
  paged = train.TrainConfig(optimizer="paged_adamw8bit")

  def programs(commit):
    model = common.lora_model(seed=3 if commit else 4)
    opt = _optimizer(model, paged)
    if commit:
      train.commit_to_device(model, opt)
    before = step_lib._train_step._cache_size()
    for _ in range(2):
      train.train_step(model, opt, batch)
    return step_lib._train_step._cache_size() - before

  assert programs(commit=False) == 2  # the behaviour it fixes
  assert programs(commit=True) == 1


def _ones(shape):
  ids = jnp.ones(shape, jnp.int32)
  return {"input_ids": ids, "attention_mask": ids > 0, "loss_mask": ids > 0}


@pytest.mark.parametrize("step", ["train_step", "layerwise_train_step"])
def test_steps_refuse_a_model_without_adapters(step):
  model = common.tiny_model()
  optimizer = nnx.Optimizer(model, SGD, wrt=nnx.LoRAParam)
  with pytest.raises(ValueError, match=f"{step}: `model` has no adapters"):
    getattr(train, step)(model, optimizer, _ones((1, 2, 8)))


@pytest.mark.parametrize("step", ["train_step", "layerwise_train_step"])
def test_steps_name_the_expected_batch_shape(step):
  model = common.lora_model()
  optimizer = nnx.Optimizer(model, SGD, wrt=nnx.LoRAParam)
  fn = getattr(train, step)
  with pytest.raises(ValueError, match=r"`batch\['input_ids'\]` must have "
                     r"shape \[A, B, T\].*got shape \(2, 8\)"):
    fn(model, optimizer, _ones((2, 8)))
  bad = dict(_ones((1, 2, 8)), loss_mask=jnp.ones((1, 2, 7), bool))
  with pytest.raises(ValueError, match=r"`batch\['loss_mask'\]` must have "
                     r"the shape of `batch\['input_ids'\]` \(1, 2, 8\), "
                     r"got \(1, 2, 7\)"):
    fn(model, optimizer, bad)
  with pytest.raises(ValueError, match=r"missing \['attention_mask'\]"):
    fn(model, optimizer, {k: v for k, v in _ones((1, 2, 8)).items()
                          if k != "attention_mask"})
  with pytest.raises(TypeError, match="integer token ids"):
    fn(model, optimizer, dict(_ones((1, 2, 8)),
                              input_ids=jnp.ones((1, 2, 8))))


def test_eval_step_of_a_model_without_adapters():
  nll, count = step_lib.eval_step(common.tiny_model(), _ones((2, 8)))
  assert int(count) == 14 and np.isfinite(float(nll))
  with pytest.raises(ValueError, match=r"shape \[B, T\]"):
    step_lib.eval_step(common.tiny_model(), _ones((1, 2, 8)))
