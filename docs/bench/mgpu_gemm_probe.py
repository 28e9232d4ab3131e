"""Can a Mosaic GPU (Pallas) GEMM reach XLA's bf16 dot at M = 256 and 4096?
(docs/benchmarks.md, thirteenth session; run on the GPU.)

    python docs/bench/mgpu_gemm_probe.py 240      # time budget, s

Issue 14's M = 256 and M = 4096 targets need the 4-bit decode inside a
tensor-core GEMM. Before writing one, this times JAX's own Hopper kernels
(imported from `jax.experimental.pallas.ops.gpu`, not copied) on the Llama
shapes, next to XLA's bf16 `x @ W.T` (cuBLAS):

* `hopper_matmul_mgpu.matmul`: bf16 x bf16, both operands by TMA,
  warp-specialized (one producer, two wgmma warpgroups);
* `hopper_mixed_type_matmul_mgpu.mixed_matmul_kernel`: int8 W `[n, k]` as
  the register operand (converted to bf16 in registers before each wgmma)
  times `x.T` `[k, m]` bf16 from shared memory, i.e. `(x @ W.T).T`: the
  shape a fused 4-bit kernel would have, with a conversion far cheaper than
  an NF4 decode.

If neither reaches XLA's bf16, a fused 4-bit kernel on the same skeleton
cannot either. Each result is checked against the jnp product; one JSON
line per case goes to $OUT/mgpu_gemm_probe.jsonl.
"""
import functools
import itertools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import median_us  # pylint: disable=g-import-not-at-top,wrong-import-position

from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.experimental.pallas.ops.gpu import hopper_mixed_type_matmul_mgpu as hmm  # pylint: disable=g-import-not-at-top,wrong-import-position

CASES = [((14336, 4096), 256), ((14336, 4096), 4096), ((4096, 4096), 256),
         ((4096, 14336), 256), ((4096, 14336), 4096)]
D = hm.MatmulDimension


def bf16_configs(m):
  out = []
  for tm, tn, wg, minor, width in itertools.product(
      (128, 64), (128, 256), (D.N, D.M), (D.N, D.M), (8, 16)):
    if m == 256 and width == 16:
      continue
    out.append(hm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=64,
                               max_concurrent_steps=4, wg_dimension=wg,
                               grid_minor_dim=minor, grid_tile_width=width))
  return out


def mixed_configs(m):
  out = []
  for tm, tn, tk, wg in itertools.product((64, 128), (128, 64), (64, 128),
                                          (D.N, D.M)):
    out.append(hmm.TuningConfig(tile_m=tm, tile_n=tn, tile_k=tk,
                                max_concurrent_steps=4, wg_dimension=wg,
                                grid_minor_dim=D.N, grid_tile_width=8))
  return out


def run(f, slots, ref):
  try:
    y = np.asarray(jax.jit(f)(*slots[0]), np.float32)
    err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    return median_us(f, slots), err
  except Exception as e:  # pylint: disable=broad-except
    return f"ERR {type(e).__name__}: {str(e)[:200]}", None


def main():
  budget = float(sys.argv[1]) if len(sys.argv) > 1 else 240.0
  t_end = time.time() + budget
  out = open(os.path.join(os.environ.get("OUT", "."),
                          "mgpu_gemm_probe.jsonl"), "a")
  for (n, k), m in CASES:
    if time.time() > t_end:
      break
    keys = jax.random.split(jax.random.key(n + k + m), 4)
    ws = [jax.random.normal(keys[i], (n, k), jnp.bfloat16) for i in range(3)]
    x = jax.random.normal(keys[3], (m, k), jnp.bfloat16)
    rec = {"n": n, "k": k, "m": m}
    rec["xla_bf16"] = median_us(lambda x, w: x @ w.T, [(x, w) for w in ws])
    ref = np.asarray(jnp.dot(x, ws[0].T, preferred_element_type=jnp.float32))
    wts = [w.T for w in ws]  # [k, n]: hopper_matmul's b
    res = []
    for cfg in bf16_configs(m):
      if time.time() > t_end:
        break
      f = functools.partial(lambda a, b, cfg: hm.matmul(a, b, None, cfg),
                            cfg=cfg)
      t, err = run(f, [(x, wt) for wt in wts], ref)
      res.append(["bf16", str(cfg), t, err])
    del wts
    w8 = [jnp.clip(jnp.round(w.astype(jnp.float32) * 40), -127, 127)
          .astype(jnp.int8) for w in ws]
    xt = x.T  # [k, m]
    ref8 = np.asarray(jnp.dot(w8[0].astype(jnp.bfloat16), xt,
                              preferred_element_type=jnp.float32))
    for cfg in mixed_configs(m):
      if time.time() > t_end:
        break
      f = functools.partial(
          lambda a, b, cfg: hmm.mixed_matmul_kernel(
              a, b, out_dtype=jnp.bfloat16, config=cfg), cfg=cfg)
      t, err = run(f, [(w, xt) for w in w8], ref8)
      res.append(["int8xbf16", str(cfg), t, err])
    rec["all"] = res
    out.write(json.dumps(rec) + "\n")
    out.flush()
    for kind in ("bf16", "int8xbf16"):
      ok = sorted((r for r in res if r[0] == kind and isinstance(r[2], float)),
                  key=lambda r: r[2])
      print(f"{n}x{k} M={m} xla {rec['xla_bf16']:.1f} {kind} best "
            f"{[(r[2], r[3], r[1][:160]) for r in ok[:2]]}", flush=True)
      bad = [r for r in res if r[0] == kind and not isinstance(r[2], float)]
      if bad:
        print(f"  {len(bad)} failed, e.g. {bad[0]}", flush=True)


if __name__ == "__main__":
  main()
