"""Launches the 4-bit wgmma GEMM once per config, and XLA's bf16 dot at
the same shapes, for Nsight Compute (docs/benchmarks.md; run on the GPU):

    ncu --clock-control none --set full \\
        -k regex:"jaxbnb_gemm_4bit|nvjet|xmma|cutlass|gemm" -o wgmma \\
        python docs/bench/gemm_wgmma_ncu.py [how many configs, default all]
            [g or h: the fifteenth session's lists, without the bf16 dots]

NF4 + DQ, bf16, random weights of the Llama shapes. Each config is
compiled and run once untimed (so ncu sees one launch of it), and its
result checked against `x @ dequantize(W).T` computed by numpy on the host
(so no other GEMM reaches the profiler). Then `x @ W.T` in bf16 runs once
per distinct (shape, M), for cuBLAS' (or XLA's) kernel beside ours.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks, ops
from pallas_kernels import gemm_4bit_wgmma as gw

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
# (n, k, m, tile_w, tile_x, tile_k, split, stages, variant): the defaults
# at M = 64, 128 and 256, then two "ks" configs.
CONFIGS = [(14336, 4096, 64, 64, 64, 128, 1, 4, "plain"),
           (14336, 4096, 128, 64, 128, 128, 1, 3, "ws"),
           (14336, 4096, 256, 64, 256, 64, 1, 4, "ws"),
           (14336, 4096, 64, 64, 64, 128, 1, 2, "ks"),
           (6144, 4096, 128, 64, 128, 64, 1, 3, "ks")]
# g: the M = 64 and 256 defaults with the weight tile swizzled and the
# table words from memory (the tag: "sw", "lt").
CONFIGS_G = [(14336, 4096, 64, 64, 64, 128, 1, 4, "plain", "swlt"),
             (14336, 4096, 64, 64, 64, 128, 1, 4, "plain", "lt"),
             (14336, 4096, 256, 64, 256, 64, 1, 4, "ws", "swlt")]
# h: the overlapped parts ("ov") at M = 64 and 256.
CONFIGS_H = [(14336, 4096, 64, 64, 64, 128, 1, 4, "plain", "ov"),
             (14336, 4096, 256, 64, 256, 128, 1, 2, "ws", "ov")]


def main():
  run_g = sys.argv[2:] in (["g"], ["h"])
  configs = ({"g": CONFIGS_G, "h": CONFIGS_H}[sys.argv[2]] if run_g
             else [c + ("",) for c in CONFIGS])
  count = int(sys.argv[1]) if len(sys.argv) > 1 else len(configs)
  dots = []
  for n, k, m, tw, tx, tk, split, stages, variant, tag in configs[:count]:
    kw, kx = jax.random.split(jax.random.key(n + m))
    w = jax.random.normal(kw, (n, k), jnp.bfloat16)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                 compress_statistics=True)
    absmax = ops.float_absmax(qs)
    f = jax.jit(lambda x, p, a, tw=tw, tx=tx, tk=tk, split=split,
                stages=stages, variant=variant, n=n, k=k, tag=tag: gw.gemm(
                    x, p, a, code=CODE, n=n, k=k, tile_w=tw, tile_x=tx,
                    tile_k=tk, split=split, stages=stages, variant=variant,
                    swizzle="sw" in tag, load_table="lt" in tag,
                    overlap="ov" in tag))
    y = np.asarray(f(x, packed.reshape(-1), absmax), np.float32)
    wd = np.asarray(F.dequantize_4bit(packed, qs).astype(jnp.float32))
    ref = np.asarray(x.astype(jnp.float32)) @ wd.T
    err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
    print(f"{n}x{k} M={m} {variant} ({tw}, {tx}, {tk}, {split}, {stages}) "
          f"{tag} max error / max |y| {err:.4f}", flush=True)
    if not run_g and (n, k, m) not in dots:
      dots.append((n, k, m))
      jax.block_until_ready(jax.jit(lambda x, w: x @ w.T)(x, w))
      print(f"{n}x{k} M={m} XLA bf16 dot", flush=True)


if __name__ == "__main__":
  main()
