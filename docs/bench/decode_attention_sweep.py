"""Decode attention on the GPU: the Pallas kernel's configurations against
the model's einsum path (docs/benchmarks.md, "Decode attention in one
kernel").

    python docs/bench/decode_attention_sweep.py OUT.json [defaults]

Each case times 200 dependent calls inside one jitted `fori_loop` (the
cache carried and donated, the output fed back into the queries, so the
calls run one after another as a decode step's layers do), best of 5, per
call in microseconds. Shapes: Llama-3-8B's heads (32 query heads of 128
over 8 key/value heads), 1 and 8 rows, caches of 256, 2,048 and 8,192
slots. With `defaults` only the kernel's default configuration runs.
"""
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import decode_attention as da


def per_call_us(fn, q, kc, vc, n=200, reps=5):
  def loop(q, kc, vc):
    def body(i, c):
      q, kc, vc = c
      out, kc, vc = fn(q, kc, vc, i)
      return (q + out * jnp.bfloat16(1e-3), kc, vc)
    return jax.lax.fori_loop(0, n, body, (q, kc, vc))
  f = jax.jit(loop, donate_argnums=(1, 2))
  q, kc, vc = f(q, kc, vc)
  jax.block_until_ready(q)
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    q, kc, vc = f(q, kc, vc)
    jax.block_until_ready(q)
    best = min(best, time.perf_counter() - t)
  return 1e6 * best / n


def main(out, defaults):
  rows = []
  nq, nkv, d, layers = 32, 8, 128, 2
  for b, s in [(1, 256), (8, 256), (1, 2048), (8, 2048), (1, 8192)]:
    rng = np.random.default_rng(0)
    def f(*shape):
      return jnp.asarray(rng.standard_normal(shape).astype(np.float32)
                         ).astype(jnp.bfloat16)
    q, kn, vn, cos, sin = (f(b, nq, d), f(b, nkv, d), f(b, nkv, d), f(b, d),
                           f(b, d))
    mask = jnp.ones((b, s), bool)
    kw = dict(layer=1, scale=d ** -0.5)

    def ref(q, kc, vc, i):
      return da.reference(q, kn, vn, cos, sin, kc, vc, mask, i % s, **kw)
    caches = lambda: (f(layers, b, s, nkv, d), f(layers, b, s, nkv, d))  # noqa: E731
    rows.append(dict(b=b, s=s, impl="xla", us=per_call_us(ref, q, *caches())))
    print(rows[-1], flush=True)
    grid = ([(None, None, 4)] if defaults else
            itertools.product((64, 128, 256), (1, 2, 4, 8), (4, 8)))
    for block, split, warps in grid:
      if block and block > s:
        continue
      def ker(q, kc, vc, i, block=block, split=split, warps=warps):
        return da.decode_attention(q, kn, vn, cos, sin, kc, vc, mask, i % s,
                                   block_s=block, split=split,
                                   num_warps=warps, **kw)
      resolved = da._splits(b, nkv, s, block or (64 if s <= 512 else 128),  # pylint: disable=protected-access
                            split)
      rows.append(dict(b=b, s=s, impl="pallas", block_s=block, split=split,
                       warps=warps, resolved=resolved,
                       us=per_call_us(ker, q, *caches())))
      print(rows[-1], flush=True)
  with open(out, "w") as fh:
    json.dump(rows, fh, indent=1)


if __name__ == "__main__":
  main(sys.argv[1], "defaults" in sys.argv[2:])
