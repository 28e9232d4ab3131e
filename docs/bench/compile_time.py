"""Where an 8B-shaped model's compile goes: each program's lowering
(trace, StableHLO, the kernels' modules) and XLA's compile, timed apart
(docs/benchmarks.md, forty-second session). Random NF4 + DQ weights of
Llama-3-8B's shapes with LAYERS layers; the decode bench's programs
(prefill, the 16-step decode loop), then `generate`'s (its prefill and
decode chunk) for 8 new tokens. On the GPU machine:

    python docs/bench/compile_time.py LAYERS BATCH TAG    # -> $OUT/compile_TAG.json

SHAPE picks another `bench decode` shape; JAX_COMPILATION_CACHE_DIR
(with JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0) times a second
process reading the programs back.
"""
import json, os, sys, time
import jax
from jaxbnb import models
from jaxbnb._src.models import generate as G
from jaxbnb._src.tools import bench_decode
layers, batch, tag = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
times = []
def _get(self, key, fn, *args):
  key = (self._state_sig, G.dispatch.get_kernel_mode(), G.decode_kernel.attention_choice(), *key)
  hit = self._compiled.get(key)
  if hit is not None:
    return hit, 0.0
  t0 = time.perf_counter(); lo = fn.lower(*args); t1 = time.perf_counter()
  c = lo.compile(); t2 = time.perf_counter()
  times.append(dict(program=key[3], lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2)))
  print("  ", times[-1], flush=True)
  self._compiled[key] = c
  return c, t2 - t0
G.Generator._get = _get
shape = dict(bench_decode.SHAPES[os.environ.get("SHAPE", "llama-3-8b")], num_hidden_layers=layers)
t0 = time.perf_counter()
model = bench_decode.random_model(shape, "jax-nf4-dq")
gen = models.Generator(model)
r = gen.benchmark_decode(batch=batch, prompt_len=128, steps=16, reps=1)
res = gen.generate([[1, 2, 3, 4, 5]] * batch, max_new_tokens=8)
out = dict(tag=tag, layers=layers, batch=batch, total_s=round(time.perf_counter() - t0, 1),
           programs=times, tokens=res.sequences[0], ms_per_step=r["ms_per_step"],
           cache_dir=jax.config.jax_compilation_cache_dir)
print(json.dumps(out), flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), f"compile_{tag}.json"), "w") as f:
  json.dump(out, f)
