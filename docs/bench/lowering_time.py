"""The StableHLO lowering of an 8B-shaped model's programs for an H200,
on a CPU (no GPU needed): the decode bench's 64-step loop and a
128-token prefill, timed, with their text sizes and the prefill's Mosaic
GPU modules (docs/benchmarks.md, forty-second session). The backend
checks are set to an H200's answers and the kernel mode to "pallas", so
the kernels are those the GPU would run; LOWER_ONCE=0 turns
`pallas_kernels.lowering` off (every call lowered on its own).

    LOWER_ONCE=0 python docs/bench/lowering_time.py 32 1
    LOWER_ONCE=1 python docs/bench/lowering_time.py 32 1
"""
import os, sys, time, functools, json
import jax, jax.numpy as jnp
from flax import nnx
from pallas_kernels import _backend, lowering
_backend.on_hopper = lambda: True
_backend.on_nvidia_gpu = lambda: True
_backend.num_sms = lambda: 132
import pallas_kernels
pallas_kernels.on_nvidia_gpu = lambda: True
lowering.ENABLED = os.environ.get("LOWER_ONCE", "1") == "1"
import jaxbnb
from jaxbnb import models
from jaxbnb._src.tools import bench_decode
from jaxbnb._src.models import generate as G
from jax._src.mesh import AbstractDevice
layers = int(sys.argv[1]); batch = int(sys.argv[2])
shape = dict(bench_decode.SHAPES["llama-3-8b"], num_hidden_layers=layers)
cfg = models.LlamaConfig(**shape)
model = nnx.eval_shape(lambda: models.LlamaForCausalLM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
    quantization=bench_decode._quantization("jax-nf4-dq"), rngs=nnx.Rngs(0)))
gen = G.Generator(model)
S = jax.ShapeDtypeStruct
max_len = 256
cache = jax.eval_shape(lambda: models.KVCache.init(cfg, batch=batch, max_len=max_len, dtype=jnp.bfloat16))
carry = dict(cache=cache, last=S((batch,), jnp.int32))
mesh = jax.sharding.AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))
res = dict(layers=layers, batch=batch, lower_once=lowering.ENABLED)
with jaxbnb.kernel_mode("pallas"), jax.sharding.use_abstract_mesh(mesh):
  fn = jax.jit(functools.partial(gen._bench_fn, 64))
  t0 = time.perf_counter(); txt = fn.trace(gen.state, carry).lower(lowering_platforms=("cuda",)).as_text()
  res["decode_s"] = round(time.perf_counter() - t0, 2); res["decode_mb"] = round(len(txt) / 1e6, 2)
  res["decode_mosaic_modules"] = txt.count("kernel_hash")
  # prefill: the model on a 128-token prompt (M = 128 rows per layer's matmuls)
  def prefill(state, ids):
    m = nnx.merge(gen.graphdef, state)
    c = models.KVCache.init(cfg, batch=batch, max_len=max_len, dtype=jnp.bfloat16)
    return m(ids, cache=c)[0]
  t0 = time.perf_counter(); txt = jax.jit(prefill).trace(gen.state, S((batch, 128), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
  res["prefill_s"] = round(time.perf_counter() - t0, 2); res["prefill_mb"] = round(len(txt) / 1e6, 2)
  res["prefill_mosaic_modules"] = txt.count("kernel_hash")
print(json.dumps(res))
