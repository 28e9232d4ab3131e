"""What a per-program sum of the absmax would cost the 4-bit quantize
kernel: static SASS counts, no GPU (docs/benchmarks.md, twenty-first
session).

Double quantization needs the sum of all absmax before the nested step.
XLA makes it in two kernels (7-9 us at 2^28 values on the H200). The
4-bit kernel could instead store one partial sum per program, then a
small kernel would add those. This script builds that variant from the
package's kernel source (the partial as Triton's own `sum`, or as a
pairwise tree of halvings that a jnp reference could repeat bit for bit),
lowers each for an abstract H200 at 2^24 bf16 values, compiles the Triton
IR for sm_90 with the local Triton and counts instructions per thread
(`gemv_sass_mix.py count`; 16 values a thread, 16 warps, 2 stages):

    python docs/bench/quantize_partial_sass.py /tmp

Result (Triton 3.9, 2026-12-03; raw `quantize_partial_sass_2026-12-03.txt`):
the kernel without a partial sum runs 248 instructions a thread, with
Triton's sum 272 (+9.7%), with the pairwise tree 304 (+22.6%, 10
barriers). The kernel is bound by its instruction count (nineteenth and
twentieth sessions), so either would cost about 19 or 45 us at 2^28, more
than the sum it replaces.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

_PARTIAL_STORE = '''  if part_ref is not None:
    v = jnp.where(row_ok, absmax, 0.0)
    if TREE:
      while v.shape[0] > 1:
        v = jnp.sum(v.reshape(-1, 2), axis=1)
    else:
      v = jnp.sum(v, keepdims=True)
    pltriton.store(part_ref, v)
'''


def variant_source() -> str:
  """The package's quantize_4bit.py with an optional partial-sum output
  (module flags PARTIAL and TREE)."""
  s = open(os.path.join(ROOT, "pallas_kernels", "quantize_4bit.py")).read()
  edits = [
      ('**(dict(eviction_policy="evict_last") if evict else {}))\n',
       '**(dict(eviction_policy="evict_last") if evict else {}))\n'
       + _PARTIAL_STORE),
      ("  if bucket:\n    lo_ref, t_ref, packed_ref, absmax_ref = refs",
       "  part_ref = None\n  if PARTIAL:\n    *refs, part_ref = refs\n"
       "  if bucket:\n    lo_ref, t_ref, packed_ref, absmax_ref = refs"),
      ("  packed, absmax = pl.pallas_call(",
       "  extra_shape = ((_backend.out_struct((grid[0],), jnp.float32, x3),)"
       " if PARTIAL else ())\n"
       "  extra_spec = ((pl.BlockSpec((1,), lambda i: (i,)),) if PARTIAL"
       " else ())\n  packed, absmax, *_ = pl.pallas_call("),
      ("                 _backend.out_struct((nblocks,), jnp.float32, x3)),",
       "                 _backend.out_struct((nblocks,), jnp.float32, x3))"
       " + extra_shape,"),
      ("                 pl.BlockSpec((block_rows,), lambda i: (i,))),",
       "                 pl.BlockSpec((block_rows,), lambda i: (i,)))"
       " + extra_spec,"),
      ("__all__ =", "PARTIAL = False\nTREE = True\n__all__ ="),
  ]
  for old, new in edits:
    assert s.count(old) == 1, old
    s = s.replace(old, new)
  return s


def lower(out_dir, how):
  sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), out_dir, HERE]
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gemv_sass_mix import keep_ttir  # pylint: disable=import-outside-toplevel
  from helpers import lowered_for_h200  # pylint: disable=import-outside-toplevel
  from jaxbnb._src.quant import kernels  # pylint: disable=import-outside-toplevel
  import qk_partial_variant as qk  # pylint: disable=import-outside-toplevel
  qk.PARTIAL, qk.TREE = how != "none", how == "tree"
  keep_ttir(os.path.join(out_dir, f"quantize_{how}.ttir"))
  lowered_for_h200(lambda x: qk.quantize_4bit(
      x, blocksize=64, quant_type="nf4", thresholds=kernels.thresholds("nf4")),
                   jax.ShapeDtypeStruct((1 << 24,), jnp.bfloat16))


def main(out_dir):
  if len(sys.argv) > 2:  # a child: lower one variant
    lower(out_dir, sys.argv[2])
    return
  with open(os.path.join(out_dir, "qk_partial_variant.py"), "w") as f:
    f.write(variant_source())
  for how in ("none", "sum", "tree"):
    subprocess.run([sys.executable, __file__, out_dir, how], check=True)
    print(f"# partial sum: {how}", flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, "gemv_sass_mix.py"),
                    "count", os.path.join(out_dir, f"quantize_{how}.ttir"),
                    "32", "16", "2"], check=True)


if __name__ == "__main__":
  main(sys.argv[1])
