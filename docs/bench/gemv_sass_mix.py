"""Static SASS instruction mix of the default M = 1 4-bit GEMV, by pipe
(docs/benchmarks.md, tenth session). No GPU needed; two environments:

    # 1. jax 0.11.2 with the CUDA plugin: lower for an abstract H200, keep
    #    the Triton IR of the kernel
    python docs/bench/gemv_sass_mix.py lower /tmp/reduce_m1.ttir
    # 2. triton (3.9 here; XLA's own Triton may schedule a little
    #    differently): compile for sm_90, disassemble, count
    python docs/bench/gemv_sass_mix.py count /tmp/reduce_m1.ttir

A looping program (another M or config) is counted by its longest loop
body, one step (`count PATH BYTES_A_THREAD_A_STEP WARPS STAGES loop`):

    python docs/bench/gemv_sass_mix.py lower /tmp/m128.ttir 128
    python docs/bench/gemv_sass_mix.py count /tmp/m128.ttir 32 4 3 loop

The default M = 1 program is straight-line code (one step of 8 blocks of
32 rows, 8,192 bytes; 64 bytes a thread), so the static count per thread
is what each thread executes. Another M and config (a tuple, as
`gemv_4bit.default_config` returns it) and the bytes a thread, for
straight-line (unrolled) programs only:

    python docs/bench/gemv_sass_mix.py lower /tmp/warp.ttir 1 \
        "('warp', 64, 1, 16, 4, 1, 'prmt', 0)"
    python docs/bench/gemv_sass_mix.py count /tmp/warp.ttir 64 4
"""
import ast
import collections
import re
import subprocess
import sys

# Hopper issue pipes (CUDA programming guide throughput table, Nsight
# Compute's pipe names): the integer/logic pipe runs at half the FP32 rate.
_ALU = {"PRMT", "LOP3", "SHF", "LEA", "IADD3", "SGXT", "VIADD", "VIMNMX",
        "ISETP", "SEL", "FSEL", "IMNMX", "BMSK", "FLO", "POPC"}
_FMA = {"FFMA", "FADD", "FMUL", "IMAD", "HFMA2", "HMUL2", "HADD2"}
_MEM = {"LDG", "STG", "LDS", "STS", "LDC", "STSM", "LDSM", "SHFL", "BAR"}
_TENSOR = {"HMMA", "HGMMA"}


def keep_ttir(path):
  """From now on, each Pallas Triton kernel lowered writes its Triton IR to
  `path` (the last one stays)."""
  from jax._src.pallas.triton import lowering  # pylint: disable=import-outside-toplevel
  module = lowering.lower_jaxpr_to_triton_module

  def keep(*a, **kw):
    result = module(*a, **kw)
    with open(path, "w") as f:
      f.write(result.module.operation.get_asm(enable_debug_info=False))
    return result
  lowering.lower_jaxpr_to_triton_module = keep


def lower(path, m="1", config=None):
  sys.path[:0] = [".", "tests"]
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from helpers import lowered_for_h200  # pylint: disable=import-outside-toplevel
  from jaxbnb._src.quant import codebooks  # pylint: disable=import-outside-toplevel
  from pallas_kernels import gemv_4bit as gk  # pylint: disable=import-outside-toplevel
  keep_ttir(path)
  n, k, bs = 14336, 4096, 64
  m = int(m)
  cfg = (ast.literal_eval(config) if config
         else gk.default_config(m, n, k, bs, "bfloat16", mma=True))
  print("config", cfg)
  lut = jnp.asarray(codebooks.code_for("nf4"))
  code = tuple(float(c) for c in codebooks.code_for("nf4"))
  sd = jax.ShapeDtypeStruct
  nested = (sd((n * k // bs // 256,), jnp.float32), sd((256,), jnp.float32),
            sd((), jnp.float32))
  lowered_for_h200(
      lambda x, w, a, nq: gk.gemv_4bit(x, w, a, lut, n=n, k=k, blocksize=bs,
                                       nested=nq, config=cfg, code=code),
      sd((m, k), jnp.bfloat16), sd((n * k // 2,), jnp.uint8),
      sd((n * k // bs,), jnp.uint8), nested)


def count(path, per_thread="64", num_warps="4", num_stages="1",
          loop=""):
  import os  # pylint: disable=import-outside-toplevel
  import triton  # pylint: disable=import-outside-toplevel
  from triton.backends.compiler import GPUTarget  # pylint: disable=import-outside-toplevel
  text = open(path).read()
  # Pallas writes the eviction hint as an attribute this Triton spells
  # another way.
  text = re.sub(
      r"(tt\.load [^:]*?)evictionPolicy = evict_first(.*?) :",
      lambda m: (m.group(1).rstrip() + m.group(2) + " {cachePolicy = "
                 "#tt.cache_policy<cache_modifier = none, eviction_policy = "
                 "evict_first>} :"), text)
  fixed = path + ".fixed.ttir"
  with open(fixed, "w") as f:
    f.write(text)
  # `triton.compile` of a .ttir file starts after Triton's own TTIR passes;
  # XLA runs them (they fold `acc + dot(a, b, 0)` into `dot(a, b, acc)`,
  # for one), so they run here first.
  from triton._C.libtriton import ir, passes  # pylint: disable=import-outside-toplevel
  from triton.backends.nvidia.compiler import CUDABackend  # pylint: disable=import-outside-toplevel
  target = GPUTarget("cuda", 90, 32)
  ctx = ir.context()
  ir.load_dialects(ctx)
  CUDABackend(target).load_dialects(ctx)
  module = ir.parse_mlir_module(fixed, ctx)
  pm = ir.pass_manager(ctx)
  passes.common.add_inliner(pm)
  passes.common.add_canonicalizer(pm)
  passes.ttir.add_combine(pm)
  passes.ttir.add_reorder_broadcast(pm)
  passes.common.add_cse(pm)
  passes.common.add_symbol_dce(pm)
  pm.run(module, "make_ttir")
  with open(fixed, "w") as f:
    f.write(str(module))
  kernel = triton.compile(fixed, target=target,
                          options={"num_warps": int(num_warps),
                                   "num_stages": int(num_stages)})
  cubin = path + ".cubin"
  with open(cubin, "wb") as f:
    f.write(kernel.asm["cubin"])
  nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends",
                          "nvidia", "bin", "nvdisasm")
  sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True,
                        text=True, check=True).stdout
  if loop:  # the longest loop body: its label to the branch back to it
    lines, best = sass.splitlines(), []
    for i, line in enumerate(lines):
      back = re.search(r"BRA `\((\.L_x_\d+)\)", line)
      start = back and next((j for j in range(i)
                             if lines[j].startswith(back.group(1) + ":")),
                            None)
      if start is not None and i - start > len(best):
        best = lines[start:i + 1]
    sass = "\n".join(best)
  ops = collections.Counter(
      m.group(2) for m in re.finditer(
          r"/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass))
  total, per = sum(ops.values()), int(per_thread)
  print(f"instructions a thread: {total} ({per} bytes a thread: "
        f"{total / per:.1f} a byte)")
  for name, pipe in (("ALU", _ALU), ("FMA", _FMA), ("memory", _MEM),
                     ("tensor", _TENSOR)):
    c = sum(v for o, v in ops.items() if o in pipe)
    print(f"  {name:6s} {c:4d} ({c / per:.2f} a byte): " + ", ".join(
        f"{o} {v}" for o, v in ops.most_common() if o in pipe))
  rest = {o: v for o, v in ops.items()
          if o not in _ALU | _FMA | _MEM | _TENSOR}
  print("  other  ", sum(rest.values()), rest)


if __name__ == "__main__":
  {"lower": lower, "count": count}[sys.argv[1]](*sys.argv[2:])
