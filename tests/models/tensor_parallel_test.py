"""Tensor-parallel decoding on a device mesh (8 virtual CPU devices).

A model loaded with `from_pretrained(..., mesh=mesh)` decodes through the
plain `generate` call: the KV cache split by key/value heads over
"tensor", quantized linears on their own rows per device
(models/tensor_parallel.py). Greedy tokens must be those of the
single-device model, and the compiled decode step must never all-gather a
quantized weight.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbnb
from jaxbnb import convert
from jaxbnb import models
from jaxbnb._src.io import sharding as sharding_lib
from jaxbnb._src.models import sampling
from jaxbnb._src.models import tensor_parallel
from jaxbnb.nnx import Linear8bitLt
from jaxbnb.nnx import LinearNF4

# 8 query heads, 4 key/value heads: "tensor" may be 2 or 4. With hidden 256
# the row shards of q_proj fill whole nested (double-quant) blocks of 256
# absmax values, those of k_proj at tensor=4 do not: both paths run.
CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=512,
              num_hidden_layers=2, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32, initializer_range=0.1,
              max_position_embeddings=256)
QUANT = {
    "float32": None,
    "nf4-dq": models.QuantizationConfig.nf4(compute_dtype="float32"),
    # LLM.int8 with outliers (threshold 6): the random model's activations
    # have outlier columns in some rows only.
    "int8": models.QuantizationConfig(load_in_8bit=True),
    # FSDP-QLoRA's storage: packed bytes as bfloat16, resharded from
    # fsdp x tensor to tensor in front of each linear (XLA:CPU moved them
    # through float32 and changed the signalling-NaN patterns' codes).
    "nf4-bf16": models.QuantizationConfig.nf4(
        compute_dtype="float32", bnb_4bit_quant_storage="bfloat16"),
}
PROMPTS = [[5, 17, 42, 7, 99], [3, 8], [200, 1, 2], [9]]
NEW = 6


def _mesh(spec):
  n = 1
  for item in spec.split(","):
    n *= int(item.split("=")[1])
  return convert.parse_mesh(spec, jax.devices()[:n])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  cfg = models.LlamaConfig(**CONFIG)
  model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(3))
  path = str(tmp_path_factory.mktemp("tp") / "model")
  convert.save_pretrained(model, path, progress=False)
  return path


_REFERENCE = {}


def _load(folder, quant, mesh=None):
  return convert.from_pretrained(folder, quantization=QUANT[quant],
                                 param_dtype="float32", progress=False,
                                 mesh=mesh)


def _reference(folder, quant):
  if quant not in _REFERENCE:
    _REFERENCE[quant] = models.generate(
        _load(folder, quant), PROMPTS, max_new_tokens=NEW,
        stop_token_ids=()).sequences
  return _REFERENCE[quant]


@pytest.mark.parametrize("spec,quant", [
    ("tensor=2", "nf4-dq"),
    ("tensor=4", "nf4-dq"),
    ("data=4,tensor=2", "nf4-dq"),
    ("tensor=4", "float32"),
    ("data=2,tensor=4", "int8"),
    ("fsdp=2,tensor=2", "nf4-bf16"),
])
def test_greedy_tokens_match_single_device(folder, spec, quant):
  mesh = _mesh(spec)
  model = _load(folder, quant, mesh)
  gen = models.Generator(model)
  out = gen.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=())
  assert out.sequences == _reference(folder, quant)
  # The compiled prefill leaves the KV cache split by heads over "tensor"
  # (and its 4 rows over "data").
  prefill = [c for k, c in gen._compiled.items() if "prefill" in k]
  cache = prefill[0].output_shardings[0]["cache"]
  data = "data" if "data" in mesh.shape else None
  for kv in (cache.k, cache.v):
    assert kv.spec == P(None, data, None, "tensor"), kv.spec
  # The model's weights were not moved or replaced.
  q = model.model.layers[0].self_attn.q_proj.weight.get_value()
  leaf = {"float32": q, "int8": getattr(q, "CB", None)}.get(
      quant, getattr(q, "data", None))
  assert "tensor" in np.atleast_1d(leaf.sharding.spec[0]), leaf.sharding


def test_tensor_axis_must_divide_kv_heads(folder):
  model = _load(folder, "float32", _mesh("tensor=8"))
  with pytest.raises(ValueError, match=r"'tensor' \(size 8\).*"
                     r"num_key_value_heads, got 4"):
    models.generate(model, [[1, 2]], max_new_tokens=2)


@pytest.mark.parametrize("kind,rows,cols", [
    ("nf4", 256, 256), ("nf4", 128, 64), ("int8", 64, 128)])
def test_row_shards_run_the_layer_forward(kind, rows, cols):
  # NF4 256 x 256 at tensor=4: each shard's 256 absmax codes fill one
  # nested block (sliced); 128 x 64: 32 codes per shard (dequantized
  # first). LLM.int8 with threshold 6: the outlier columns of the input
  # are found on the whole input, on every device alike.
  mesh = _mesh("tensor=4")
  if kind == "nf4":
    layer = LinearNF4(cols, rows, dtype=jnp.float32, rngs=nnx.Rngs(0))
  else:
    layer = Linear8bitLt(cols, rows, has_fp16_weights=False, threshold=6.0,
                         dtype=jnp.float32, rngs=nnx.Rngs(0))
  layer.bias.set_value(jnp.linspace(-1.0, 1.0, rows))
  x = jax.random.normal(jax.random.key(1), (3, 1, cols))
  x = x.at[:, :, 5].set(9.0)  # an outlier column
  want = layer(x)
  w = layer.weight.get_value()
  specs = sharding_lib.quantized_specs(
      sharding_lib.ShardingRules(), "layers.0.mlp.up_proj.weight", w, mesh)
  layer.weight.set_value(jax.tree.map(
      lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), w, specs,
      is_leaf=lambda s: isinstance(s, P)))
  layer.bias.set_value(jax.device_put(layer.bias[...],
                                      NamedSharding(mesh, P("tensor"))))
  tp = tensor_parallel.TensorParallel(mesh, "tensor", None)

  @jax.jit
  def run(x):
    with tensor_parallel.activate(tp):
      return tensor_parallel.linear(layer, x)

  got = run(x)
  assert got.sharding.spec == P(None, None, "tensor")
  # The same weight, the same float32 sums over the whole input: equal up
  # to the order XLA adds in.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_int8_outlier_columns_come_from_the_whole_batch():
  # LLM.int8 picks its outlier columns over all the rows of a matmul (as
  # on one device): a batch split over "data" must not let each shard pick
  # its own. The outlier column here is in row 0 only.
  mesh = _mesh("data=2,tensor=4")
  layer = Linear8bitLt(64, 128, has_fp16_weights=False, threshold=6.0,
                       use_bias=False, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 3, 64))
  x = x.at[0, :, 5].set(10.0)
  want = layer(x)
  w = layer.weight.get_value()
  layer.weight.set_value(jax.tree.map(
      lambda a: jax.device_put(a, NamedSharding(
          mesh, P("tensor") if a.ndim else P())), w))
  tp = tensor_parallel.TensorParallel(mesh, "tensor", "data")

  @jax.jit
  def run(x):
    with tensor_parallel.activate(tp):
      return tensor_parallel.linear(layer, x)

  np.testing.assert_allclose(run(x), want, rtol=1e-6, atol=1e-5)


def _decode_hlo(gen):
  """The compiled text of one decode chunk (the 4-bit kernels interpreted),
  after a prefill run in reference mode."""
  ids = jnp.ones((1, 32), jnp.int32)
  mask = jnp.ones((1, 32), bool)
  keys = sampling.row_keys(0, 1)
  params = dict(temperature=jnp.float32(1), top_k=jnp.int32(0),
                top_p=jnp.float32(1), repetition_penalty=jnp.float32(1),
                max_new_tokens=jnp.int32(4), pad=jnp.int32(0))
  stop = jnp.full((4,), -1, jnp.int32)
  with jaxbnb.kernel_mode("reference"):
    prefill, _ = gen._prefill(128, False, False, gen.state, ids, mask, keys,
                              params, stop)
    carry, _ = prefill(gen.state, ids, mask, keys, params, stop)
  with jaxbnb.kernel_mode("interpret"):
    chunk, _ = gen._chunk(1, False, gen.state, carry, params, stop)
  return chunk.as_text()


def _collectives(hlo):
  """(op, dtype, elements) of every collective result in `hlo`."""
  out = []
  for dtype, dims, op in re.findall(
      r"= (\w+)\[([0-9,]*)\]\S* (all-gather|all-reduce|all-to-all|"
      r"collective-permute)\(", hlo):
    out.append((op, dtype, int(np.prod([int(d) for d in dims.split(",")
                                        if d]))))
  return out


def _all_gathers(hlo):
  """(dtype, elements) of every all-gather result in `hlo`."""
  return [(dtype, n) for op, dtype, n in _collectives(hlo)
          if op == "all-gather"]


def _one_layer_model(path, mesh_spec, wide=False):
  """A 1-layer NF4 + DQ model loaded onto a mesh: hidden 64, or with `wide`
  256 (its o_proj/down_proj inputs, 256 and 512, then split into whole
  blocks on tensor=4: `row_parallel`'s column layout applies)."""
  h = 256 if wide else 64
  cfg = models.LlamaConfig(vocab_size=128, hidden_size=h,
                           intermediate_size=2 * h, num_hidden_layers=1,
                           num_attention_heads=8 if wide else 4,
                           num_key_value_heads=4, head_dim=32 if wide else 16,
                           max_position_embeddings=256)
  convert.save_pretrained(models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)),
                          str(path), progress=False)
  return _load(str(path), "nf4-dq", _mesh(mesh_spec))


def test_decode_step_never_gathers_a_quantized_weight(tmp_path):
  model = _one_layer_model(tmp_path, "tensor=4")
  # The kernels (interpreted here; compiled on a GPU) are opaque to GSPMD.
  # Without shard_map it gathers the packed bytes (uint8) of the weights
  # before every kernel call, at every step...
  plain = _all_gathers(_decode_hlo(models.Generator(model, tensor_axis=None)))
  assert any(dtype == "u8" for dtype, _ in plain), plain
  # ...with it, only activations move: float32, at most a [1, 1, 128]
  # row (the MLP's hidden input of down_proj), never the 128 x 64 / 2
  # = 4096 packed bytes of one weight.
  gathers = _all_gathers(_decode_hlo(models.Generator(model)))
  assert gathers, "expected the activations of o_proj/down_proj gathered"
  assert all(dtype in ("f32", "s32", "pred") for dtype, _ in gathers), gathers
  assert max(n for _, n in gathers) <= 128, gathers


def _with_adapters(model, seed):
  """QLoRA adapters on every projection, lora_B non-zero (so they count)."""
  from jaxbnb import lora  # pylint: disable=import-outside-toplevel
  lora.apply_lora(model, lora.LoRAConfig(
      r=4, lora_alpha=8, target_modules=(
          "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
          "down_proj")), rngs=nnx.Rngs(seed))
  key = jax.random.key(seed)
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.LoRAParam) and path[-1] == "lora_B":
      key, sub = jax.random.split(key)
      value = var.get_value()
      var.set_value(0.05 * jax.random.normal(sub, value.shape, value.dtype))
  return model


def test_qlora_adapters_decode_tensor_parallel(folder, tmp_path):
  """A QLoRA model (adapters on the quantized projections) decodes the same
  tokens on tensor=2 as on one device, its quantized bases per device. (The
  adapters, added after the sharded load, live on one device: `Generator`
  replicates them onto the mesh.)"""
  one = _with_adapters(_load(folder, "nf4-dq"), 7)
  want = models.generate(one, PROMPTS, max_new_tokens=NEW,
                         stop_token_ids=()).sequences
  tp = _with_adapters(_load(folder, "nf4-dq", _mesh("tensor=2")), 7)
  got = models.Generator(tp).generate(PROMPTS, max_new_tokens=NEW,
                                      stop_token_ids=()).sequences
  assert got == want
  # No packed weight is gathered for a decode step of an adapted model.
  small = _with_adapters(_one_layer_model(tmp_path, "tensor=4"), 3)
  gathers = _all_gathers(_decode_hlo(models.Generator(small)))
  assert all(dtype != "u8" for dtype, _ in gathers), gathers


def test_row_parallel_layout_of_the_generator_state(tmp_path):
  model = _one_layer_model(tmp_path, "tensor=4", wide=True)
  gen = models.Generator(model)
  layer = gen.state["model"]["layers"][0]
  for owner, name, (out, inn) in (("self_attn", "o_proj", (256, 256)),
                                  ("mlp", "down_proj", (256, 512))):
    w = layer[owner][name]["weight"].get_value()
    qs = w.quant_state
    # The packed bytes as the [out, in / 2] matrix, split by columns; the
    # absmax dequantized to float32 [out, in / 64], split likewise.
    assert w.data.shape == (out, inn // 2) and w.data.dtype == jnp.uint8
    assert w.data.sharding.spec == P(None, "tensor")
    assert qs.absmax.shape == (out, inn // 64)
    assert qs.absmax.dtype == jnp.float32 and not qs.nested
    assert qs.absmax.sharding.spec == P(None, "tensor")
    assert qs.shape == (out, inn)
    # The model's own weight is untouched (bitsandbytes' flat layout).
    own = getattr(getattr(model.model.layers[0], owner), name)
    assert own.weight.get_value().data.shape == (out * inn // 2, 1)
  # The column-parallel projections keep their row layout.
  q = layer["self_attn"]["q_proj"]["weight"].get_value()
  assert q.data.shape == (256 * 256 // 2, 1)
  assert q.data.sharding.spec[0] == "tensor"


def test_row_parallel_layout_needs_two_collectives_a_layer(tmp_path,
                                                          monkeypatch):
  """o_proj and down_proj each all-reduce their partial sums; no
  activation is gathered (the row layout gathered their inputs and
  outputs: 11 collectives a step for this 1-layer model against 5)."""
  model = _one_layer_model(tmp_path, "tensor=4", wide=True)
  after = _collectives(_decode_hlo(models.Generator(model)))
  monkeypatch.setattr(tensor_parallel, "row_parallel", lambda s, tp: s)
  before = _collectives(_decode_hlo(models.Generator(model)))
  def wide(cs, op):  # collectives of whole hidden-size activations
    return [c for c in cs if c[0] == op and c[2] >= 256]
  assert wide(before, "all-gather"), before
  assert not wide(after, "all-gather"), after
  # the embedding's and the two projections' all-reduces of [1, 1, 256]
  assert len(wide(after, "all-reduce")) == 3, after
  assert len(after) < len(before), (before, after)


def test_row_parallel_keeps_rows_for_bias_and_dora(tmp_path):
  from jaxbnb import lora  # pylint: disable=import-outside-toplevel
  model = _one_layer_model(tmp_path, "tensor=2", wide=True)
  lora.apply_lora(model, lora.LoRAConfig(
      r=2, lora_alpha=4, target_modules=("o_proj",), use_dora=True),
                  rngs=nnx.Rngs(1))
  gen = models.Generator(model)
  layer = gen.state["model"]["layers"][0]
  o = layer["self_attn"]["o_proj"]["base_layer"]["weight"].get_value()
  assert o.data.shape[1] == 1  # DoRA reads the dense base: rows
  down = layer["mlp"]["down_proj"]["weight"].get_value()
  assert down.data.shape == (256, 256)
  # A bias keeps the rows too (added once, not on every device).
  tp = tensor_parallel.TensorParallel(_mesh("tensor=2"), "tensor", None)
  w = LinearNF4(256, 64, dtype=jnp.float32, rngs=nnx.Rngs(0))
  _, state = nnx.split(w)
  out = tensor_parallel.row_parallel({"o_proj": state}, tp)
  assert out["o_proj"]["weight"].get_value().data.shape[1] == 1


@pytest.mark.parametrize("nested", [False, True])
def test_column_layout_runs_the_layer_product(nested):
  """A bias-free 4-bit `down_proj` in the column layout on tensor=4: each
  device multiplies its 64 input columns (one block a row), and the
  partial sums add up to the layer's own output (float32 sums in another
  order)."""
  mesh = _mesh("tensor=4")
  layer = LinearNF4(256, 96, use_bias=False, dtype=jnp.float32,
                    compress_statistics=nested, rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(4), (2, 3, 256))
  want = layer(x)
  tp = tensor_parallel.TensorParallel(mesh, "tensor", None)
  graph, state = nnx.split(layer)
  state = tensor_parallel.row_parallel({"down_proj": state}, tp)["down_proj"]
  w = state["weight"].get_value()
  assert w.data.shape == (96, 128) and w.quant_state.absmax.shape == (96, 4)
  x = jax.device_put(x, NamedSharding(mesh, P(None, None, "tensor")))

  @jax.jit
  def run(state, x):
    with tensor_parallel.activate(tp):
      return tensor_parallel.linear(nnx.merge(graph, state), x)

  got = run(state, x)
  assert got.sharding.spec in (P(), P(None, None, None)), got.sharding
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
