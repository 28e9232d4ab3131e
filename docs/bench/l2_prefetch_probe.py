"""L2 prefetches between a decode layer's table GEMVs (thirty-seventh
session): a chain of Llama-3-8B-shaped layers at batch 1 made of the
kernels a decode step runs (q/k/v with the input norm in its build, o,
gate/up with the norm and down on its partials, `gemv_swiglu`), with a
stand-in for RoPE and attention (XLA elementwise kernels) and the
residual adds, timed with and without the kernels prefetching the next
GEMV's weight (`pallas_kernels.l2_prefetch`). Random NF4 + DQ weights,
8 layers (0.9 GB, past the 50 MB L2). It measured no gain (docs/
benchmarks.md, thirty-seventh session) and the prefetch was removed: the
script runs at commit ccde3e1 (`git checkout ccde3e1`), on the GPU machine:

    python docs/bench/l2_prefetch_probe.py [MODES...]

PROFILE=1 also traces two passes of each mode and prints the kernels of
one layer from the middle in launch order (start, duration).

MODES: "none"; "o" (q/k/v's programs prefetch all of o when they end);
"o_first" (the same, issued before their tables); "chainR" (q/k/v -> all
of o, o -> gate/up's first R rows a row group, gate/up -> down's, down
-> the next layer's q/k/v's); "o_twice" (o run twice, the second time
from L2). Writes $OUT/l2_prefetch_probe.jsonl.
"""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit_lut as lg
from pallas_kernels import l2_prefetch

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
H, I, KV = 4096, 14336, 1024
LAYERS = 8
EPS = 1e-5


def weight(key, n, k):
  k1, k2, k3 = jax.random.split(key, 3)
  blocks = n * k // 64
  return (jax.random.bits(k1, (n * k // 2,), jnp.uint8),
          jax.random.bits(k2, (blocks,), jnp.uint8),
          jax.random.uniform(k3, (-(-blocks // 256),), jnp.float32, 0.01,
                             0.02),
          jnp.linspace(-1, 1, 256, dtype=jnp.float32),
          jnp.asarray(0.01, jnp.float32))


def make_layers():
  layers = []
  for i in range(LAYERS):
    ks = jax.random.split(jax.random.key(i), 7)
    layers.append(dict(
        qkv=[weight(ks[0], H, H), weight(ks[1], KV, H), weight(ks[2], KV, H)],
        o=weight(ks[3], H, H), gate=weight(ks[4], I, H),
        up=weight(ks[5], I, H), down=weight(ks[6], H, I),
        n1=jnp.ones((H,), jnp.bfloat16), n2=jnp.ones((H,), jnp.bfloat16)))
  return layers


def whole(w):
  return [(w[0], l2_prefetch.whole(w[0].size)),
          (w[1], l2_prefetch.whole(w[1].size))]


def chain(mode):
  lead = int(mode[5:]) if mode.startswith("chain") else 0
  qkv_cfg = dict(lg.group_config((H, KV, KV), H), tma_skips_build=True)
  o_cfg = lg.group_config((H,), H)

  def step(x, layers):
    for i, ly in enumerate(layers):
      nxt = layers[(i + 1) % len(layers)]
      pf_qkv = whole(ly["o"]) if mode in ("o", "o_first") or lead else []
      q, k, v = lg.gemv_group(
          x, ly["qkv"], code=CODE, ns=(H, KV, KV), k=H,
          rms_norm=(ly["n1"], EPS), prefetch=tuple(pf_qkv),
          prefetch_first=mode == "o_first", **qkv_cfg)
      # RoPE + attention stand-in: a few elementwise kernels.
      a = (jnp.tanh(q) * (1 + jnp.sum(k) * 1e-9 + jnp.sum(v) * 1e-9)
           ).astype(jnp.bfloat16)
      pf_o = lg.lead_prefetch([ly["gate"], ly["up"]], (I, I), H,
                              lead) if lead else []
      o = lg.gemv_group(a, [ly["o"]], code=CODE, ns=(H,), k=H,
                        prefetch=tuple(pf_o), **o_cfg)[0]
      if mode == "o_twice":  # the second from L2: what L2 would give
        a = (a.astype(jnp.float32) + o[:, :1] * 0).astype(jnp.bfloat16)
        o = lg.gemv_group(a, [ly["o"]], code=CODE, ns=(H,), k=H, **o_cfg)[0]
      x = (x.astype(jnp.float32) + o).astype(jnp.bfloat16)
      pf_down = lg.lead_prefetch(nxt["qkv"], (H, KV, KV), H,
                                 lead) if lead else []
      d = lg.gemv_swiglu(x, ly["gate"], ly["up"], ly["down"], code=CODE,
                         n=I, k=H, n_out=H, rms_norm=(ly["n2"], EPS),
                         lead_down=lead, prefetch=tuple(pf_down))
      x = (x.astype(jnp.float32) + d).astype(jnp.bfloat16)
    return x

  def loop(x, layers, trips):
    return jax.lax.fori_loop(0, trips, lambda _, x: step(x, layers), x)

  return jax.jit(loop)


def per_layer_us(loop, x0, layers, long=12, short=3, reps=5):
  """Samples of a layer's time: the difference of a jitted loop of `long`
  passes over the layers and one of `short`, divided by the layers between
  them (the call's fixed cost cancels)."""
  for trips in (long, short):
    loop(x0, layers, trips).block_until_ready()
  samples = []
  for _ in range(reps):
    t = {}
    for trips in (long, short):
      t0 = time.perf_counter()
      loop(x0, layers, trips).block_until_ready()
      t[trips] = time.perf_counter() - t0
    samples.append((t[long] - t[short]) / ((long - short) * LAYERS) * 1e6)
  return samples


def profile(loop, x0, layers, mode):
  """One layer's kernels from a trace of two passes, in launch order."""
  import glob, tempfile  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  out = tempfile.mkdtemp()
  jax.profiler.start_trace(out)
  loop(x0, layers, 2).block_until_ready()
  jax.profiler.stop_trace()
  f = sorted(glob.glob(f"{out}/**/*.xplane.pb", recursive=True))[-1]
  pd = jax.profiler.ProfileData.from_file(f)
  evs = []
  for plane in pd.planes:
    if plane.name.startswith("/device:GPU"):
      evs += [(ev.start_ns, ev.duration_ns, ev.name[:50])
              for line in plane.lines
              if "Kernel" in line.name or "tream" in line.name
              for ev in line.events]
  evs.sort()
  starts = [i for i, e in enumerate(evs) if "gemv_4bit_lut" in e[2]]
  # Four table GEMV launches a layer (q/k/v, o, gate/up, down): the
  # second pass's first layer.
  per = 5 if mode == "o_twice" else 4
  first = per * LAYERS
  a, b = (starts[first], starts[first + per]) if len(starts) > first + per else (
      0, min(len(evs), 40))
  print(f"  {mode}: one layer, {b - a} kernels")
  for start, dur, name in evs[a:b]:
    print(f"    {(start - evs[a][0]) / 1e3:8.2f} us  {dur / 1e3:7.2f} us  "
          f"{name}")


def main():
  modes = sys.argv[1:] or ["none", "o", "o_first", "chain128", "chain256",
                           "chain512", "none"]
  layers = make_layers()
  x0 = jax.random.normal(jax.random.key(99), (1, H), jnp.bfloat16) * 0.1
  path = os.path.join(os.environ.get("OUT", "."), "l2_prefetch_probe.jsonl")
  ref = None
  with open(path, "a") as out:
    for mode in modes:
      t0 = time.perf_counter()
      loop = chain(mode)
      y = loop(x0, layers, 1).block_until_ready()
      if ref is None:
        ref = np.asarray(y, np.float32)
      same = bool(np.array_equal(np.asarray(y, np.float32), ref))
      samples = per_layer_us(loop, x0, layers)
      compile_s = time.perf_counter() - t0
      rec = dict(mode=mode, us_a_layer=float(np.median(samples)),
                 samples=[round(s, 2) for s in samples],
                 wall_s=round(compile_s, 1), same_bits_as_first=same,
                 device=jax.devices()[0].device_kind)
      print(json.dumps(rec), flush=True)
      out.write(json.dumps(rec) + "\n")
      if os.environ.get("PROFILE"):
        profile(loop, x0, layers, mode)


if __name__ == "__main__":
  main()
