"""The layer-by-layer training step equals the one-program remat step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxbnb import models
from jaxbnb import train
from jaxbnb._src.train import layerwise
from jaxbnb._src.train import step as step_lib
from jaxbnb.lora import LoRAConfig
from tests.train import common

SGD = optax.sgd(1.0)  # a step moves each adapter by minus its gradient


def _chat_like(a):
  """`[a, 2, 16]` batches with uneven target counts (padding, prompts)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, 99, (a, 2, 16))
  length = np.array([16, 7, 12, 9][:2 * a]).reshape(a, 2, 1)
  first = np.array([1, 5, 2, 4][:2 * a]).reshape(a, 2, 1)
  pos = np.arange(16)
  return {"input_ids": jnp.asarray(ids, jnp.int32),
          "attention_mask": jnp.asarray(pos < length),
          "loss_mask": jnp.asarray((pos < length) & (pos >= first))}


def _run(step, lora, batch, steps=2, **model_kw):
  model = common.lora_model(lora=lora, **model_kw)
  model.train()  # dropout on: both steps must draw the same masks
  opt = nnx.Optimizer(model, SGD, wrt=nnx.LoRAParam)
  outs = []
  for _ in range(steps):
    before = common.lora_arrays(model)
    out = step(model, opt, batch)
    grads = [b - a for a, b in zip(common.lora_arrays(model), before)]
    outs.append((out, grads))
  return outs


@pytest.mark.parametrize("quant, dropout, accum, chunk", [
    (None, 0.0, 1, 1024),
    (models.QuantizationConfig.nf4(compute_dtype="float32"), 0.3, 2, 5),
])
def test_layerwise_step_equals_remat_train_step(quant, dropout, accum, chunk):
  lora = LoRAConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                    target_modules="all-linear", init_lora_weights=False)
  batch = _chat_like(accum)
  want = _run(lambda m, o, b: train.train_step(m, o, b, remat=True), lora,
              batch, quantization=quant)
  got = _run(lambda m, o, b: train.layerwise_train_step(m, o, b,
                                                        chunk=chunk),
             lora, batch, quantization=quant)
  # float32 throughout; the two differ only in summation order (the loss
  # per chunk, the gradients per layer): a few float32 ulps of sums over
  # 2 x 16 tokens and 32..64 features; 1e-5 relative is ~100 ulp (measured
  # 5e-7 of the largest gradient). The second step starts from adapters
  # that moved by a whole gradient (SGD, rate 1), which magnifies those
  # ulps: train_step with and without remat differ by 3.3e-5 of the
  # largest gradient there, so 2e-4. A missing chunk, a wrong mask or
  # another dropout draw moves the loss and gradients by percents.
  for k, ((out_g, g_g), (out_w, g_w)) in enumerate(zip(got, want)):
    tol = 1e-5 if k == 0 else 2e-4
    assert int(out_g["targets"]) == int(out_w["targets"])
    np.testing.assert_allclose(float(out_g["loss"]), float(out_w["loss"]),
                               rtol=tol)
    np.testing.assert_allclose(float(out_g["grad_norm"]),
                               float(out_w["grad_norm"]), rtol=tol)
    scale = max(float(np.abs(g).max()) for g in g_w)
    for x, y in zip(g_g, g_w):
      np.testing.assert_allclose(x, y, rtol=tol, atol=tol * scale)


def test_layerwise_step_tied_head_and_one_program_per_layer(monkeypatch):
  cfg = models.LlamaConfig(vocab_size=64, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=True)
  from jaxbnb import lora as lora_lib
  make = lambda: lora_lib.apply_lora(
      models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)),
      LoRAConfig(r=2, target_modules=("q_proj", "down_proj"),
                 init_lora_weights=False), rngs=nnx.Rngs(1))
  batch = _chat_like(1)
  batch = {k: v % 64 if k == "input_ids" else v for k, v in batch.items()}
  traces = []
  real = layerwise._forward_leaves

  def counting(*args):
    traces.append(1)
    return real(*args)
  monkeypatch.setattr(layerwise, "_forward_leaves", counting)
  a, b = make(), make()
  out_a = train.layerwise_train_step(
      a, nnx.Optimizer(a, SGD, wrt=nnx.LoRAParam), batch)
  out_b = train.train_step(b, nnx.Optimizer(b, SGD, wrt=nnx.LoRAParam),
                           batch, remat=True)
  assert len(traces) == 1  # three layers, one traced program
  np.testing.assert_allclose(float(out_a["loss"]), float(out_b["loss"]),
                             rtol=1e-5)
  for x, y in zip(common.lora_arrays(a), common.lora_arrays(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_layerwise_refuses_adapters_outside_the_layers():
  model = common.tiny_model()  # no adapters at all: train_step's message
  with pytest.raises(ValueError, match="`model` has no adapters"):
    train.layerwise_train_step(model, None, _chat_like(1))
  model = common.lora_model()
  with pytest.raises(ValueError, match="`chunk`"):
    train.layerwise_train_step(model, None, _chat_like(1), chunk=0)
  assert train.supports_layerwise(model)
  assert not train.supports_layerwise(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def test_layerwise_catches_adapters_added_after_its_check():
  """The structure check runs once per model (host time); an adapter added
  outside the layers afterwards is still refused before anything changes."""
  model = common.lora_model()
  model.train()
  opt = nnx.Optimizer(model, SGD, wrt=nnx.LoRAParam)
  train.layerwise_train_step(model, opt, _chat_like(1))
  model.extra = nnx.LoRAParam(jnp.ones((3,)))
  def changing():  # the adapters and the dropout RNG states, as arrays
    return [jax.random.key_data(v)
            if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
            for v in jax.tree.leaves(
                nnx.state(model, (nnx.LoRAParam, nnx.RngState)))]

  before = changing()
  with pytest.raises(ValueError, match="decoder layers"):
    train.layerwise_train_step(model, opt, _chat_like(1))
  for x, y in zip(before, changing()):
    np.testing.assert_array_equal(x, y)
  assert not train.supports_layerwise(model)


def test_optimizer_update_does_not_copy_the_frozen_weights():
  """The update program returns the adapters and optimizer state only (an
  `nnx.jit` over the model returned, so copied, every frozen weight)."""
  model = common.lora_model()
  opt = nnx.Optimizer(model, train.make_optimizer(train.TrainConfig()),
                      wrt=nnx.LoRAParam)
  grads = nnx.state(model, nnx.LoRAParam)
  parts = nnx.split((model, opt), step_lib.MUTABLE, ...)
  update = layerwise._UpdatePlan((model, opt))
  compiled = update.apply(None).lower(*update.read(), grads,
                                      jnp.float32(1)).compile()
  out = compiled.memory_analysis().output_size_in_bytes
  nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
  # (+ the norm and the output tuple's bookkeeping: 636 bytes measured)
  assert out <= nbytes(parts[1]) + 1024  # adapters + optimizer state
  assert nbytes(parts[2]) > out  # the frozen weights stay in


def test_layerwise_walks_the_layers_once_and_follows_replaced_variables(
    monkeypatch):
  """The layers' graphs are walked once per model (`_Plan`); values set
  between steps (`nnx.update`) are read live, and a variable replaced by a
  new object makes the next step walk again and train the new one."""
  made = []
  real_init = layerwise._Plan.__init__

  def counting(self, model):
    made.append(1)
    real_init(self, model)
  monkeypatch.setattr(layerwise._Plan, "__init__", counting)
  lora = LoRAConfig(r=4, target_modules="all-linear", init_lora_weights=False)
  batch = _chat_like(1)
  a, b = common.lora_model(lora=lora), common.lora_model(lora=lora)
  opt_a = nnx.Optimizer(a, SGD, wrt=nnx.LoRAParam)
  opt_b = nnx.Optimizer(b, SGD, wrt=nnx.LoRAParam)
  for _ in range(2):
    train.layerwise_train_step(a, opt_a, batch)
  assert len(made) == 1
  # New values through nnx.update: the next step must use them (b is
  # the reference: a model that never ran a layerwise step).
  nnx.update(b, nnx.state(a, nnx.LoRAParam))
  shifted = jax.tree.map(lambda v: v * 0.5, nnx.state(a, nnx.LoRAParam))
  nnx.update(a, shifted)
  nnx.update(b, shifted)
  out_a = train.layerwise_train_step(a, opt_a, batch)
  out_b = train.train_step(b, opt_b, batch, remat=True)
  assert len(made) == 1
  np.testing.assert_allclose(float(out_a["loss"]), float(out_b["loss"]),
                             rtol=1e-5)
  # A replaced adapter variable: a new plan, and the new variable trains.
  proj = a.model.layers[1].self_attn.q_proj
  old = proj.lora_B
  proj.lora_B = nnx.LoRAParam(jnp.full(old.shape, 0.01, old.dtype))
  new_var = proj.lora_B
  before = np.asarray(new_var.get_value())
  train.layerwise_train_step(a, nnx.Optimizer(a, SGD, wrt=nnx.LoRAParam),
                             batch)
  assert len(made) == 2
  assert proj.lora_B is new_var
  assert not np.array_equal(np.asarray(new_var.get_value()), before)


def test_layerwise_follows_a_switch_to_eval_mode():
  """`model.eval()` between steps changes a static attribute (the dropout's
  `deterministic`) that the cached programs hold: the next step must see
  it (with dropout 0.5 still on, the loss would differ by percents)."""
  lora = LoRAConfig(r=4, lora_dropout=0.5, target_modules="all-linear",
                    init_lora_weights=False)
  batch = _chat_like(1)
  a, b = common.lora_model(lora=lora), common.lora_model(lora=lora)
  a.train()
  b.train()
  opt_a = nnx.Optimizer(a, SGD, wrt=nnx.LoRAParam)
  opt_b = nnx.Optimizer(b, SGD, wrt=nnx.LoRAParam)
  train.layerwise_train_step(a, opt_a, batch)
  train.train_step(b, opt_b, batch, remat=True)
  a.eval()
  b.eval()
  out_a = train.layerwise_train_step(a, opt_a, batch)
  out_b = train.train_step(b, opt_b, batch, remat=True)
  np.testing.assert_allclose(float(out_a["loss"]), float(out_b["loss"]),
                             rtol=2e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gather_keeps_packed_bytes_in_a_float_storage(dtype):
  # Packed 4-bit bytes stored as bfloat16 (FSDP-QLoRA's quant_storage),
  # every 16-bit pattern, gathered from 8 devices inside jit as a layer's
  # program gathers them. XLA:CPU moves 16-bit floats through float32 and
  # turned the 252 signalling-NaN patterns of bfloat16 into the quiet NaN
  # (changed codes); the bytes must come back as they were.
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
  bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
  x = jax.device_put(jnp.asarray(bits.view(dtype)).reshape(-1, 1),
                     NamedSharding(mesh, P("fsdp", None)))
  whole = NamedSharding(mesh, P())
  [out] = jax.jit(lambda x: layerwise._gather([x], [whole]))(x)
  assert out.dtype == dtype and out.shape == x.shape
  assert out.sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(out).view(np.uint16).ravel(),
                                bits)
