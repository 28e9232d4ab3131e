"""`pallas_kernels.lowering.lowered_once`: one trace and one lowering per
distinct kernel launch in a program."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gemv_4bit_lut as lg
from pallas_kernels import gemv_4bit_warp_tma as wt
from pallas_kernels import lowering
from tests.kernels.gemv_4bit_lut_test import _abstract_weight, _lowered_or_skip
from tests.kernels.gemv_4bit_test import _code


def _counted():
  traces = []

  @lowering.lowered_once
  def scaled(x, pair, *, by, plan=None):
    traces.append((x.shape, by))
    return {"y": x * by + pair[0] - pair[1], "plan": (by, plan)}

  return scaled, traces


def test_values_and_static_outputs():
  scaled, _ = _counted()
  x = jnp.arange(4.0)
  out = scaled(x, (jnp.ones(4), jnp.full(4, 3.0)), by=2.0, plan=[1, 2])
  np.testing.assert_array_equal(out["y"], np.arange(4.0) * 2 - 2)
  assert out["plan"] == (2.0, [1, 2])  # Python values, as the trace made them
  assert isinstance(out["plan"][1][0], int)


def test_one_trace_per_distinct_launch():
  scaled, traces = _counted()
  lowering.clear_cache()

  def three(a, b, c):
    pair = (a, b)
    return (scaled(a, pair, by=2.0)["y"] + scaled(b, pair, by=2.0)["y"]
            + scaled(c, pair, by=2.0)["y"])

  s = jax.ShapeDtypeStruct((8,), jnp.float32)
  text = jax.jit(three).trace(s, s, s).lower().as_text()
  assert len(traces) == 1
  assert lowering.cache_size() == 1
  # One function body, called three times.
  assert len(re.findall(r"func\.func private", text)) == 1
  assert len(re.findall(r"call @", text)) == 3
  # Another static value, shape or dtype is another launch.
  scaled(jnp.ones(8), (jnp.ones(8), jnp.ones(8)), by=3.0)
  scaled(jnp.ones(5), (jnp.ones(5), jnp.ones(5)), by=2.0)
  scaled(jnp.ones(8, jnp.bfloat16), (jnp.ones(8), jnp.ones(8)), by=2.0)
  assert len(traces) == 4
  assert lowering.cache_size() == 4


def test_kernel_constants_key_the_cache(monkeypatch):
  """A `pallas_kernels` constant set by a test or benchmark is another
  launch, not the function traced under the old value."""
  scaled, traces = _counted()
  args = (jnp.ones(3), (jnp.ones(3), jnp.ones(3)))
  scaled(*args, by=1.0)
  scaled(*args, by=1.0)
  assert len(traces) == 1
  monkeypatch.setattr(wt, "DECODE", "prmt" if wt.DECODE != "prmt" else "lds")
  scaled(*args, by=1.0)
  assert len(traces) == 2


def test_unhashable_static_argument_is_an_error():
  scaled, _ = _counted()
  with pytest.raises(TypeError, match="unhashable"):
    scaled(jnp.ones(2), (jnp.ones(2), jnp.ones(2)), by=1.0, plan=bytearray(b"a"))


@pytest.mark.parametrize("enabled", [True, False])
def test_decode_layers_lower_each_kernel_once(monkeypatch, enabled):
  """Four layers' table GEMVs of the same shapes (a decode step) hold one
  Mosaic GPU module, not four: the program's lowering is that of one
  layer's kernels."""
  monkeypatch.setattr(lowering, "ENABLED", enabled)
  k, ns = 2048, (2048, 512, 512)
  fn = functools.partial(lg.gemv_group, code=_code("nf4"), ns=ns, k=k)

  def layers(x, ws):
    # An intermediate, as a model's hidden state is: the argument's type
    # carries the abstract mesh without its device, another key.
    x = -(-x)
    for w in ws:
      x = x + jnp.concatenate(fn(x, w), axis=1)[:, :k].astype(x.dtype)
    return x

  text = _lowered_or_skip(
      layers, jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
      [[_abstract_weight(n, k) for n in ns] for _ in range(4)])
  hashes = re.findall(r'kernel_hash = "(.*?)", module', text)
  assert len(hashes) == (1 if enabled else 4), len(hashes)
  assert len(set(hashes)) == 1  # the same module: one compile on the GPU


@pytest.mark.parametrize("hidden,inter,heads,kv_heads", [
    (4096, 14336, 32, 8),   # Llama-3-8B's widths: the Mosaic GPU kernels
    (2048, 5632, 16, 4),    # TinyLlama's: Triton groups at q/k/v
])
def test_model_decode_step_holds_each_kernel_once(monkeypatch, hidden, inter,
                                                  heads, kv_heads):
  """A Llama decode step (NF4 + DQ, one token, the cache carried through),
  lowered for an H200: three layers hold exactly the kernels one layer
  holds, so the program's lowering and compile do not grow with the
  layers (one decode-attention kernel, one module per distinct GEMV)."""
  import jaxbnb  # pylint: disable=g-import-not-at-top
  import pallas_kernels  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxbnb import models  # pylint: disable=g-import-not-at-top
  from pallas_kernels import _backend  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  for mod, name, value in ((_backend, "on_hopper", True),
                           (_backend, "on_nvidia_gpu", True),
                           (_backend, "num_sms", 132),
                           (pallas_kernels, "on_nvidia_gpu", True)):
    monkeypatch.setattr(mod, name, lambda value=value: value)

  def kernels(layers):
    cfg = models.LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, max_position_embeddings=512)
    model = nnx.eval_shape(lambda: models.LlamaForCausalLM(
        cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
        quantization=models.QuantizationConfig.nf4(
            double_quant=True, compute_dtype="bfloat16"),
        rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: models.KVCache.init(
        cfg, batch=1, max_len=256, dtype=jnp.bfloat16))

    def step(state, ids, cache):
      return nnx.merge(graphdef, state)(ids, cache=cache)

    with jaxbnb.kernel_mode("pallas"):
      text = helpers.lowered_for_h200(
          step, state, jax.ShapeDtypeStruct((1, 1), jnp.int32), cache)
    return (len(re.findall(r'kernel_hash = "(.*?)", module', text)),
            text.count('"jaxbnb_decode_attention"'))

  one, three = kernels(1), kernels(3)
  assert three == one, (one, three)
  assert three[1] == 1


@pytest.mark.gpu
def test_gpu_decode_layers_match_unshared_lowering(monkeypatch):
  """Compiled on the GPU: four layers' table GEMVs through the shared
  launch give the very bits of the old lowering (a kernel per call), and
  the four layers of one jitted program share one Mosaic GPU function."""
  from jaxbnb import functional as F  # pylint: disable=g-import-not-at-top
  from tests.kernels import _util  # pylint: disable=g-import-not-at-top
  k, ns = 2048, (2048, 512, 512)
  fn = functools.partial(lg.gemv_group, code=_code("nf4"), ns=ns, k=k)
  layers_w = []
  for layer in range(4):
    ws = [F.quantize_4bit(jnp.asarray(_util.rng_array((n, k), 10 * layer + i,
                                                      jnp.bfloat16)),
                          blocksize=64, quant_type="nf4",
                          compress_statistics=True) for i, n in enumerate(ns)]
    layers_w.append([(p.reshape(-1), q.absmax, q.nested_absmax,
                      q.nested_code, q.offset) for p, q in ws])

  def layers(x, ws):
    for w in ws:
      x = x + jnp.concatenate(fn(x, w), axis=1)[:, :k].astype(x.dtype) * 0.01
    return x

  x = jnp.asarray(_util.rng_array((1, k), 5, jnp.bfloat16))
  outs = {}
  for enabled in (True, False):
    monkeypatch.setattr(lowering, "ENABLED", enabled)
    lowering.clear_cache()
    outs[enabled] = np.asarray(jax.jit(layers)(x, layers_w), np.float32)
  np.testing.assert_array_equal(outs[True], outs[False])
  assert np.all(np.isfinite(outs[True]))
  monkeypatch.setattr(lowering, "ENABLED", True)
  text = jax.jit(layers).lower(x, layers_w).as_text()
  assert len(re.findall(r'kernel_hash = "(.*?)", module', text)) == 1


def test_docstring_example_runs():
  from tests import helpers  # pylint: disable=g-import-not-at-top
  helpers.assert_docstring_examples_pass(lowering.lowered_once,
                                         "lowered_once")


def test_works_inside_shard_map():
  """Tensor-parallel decoding calls the kernels inside `shard_map` (with
  its varying-axes check): the jitted launch keeps the shard's types."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  scaled, traces = _counted()
  mesh = jax.make_mesh((4,), ("t",))

  def body(x, w):
    return (scaled(w, (x, x), by=2.0)["y"]
            + scaled(w, (x, x), by=2.0)["y"])

  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("t")),
                             out_specs=P("t")))
  w = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("t")))
  np.testing.assert_array_equal(fn(jnp.ones(2), w), np.arange(8.0) * 4)
  assert len(traces) == 1
