"""The "lut" GEMV variant (`pallas_kernels.gemv_4bit_lut`, Mosaic GPU, M = 1).

Called as users' code reaches it: through `gemv_4bit` with a "lut" config.
On the CPU the jnp twin runs (the wrapper's reshapes, row padding, chunk
sums and bias against the documented weight), the PTX is checked by its
structure and, where Triton's `ptxas` is installed, assembled for sm_90a;
the kernel itself runs under `pytest -m gpu`.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from pallas_kernels import gemv_4bit as gk
from pallas_kernels import gemv_4bit_lut as lg
from pallas_kernels.split_sum import sum_splits
from tests import helpers
from tests.kernels import _ptx
from tests.kernels import _util
from tests.kernels.gemv_4bit_test import _call_with_config, _code


def _check(y, x, packed, qs, bias):
  """Against the weight the kernel multiplies: the fp32 codes times the
  fp32 absmax (no rounding to the compute dtype), summed in fp32."""
  w = _util.kernel_weight(packed, qs, jnp.float32)
  exact, bound = helpers.matmul_bound(x, w, x.dtype, bias=bias)
  helpers.assert_within(y, exact, bound, f"lut gemv {x.dtype}")


def _config(rows, stages=4, step_rows=64, wgs=1):
  return ("lut", step_rows, 128, rows, 4 * wgs, stages)


def _weights(n, k, quant_type, dtype, seed):
  w = jnp.asarray(_util.rng_array((n, k), seed, dtype))
  return F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                         compress_statistics=True)


def _run(x, packed, qs, n, k, config, quant_type, bias=None, interpret=True):
  return gk.gemv_4bit(x, packed.reshape(-1), qs.absmax,
                      jnp.asarray(codebooks.code_for(quant_type)), n=n, k=k,
                      blocksize=64,
                      nested=(qs.nested_absmax, qs.nested_code, qs.offset),
                      bias=bias, config=config, code=_code(quant_type),
                      interpret=interpret)


@pytest.mark.parametrize("n,k,config,dtype,quant_type", [
    (1000, 4096, _config(3), jnp.bfloat16, "nf4"),  # partial tile, padding
    (64, 1024, _config(1, 1), jnp.float16, "fp4"),
    (200, 2048, _config(2, 2), jnp.bfloat16, "fp4"),
    (130, 3072, _config(8), jnp.float16, "nf4"),    # more groups than tiles
    (300, 2048, _config(2, 2, 128), jnp.bfloat16, "nf4"),
    (500, 1024, _config(2, 3, 64, 2), jnp.float16, "nf4"),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_interpret_matches_dequant_matmul(n, k, config, dtype, quant_type,
                                          with_bias):
  packed, qs = _weights(n, k, quant_type, dtype, n + k)
  x = jnp.asarray(_util.rng_array((1, k), 7, dtype))
  bias = jnp.asarray(_util.rng_array((n,), 3, dtype)) if with_bias else None
  y = _run(x, packed, qs, n, k, config, quant_type, bias)
  assert y.shape == (1, n) and y.dtype == dtype
  _check(y, x, packed, qs, bias)


def test_twin_tables_are_the_products():
  """The table entry of byte b at position p is code[b >> 4] * x[2p] +
  code[b & 15] * x[2p + 1]: a weight of one byte value in one column pair
  and zeros elsewhere gives that entry times the absmax."""
  n, k = 64, 1024
  code = _code("nf4")
  x = jnp.zeros((1, k), jnp.bfloat16).at[0, 10].set(3.0).at[0, 11].set(-0.5)
  packed = jnp.full((n * k // 2,), 0x77, jnp.uint8)  # code 7 = 0.0
  packed = packed.reshape(n, k // 2).at[:, 5].set(0xE3).reshape(-1)
  codes = jnp.zeros((n * k // 64,), jnp.uint8)
  y = lg.gemv(x, packed, codes, jnp.full((1,), 2.0, jnp.float32),
              jnp.ones((256,), jnp.float32), 0.5, code=code, n=n, k=k,
              interpret=True)
  entry = np.float32(code[0xE]) * np.float32(3.0) + np.float32(
      code[0x3]) * np.float32(-0.5)
  np.testing.assert_array_equal(np.asarray(y), np.full((1, n), entry * 2.5,
                                                       np.float32))


@pytest.mark.parametrize("m,n,k,nested,blocksize,dtype,config,match", [
    (2, 64, 1024, True, 64, jnp.bfloat16, _config(1),
     "x: the table GEMV takes 1 row, got 2"),
    (1, 64, 1024, False, 64, jnp.bfloat16, _config(1),
     "absmax: the table GEMV needs double-quantized weights"),
    (1, 64, 1024, True, 128, jnp.bfloat16, _config(1),
     "blocksize: the table GEMV needs 64, got 128"),
    (1, 64, 1024, True, 64, jnp.float32, _config(1),
     "x: the table GEMV needs bfloat16 or float16, got float32"),
    (1, 64, 1600, True, 64, jnp.bfloat16, _config(1),
     "k: the table GEMV needs a multiple of 256 .*got 1600"),
    (1, 64, 1024, True, 64, jnp.bfloat16, ("lut", 32, 128, 1, 4, 2),
     "runs 64 or 128 rows a step, 128 bytes a row and 4 or 8 warps, got "
     "block_n 32"),
    (1, 28672, 4096, True, 64, jnp.bfloat16, _config(1, 8, 128),
     "rows/stages: 1 row groups of 28672 rows with 8 stages of 1 x 128 "
     "rows need 310272 bytes of shared memory, more than 232448"),
    (1, 64, 1024, True, 64, jnp.bfloat16, ("lut", 64, 128, 1, 12, 2),
     "4 or 8 warps, got block_n 64, 128 bytes and 12 warps"),
    (1, 64, 1024, True, 64, jnp.bfloat16, _config(0),
     r"rows: one count >= 1 per weight \(1\), got 0"),
    (1, 64, 1024, True, 64, jnp.bfloat16, _config(1, 0),
     "stages: must be >= 1, got 0"),
])
def test_errors_name_the_argument(m, n, k, nested, blocksize, dtype, config,
                                  match):
  with pytest.raises(ValueError, match=match):
    _call_with_config(m, n, k, nested, blocksize, dtype, config)


def test_code_is_required():
  with pytest.raises(ValueError, match="code: variant 'lut'"):
    _call_with_config(1, 64, 1024, True, 64, jnp.bfloat16, _config(1),
                      code=None)


def test_default_rows_fill_one_wave():
  """One program an SM: K chunks x row groups <= 132, no group without a
  64-row tile."""
  assert lg.default_rows(14336, 4096) == 8     # 16 chunks x 8
  assert lg.default_rows(4096, 14336) == 2     # 56 chunks x 2
  assert lg.default_rows(1024, 4096) == 8
  assert lg.default_rows(100, 4096) == 2       # two tiles
  assert lg.default_rows(4096, 65536) == 1     # 256 chunks: more than a wave


def test_default_rows_follow_the_gpus_sms(monkeypatch):
  """The default grids size one wave by the device's SMs
  (`_backend.num_sms`: `core_count` of a GPU, 132 without one): an H100
  PCIe's 114 SMs take 7 row groups of 14336x4096's 16 K chunks, 112
  programs, where 132 take 8."""
  from pallas_kernels import _backend  # pylint: disable=g-import-not-at-top

  class Gpu:
    platform, core_count = "gpu", 114

  _backend.num_sms.cache_clear()
  try:
    assert _backend.num_sms() == (
        _backend.SMS_DEFAULT if not _util.on_gpu()
        else jax.devices()[0].core_count)
    _backend.num_sms.cache_clear()
    monkeypatch.setattr(jax, "devices", lambda *a: [Gpu()])
    assert _backend.num_sms() == 114
    assert lg.default_rows(14336, 4096) == 7
    assert lg.default_rows(14336, 4096, num_sms=132) == 8
  finally:
    monkeypatch.undo()
    _backend.num_sms.cache_clear()
  assert _backend.num_sms() >= 1


def test_docstring_example_runs():
  helpers.assert_docstring_examples_pass(lg.gemv, "gemv")


def test_build_ptx_structure():
  """Every thread stores its column's 256 entries (product and sum rounded
  once each) and a quarter of the nested table, then one barrier."""
  text = lg.build_ptx(_code("nf4"), "bfloat16", 1000, 4096, 384, 256, 63)
  # The table, the nested codes 128-255 and the offset.
  assert text.count("st.shared.f32 [a+") == 256 + 2
  assert text.count("@pw st.shared.f32 [a+") == 256  # compute threads only
  assert "@pw st.shared.u32 [a], 0;" in text   # the step counter
  # The span: 256 words, two a thread, clamped to the last nested value.
  assert text.count("st.shared.f32 [b+") == 2
  assert text.count("min.u32 q, q, 62;") == 2
  # Every global load before the first shared store: their latencies pass
  # together, while the table is made.
  assert text.rindex("ld.global") < text.index("st.shared")
  assert "bra" not in text and "LUT_BUILT" not in text
  assert "min.u32 a, a, 999;" in text          # the first row, clamped
  assert text.count("mul.rn.f32") == 32 and text.count("add.rn.f32") == 256
  assert text.count("bar.sync 0;") == 1
  assert "shl.b32 a, w, 16;" in text         # bf16 x to fp32
  assert "cvt.f32.f16" in lg.build_ptx(_code("fp4"), "float16", 64, 1024, 64,
                                      128, 1)
  # Two compute warpgroups: 128 byte values a thread, the high nibble's
  # codes chosen by the warpgroup.
  two = lg.build_ptx(_code("nf4"), "bfloat16", 1000, 4096, 384, 256, 63, 2)
  assert two.count("@pw st.shared.f32 [a+") == 128
  assert two.count("selp.f32 cc") == 8
  assert "setp.lt.u32 pw, t, 256;" in two
  # The code values are exact fp32 immediates.
  imm = re.findall(r"mul\.rn\.f32 h(\d+), x0, 0f([0-9A-F]{8});", text)
  assert len(imm) == 16
  for c, bits in imm:
    assert np.uint32(int(bits, 16)).view(np.float32) == np.float32(
        _code("nf4")[int(c)])


@pytest.mark.parametrize("step_rows,shuffles", [(64, 14 + 2), (128, 28 + 3)])
def test_step_ptx_structure(step_rows, shuffles):
  """16 or 32 rows a warp: a word load a row, four table lookups (a permute
  and an address each), the 8-lane reduce-scatter, the fp32 absmax (rounded
  apart) of 2 or 4 rows from the shared span, the shuffles over the four
  blocks and one store."""
  wr = step_rows // 4
  text = lg.step_ptx(1000, 4096, 3, 1152, step_rows)
  assert text.count("ld.shared.u32 w") == wr
  assert text.count("prmt.b32 b, w") == 4 * wr
  assert text.count("ld.shared.f32 t") == 4 * wr
  assert text.count("shfl.sync.bfly") == shuffles
  assert text.count("ld.shared.f32 nv") == wr // 8
  assert "ld.global" not in text
  assert "min.u32 a, a, 999;" in text
  assert text.count("mul.rn.f32 cv") == wr // 8
  assert text.count("add.rn.f32 cv") == wr // 8
  assert text.count("@p st.global.f32") == 1
  assert "mad.lo.u32 a, s, 1152, a;" in text  # chunk s's partial row
  assert f"mad.lo.u32 r0, a, {step_rows}, ro;" in text
  assert f"mad.lo.u32 r0, a, {2 * step_rows}, ro;" in lg.step_ptx(
      1000, 4096, 3, 1152, step_rows, 2)


def _ptxas():
  try:
    import triton  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                      "bin", "ptxas")
  return path if os.path.exists(path) else shutil.which("ptxas")


def _entry(asm, kinds):
  """`asm` inside a kernel whose registers stand for its operands."""
  regs = {"r": "b32", "l": "b64", "f": "f32", "=f": "f32"}
  decl = [f".reg .{regs[t]} op{i};" for i, t in enumerate(kinds)]
  init = [f"mov.u32 op{i}, %clock;" if t == "r" else
          f"mov.u64 op{i}, %clock64;" if t == "l" else
          f"mov.b32 op{i}, %clock;" for i, t in enumerate(kinds)
          if t != "=f"]
  ptr = next(i for i, t in enumerate(kinds) if t == "l")
  sink = [f"st.global.f32 [op{ptr}], op{i};" for i, t in enumerate(kinds)
          if t == "=f"]
  body = re.sub(r"\$(\d+)", lambda mt: f"op{mt.group(1)}", asm)
  return "\n".join([".version 8.4", ".target sm_90a", ".address_size 64",
                    ".visible .entry k() {"] + decl + init + [body] + sink
                   + ["ret;", "}"])


def _assert_assembles(ptxas, src, stem):
  """`src` (from `_entry`) assembles with `ptxas -arch=sm_90a`."""
  stem.with_suffix(".ptx").write_text(src)
  out = subprocess.run([ptxas, "-arch=sm_90a", str(stem.with_suffix(".ptx")),
                        "-o", str(stem.with_suffix(".cubin"))],
                       capture_output=True, text=True, check=False)
  assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("which", ["build", "build_skip", "step", "step128",
                                   "swiglu_bf16", "swiglu_f16", "norm_bf16",
                                   "norm_f16_one_warpgroup",
                                   "build_skip_loads_first",
                                   "swiglu_bf16_loads_first",
                                   "norm_bf16_loads_first",
                                   "build_skip_loads_fence",
                                   "norm_bf16_loads_fence"])
def test_ptx_assembles_for_sm90a(tmp_path, which):
  """The blocks assemble with `ptxas -arch=sm_90a` (Triton's copy; the
  test skips where Triton is not installed)."""
  ptxas = _ptxas()
  if ptxas is None:
    pytest.skip("no ptxas: Triton is not installed")
  fence = which.endswith("loads_fence")
  first = which.endswith("loads_first") or fence
  if which.startswith("norm"):  # 8B's q/k/v after its input norm
    wgs = 1 if which.endswith("warpgroup") else 2
    src = _entry(lg.build_ptx(
        _code("nf4"), "bfloat16" if "bf16" in which else "float16",
        4096, 4096, 1024, 512, 896, wgs, wgs == 2, 0, wgs == 2, None,
        lg.NormInput(1e-5), first, fence), ["r"] * 4 + ["l"] * 5)
  elif which.startswith("swiglu"):  # 8B's down after its gate/up
    src = _entry(lg.build_ptx(
        _code("nf4"), "bfloat16" if "bf16" in which else "float16",
        4096, 14336, 2048, 512, 896, 2, True, 0, True,
        lg.SwigluInput(16, 28672, 14336), loads_first=first),
                 ["r"] * 4 + ["l"] * 4)
  elif which.startswith("build"):
    skip = which.startswith("build_skip")
    src = _entry(lg.build_ptx(_code("nf4"), "float16", 14336, 4096, 1792, 512,
                              896, 2, skip, 0, skip, loads_first=first,
                              loads_fence=fence),
                 ["r"] * 4 + ["l"] * 4)
  else:
    src = _entry(lg.step_ptx(14336, 4096, 28 // (1 + (which == "step128")),
                             14336, 128 if which == "step128" else 64),
                 ["r"] * 6 + ["l"])
  _assert_assembles(ptxas, src, tmp_path / which)


def test_lowers_for_cuda():
  """The kernel lowers to a Mosaic GPU module (needs JAX's CUDA plugin)."""
  assert "mosaic_gpu" in _util.lowered_gemv_4bit(_config(3), 1)


def _abstract_weight(rows, cols):
  """A double-quantized NF4 weight's kernel arguments, as shapes: packed
  codes, uint8 absmax, nested absmax, nested code, offset."""
  s = jax.ShapeDtypeStruct
  return (s((rows * cols // 2,), jnp.uint8), s((rows * cols // 64,), jnp.uint8),
          s((-(-rows * cols // 64 // 256),), jnp.float32),
          s((256,), jnp.float32), s((), jnp.float32))


def _lowered_or_skip(fn, *args):
  """`fn` lowered for the H200, or a skip where this JAX has no Mosaic GPU
  lowering (no CUDA plugin)."""
  try:
    return helpers.lowered_for_h200(fn, *args)
  except AssertionError as e:  # no Mosaic GPU lowering rule registered
    pytest.skip(f"this JAX has no Mosaic GPU lowering (CUDA plugin): {e!r}")


@pytest.mark.parametrize("norm", [False, True])
def test_sass_fence_comes_before_the_tables_stores(tmp_path, norm):
  """With `loads_fence`, the assembled build (Triton's ptxas, read back
  with its nvdisasm; the test skips without them) has its memory barrier
  before every shared store of the table: ptxas cannot schedule them
  ahead of the loads, in the plain build and in the RMSNorm one alike."""
  ptxas = _ptxas()
  nvdisasm = ptxas and os.path.join(os.path.dirname(ptxas), "nvdisasm")
  if ptxas is None or not os.path.exists(nvdisasm):
    pytest.skip("no ptxas / nvdisasm: Triton is not installed")
  args = ((None, lg.NormInput(1e-5)) if norm else (None, None))
  text = lg.build_ptx(_code("nf4"), "bfloat16", 4096, 4096, 1024, 512, 896,
                      2, True, 0, True, *args, loads_first=True,
                      loads_fence=True)
  src = _entry(text, ["r"] * 4 + ["l"] * (5 if norm else 4))
  _assert_assembles(ptxas, src, tmp_path / "build")
  sass = subprocess.run([nvdisasm, "-c", str(tmp_path / "build.cubin")],
                        capture_output=True, text=True, check=True).stdout
  ops = [re.sub(r"^@!?U?P\w+\s+", "", line.split("*/", 1)[1].strip())
         for line in sass.splitlines()
         if re.search(r"/\*[0-9a-f]{4}\*/", line)]  # predicates dropped
  fence = next(i for i, op in enumerate(ops) if op.startswith("MEMBAR"))
  stores = [i for i, op in enumerate(ops) if op.split()[0] == "STS"]
  loads = [i for i, op in enumerate(ops) if "LDG" in op]
  # the norm's per-warp sum is the one shared store before the table
  assert sum(i < fence for i in stores) == (1 if norm else 0)
  assert len(stores) > 128 and max(loads) < fence


@pytest.mark.parametrize("skip,alloc_first,loads_first,fence", [
    (False, False, False, False), (True, False, False, False),
    (True, True, False, False), (False, True, False, False),
    (True, True, True, False), (True, True, True, True)])
def test_group_lowers_for_cuda(skip, alloc_first, loads_first, fence,
                               monkeypatch):
  """Three weights in one kernel lower (one build and pipeline a weight
  under `pl.when`), also with the memory warpgroup skipping the builds,
  with the pipelines' buffers allocated before the builds
  (`ALLOC_FIRST`), and with the builds' loads back before their tables
  (`LOADS_FIRST`, in the PTX; by a fence with `LOADS_FENCE`)."""
  monkeypatch.setattr(lg, "ALLOC_FIRST", alloc_first)
  monkeypatch.setattr(lg, "LOADS_FIRST", loads_first)
  monkeypatch.setattr(lg, "LOADS_FENCE", fence)
  k, ns = 2048, (1000, 4096, 300)
  fn = functools.partial(lg.gemv_group, code=_code("nf4"), ns=ns, k=k,
                         wgs=2, early=True, tma_skips_build=skip)
  text = _lowered_or_skip(lambda x, w: fn(x, w),
                          jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
                          [_abstract_weight(n, k) for n in ns])
  assert "mosaic_gpu" in text
  assert ("LUT_LOADED" in text) == (loads_first and not fence)
  assert text.count("fence.acq_rel.cta") == (3 if fence else 0)


@pytest.mark.parametrize("loads_first", [None, False])
def test_default_takes_the_loads_back_first_in_plain_builds(loads_first,
                                                            monkeypatch):
  """By default (`LOADS_FIRST`) a build of x as given takes its global
  loads back before it stores the table: the branch past the never-taken
  store is in the default config's module, one a weight, and not with
  the flag off."""
  if loads_first is not None:
    monkeypatch.setattr(lg, "LOADS_FIRST", loads_first)
  k, ns = 4096, (4096, 1024, 1024)
  cfg = lg.group_config(ns, k)
  fn = functools.partial(lg.gemv_group, code=_code("nf4"), ns=ns, k=k, **cfg)
  text = _lowered_or_skip(lambda x, w: fn(x, w),
                          jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
                          [_abstract_weight(n, k) for n in ns])
  assert text.count("LUT_LOADED:") == (3 if loads_first is None else 0)


def test_default_allocates_the_pipeline_before_the_build(monkeypatch):
  """By default (`ALLOC_FIRST`) the default config's kernel lowers with the
  pipeline's buffers and barriers allocated before the table build, so
  the TMA warpgroup's first copies need not wait for it: the module
  equals the one lowered with the flag on and differs from the one with
  it off."""
  k, ns = 4096, (4096,)
  cfg = lg.group_config(ns, k)
  fn = functools.partial(lg.gemv_group, code=_code("nf4"), ns=ns, k=k, **cfg)
  args = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
          [_abstract_weight(n, k) for n in ns])
  default = _lowered_or_skip(lambda x, w: fn(x, w), *args)
  texts = {}
  for on in (True, False):
    monkeypatch.setattr(lg, "ALLOC_FIRST", on)
    texts[on] = _lowered_or_skip(lambda x, w: fn(x, w), *args)
  assert cfg["wgs"] == 2
  assert default == texts[True] != texts[False]


@pytest.mark.parametrize("alloc_first", [None, True, False])
def test_built_then_pipelined_allocates_before_the_build(alloc_first,
                                                         monkeypatch):
  """`built_then_pipelined`: the build, then the pipeline; allocated first
  (`ALLOC_FIRST` unless told), the pipeline's allocations come from a
  scope of the "wg" threads entered before the build and are handed to
  it; otherwise it allocates its own (`allocations=None`)."""
  events = []

  class Pipe:
    def get_allocations(self, *gmem):
      events.append(("allocate", gmem))
      return {"buffers": "smem"}

    def __call__(self, *gmem, allocations):
      events.append(("pipeline", gmem, allocations))

  def run_scoped(fn, collective_axes, **allocations):
    events.append(("scope", collective_axes))
    fn(**allocations)
  monkeypatch.setattr(lg.pl, "run_scoped", run_scoped)
  lg.built_then_pipelined(lambda: events.append(("build",)), Pipe(), "w", "c",
                          alloc_first=alloc_first)
  first = lg.ALLOC_FIRST if alloc_first is None else alloc_first
  if first:
    assert events == [("allocate", ("w", "c")), ("scope", "wg"), ("build",),
                      ("pipeline", ("w", "c"), {"buffers": "smem"})]
  else:
    assert events == [("build",), ("pipeline", ("w", "c"), None)]


def _swiglu_weights(n, k, n_out, dtype, seed):
  ws = [_weights(n, k, "nf4", dtype, seed), _weights(n, k, "nf4", dtype,
                                                     seed + 1),
        _weights(n_out, n, "nf4", dtype, seed + 2)]
  args = [(p.reshape(-1), q.absmax, q.nested_absmax, q.nested_code,
           q.offset) for p, q in ws]
  return ws, args


def _swiglu_check(y, x, ws, dtype):
  """`y` against down(silu(gate) * up) with every matmul in float64 on
  the documented weights: gate and up rounded to `dtype` and the product
  formed as the model does, then down's bound."""
  (gp, gq), (up_, uq), (dp, dq) = ws
  g, u = (jnp.asarray(helpers.matmul_bound(x, _util.kernel_weight(
      p, q, jnp.float32), x.dtype)[0], jnp.float32).astype(dtype)
          for p, q in ((gp, gq), (up_, uq)))
  h = jax.nn.silu(g) * u
  w = _util.kernel_weight(dp, dq, jnp.float32)
  exact, bound = helpers.matmul_bound(h, w, dtype)
  # The kernel's fp32 gate and up may round to the neighbour of the exact
  # ones' 16-bit values, and silu's roundings follow: up to 4 units in
  # the last place of each element of h.
  ulp = 2.0 ** (-8 if dtype == jnp.bfloat16 else -11)
  mag = np.abs(np.asarray(h, np.float64)) @ np.abs(np.asarray(w,
                                                               np.float64)).T
  helpers.assert_within(y, exact, bound + 4 * ulp * mag, f"swiglu {dtype}")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_swiglu_interpret_is_the_composition(dtype):
  """`gemv_swiglu(interpret=True)` is, bit for bit, the unfused path:
  gate and up by `gemv_group`, rounded, `jax.nn.silu(gate) * up`, then
  `gemv`; and within the bound of float64 products."""
  n, k, n_out = 1024, 2048, 192
  ws, args = _swiglu_weights(n, k, n_out, dtype, 90)
  x = jnp.asarray(_util.rng_array((1, k), 21, dtype))
  code = _code("nf4")
  y = lg.gemv_swiglu(x, *args, code=code, n=n, k=k, n_out=n_out,
                     interpret=True)
  assert y.shape == (1, n_out) and y.dtype == jnp.float32
  g, u = lg.gemv_group(x, args[:2], code=code, ns=(n, n), k=k,
                       interpret=True)
  h = jax.nn.silu(g.astype(dtype)) * u.astype(dtype)
  want = lg.gemv(h, *args[2], code=code, n=n_out, k=n, interpret=True)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  _swiglu_check(y, x, ws, dtype)


@pytest.mark.parametrize("kernel", [True, False])
def test_swiglu_residual_is_the_add(monkeypatch, kernel):
  """With `residual`, `gemv_swiglu` gives `residual + y` (y rounded to
  x's dtype first) bit for bit, whether `split_sum.add_splits` sums
  down's partials with it (`RESIDUAL_KERNEL`) or XLA adds; a residual
  of another shape or dtype is named."""
  monkeypatch.setattr(lg, "RESIDUAL_KERNEL", kernel)
  calls = []
  real = lg.split_sum.add_splits
  monkeypatch.setattr(lg.split_sum, "add_splits", lambda *a, **kw: (
      calls.append(a[0].shape) or real(*a, **kw)))
  n, k, n_out = 1024, 1024, 192
  _, args = _swiglu_weights(n, k, n_out, jnp.bfloat16, 91)
  x = jnp.asarray(_util.rng_array((1, k), 22, jnp.bfloat16))
  residual = jnp.asarray(_util.rng_array((1, n_out), 23, jnp.bfloat16))
  kw = dict(code=_code("nf4"), n=n, k=k, n_out=n_out, interpret=True)
  got = lg.gemv_swiglu(x, *args, **kw, residual=residual)
  y = lg.gemv_swiglu(x, *args, **kw)
  assert got.dtype == jnp.bfloat16 and got.shape == (1, n_out)
  helpers.assert_bits_equal(np.asarray(got),
                            np.asarray(residual + y.astype(jnp.bfloat16)))
  assert calls == ([(n // 256, n_out)] if kernel else []), calls
  with pytest.raises(ValueError, match=r"residual: needs bfloat16 \(1, "
                     r"192\), got float32 \(1, 192\)"):
    lg.gemv_swiglu(x, *args, **kw, residual=residual.astype(jnp.float32))


@pytest.mark.parametrize("what,match", [
    ("x", "x: the table GEMV takes 1 row, got 2"),
    ("n", "k: the table GEMV needs a multiple of 256 .*got 1600"),
    ("down", "down: needs \\(packed, codes, nested_absmax, nested_code, "
             "offset\\), got 4 entries"),
    ("code", "code: needs 16 values, got 15"),
])
def test_swiglu_errors_name_the_argument(what, match):
  n, k, n_out = 1024, 1024, 64
  _, args = _swiglu_weights(n, k, n_out, jnp.bfloat16, 3)
  kw = dict(code=_code("nf4"), n=n, k=k, n_out=n_out, interpret=True)
  x = jnp.ones((2 if what == "x" else 1, k), jnp.bfloat16)
  if what == "n":
    kw["n"] = 1600
  if what == "down":
    args[2] = args[2][:4]
  if what == "code":
    kw["code"] = kw["code"][:15]
  with pytest.raises(ValueError, match=match):
    lg.gemv_swiglu(x, *args, **kw)


def test_norm_group_lowers_for_cuda():
  """A group with its x RMSNorm'd in the build lowers to Mosaic GPU (the
  norm's weight an input after x)."""
  s = jax.ShapeDtypeStruct
  k, ns = 2048, (2048, 1024)
  fn = functools.partial(lg.gemv_group, code=_code("nf4"), ns=ns, k=k,
                         wgs=2, early=True, tma_skips_build=True)
  text = _lowered_or_skip(lambda x, w, nw: fn(x, w, rms_norm=(nw, 1e-5)),
                          s((1, k), jnp.bfloat16),
                          [_abstract_weight(n, k) for n in ns],
                          s((k,), jnp.bfloat16))
  assert "mosaic_gpu" in text
  # `LOADS_FIRST` leaves the builds that RMSNorm x alone (measured slower)
  assert lg.LOADS_FIRST and "LUT_LOADED" not in text


def test_swiglu_lowers_for_cuda():
  """Both launches lower to Mosaic GPU (needs JAX's CUDA plugin). By
  default (`LOADS_FIRST`) gate's and up's builds, of x as given, take
  their loads back before their tables; down's, which makes its x from
  their partials, does not (measured slower in the decode)."""
  n, k, n_out = 2048, 1024, 1024
  fn = functools.partial(lg.gemv_swiglu, code=_code("nf4"), n=n, k=k,
                         n_out=n_out)
  text = _lowered_or_skip(fn, jax.ShapeDtypeStruct((1, k), jnp.bfloat16),
                          _abstract_weight(n, k), _abstract_weight(n, k),
                          _abstract_weight(n_out, n))
  assert text.count("mosaic_gpu") >= 2
  assert text.count("LUT_BUILT:") == 3  # gate, up; down
  assert text.count("LUT_LOADED:") == 2  # gate and up only


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,n_out,dtype", [
    (14336, 4096, 4096, jnp.bfloat16),   # Llama-3-8B's MLP
    (8192, 2048, 2048, jnp.bfloat16),    # Llama-3.2-1B's
    (2048, 1024, 1000, jnp.float16),     # a partial tile of down
    (11008, 4096, 4096, jnp.bfloat16),   # Llama-2-7B's: down's k 11008
    (18944, 3584, 3584, jnp.bfloat16),   # Qwen2.5-7B's
])
def test_gpu_swiglu(n, k, n_out, dtype):
  """Compiled: the down partials made from gate/up's raw partials against
  the unfused twins and the float64 products."""
  ws, args = _swiglu_weights(n, k, n_out, dtype, 50)
  x = jnp.asarray(_util.rng_array((1, k), 23, dtype))
  kw = dict(code=_code("nf4"), n=n, k=k, n_out=n_out)
  y = jax.jit(functools.partial(lg.gemv_swiglu, **kw))(x, *args)
  twin = lg.gemv_swiglu(x, *args, **kw, interpret=True)
  _swiglu_check(y, x, ws, dtype)
  np.testing.assert_allclose(np.asarray(y), np.asarray(twin), rtol=2e-2,
                             atol=2e-2 * float(jnp.max(jnp.abs(twin))))
  # with a residual (`split_sum.add_splits` where n_out takes it): the
  # residual plus y rounded, bit for bit
  residual = jnp.asarray(_util.rng_array((1, n_out), 24, dtype))
  got = jax.jit(functools.partial(lg.gemv_swiglu, **kw))(
      x, *args, residual=residual)
  helpers.assert_bits_equal(np.asarray(got),
                            np.asarray(residual + y.astype(dtype)))


@pytest.mark.gpu
@pytest.mark.parametrize("ns,k,dtype", [
    ((4096, 1024, 1024), 4096, jnp.bfloat16),   # Llama-3-8B's q/k/v
    ((14336, 14336), 4096, jnp.bfloat16),       # its gate/up
    ((8192, 1024, 1024), 8192, jnp.bfloat16),   # 70B's q/k/v
    ((3072, 1024, 1024), 3072, jnp.float16),    # 3.2-3B's, fp16
    ((18944, 18944), 3584, jnp.bfloat16),       # Qwen2.5-7B's gate/up
])
def test_gpu_norm_group(ns, k, dtype):
  """Compiled with the RMSNorm made in the builds (`NormInput`): each
  weight against the twin (which normalizes by `rms_norm.reference`) and
  against float64 products of the reference's x, with room for a unit in
  the last place of a few of its values (the kernel's sum of squares
  runs in another order, its rsqrt is approximate)."""
  from pallas_kernels import rms_norm  # pylint: disable=g-import-not-at-top
  code = _code("nf4")
  x = jnp.asarray(_util.rng_array((1, k), 17, dtype)) * 3
  nw = jnp.asarray(1 + 0.2 * _util.rng_array((k,), 18, jnp.float32), dtype)
  ws = [_weights(n, k, "nf4", dtype, 90 + i) for i, n in enumerate(ns)]
  args = [(p.reshape(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset)
          for p, q in ws]
  cfg = dict(lg.group_config(ns, k), tma_skips_build=True)
  run = jax.jit(lambda x, a, nw: lg.gemv_group(
      x, a, code=code, ns=ns, k=k, rms_norm=(nw, 1e-5), **cfg))
  ys = run(x, args, nw)
  twins = lg.gemv_group(x, args, code=code, ns=ns, k=k, rms_norm=(nw, 1e-5),
                        **cfg, interpret=True)
  normed = np.asarray(rms_norm.reference(x, nw, 1e-5), np.float32)
  ulp = 2.0 ** (-8 if dtype == jnp.bfloat16 else -11)
  for y, t, (p, q) in zip(ys, twins, ws):
    w = np.asarray(_util.kernel_weight(p, q, jnp.float32), np.float64)
    exact, bound = helpers.matmul_bound(normed, w, jnp.float32)
    mag = np.abs(normed.astype(np.float64)) @ np.abs(w).T
    helpers.assert_within(y, exact, bound + 2 * ulp * mag, "norm group")
    np.testing.assert_allclose(np.asarray(y), np.asarray(t), rtol=1e-2,
                               atol=1e-2 * float(jnp.max(jnp.abs(t))))


@pytest.mark.gpu
@pytest.mark.parametrize("ns,k", [((14336, 14336), 4096),
                                  ((4096, 1024, 1024), 4096),
                                  ((3072, 1024, 1024), 3072),  # 3.2-3B
                                  ((8192, 1024, 1024), 8192),  # 70B
                                  ((1000, 300), 2048),
                                  ((11008, 11008), 4096),  # Llama-2-7B
                                  ((3584, 512, 512), 3584)])  # Qwen2.5-7B
def test_gpu_lut_group(ns, k):
  """The group kernel compiled (the default config): each weight against
  its twin and the documented weight."""
  code = _code("nf4")
  x = jnp.asarray(_util.rng_array((1, k), 13, jnp.bfloat16))
  ws = [_weights(n, k, "nf4", jnp.bfloat16, 70 + i) for i, n in enumerate(ns)]
  args = [(p.reshape(-1), q.absmax, q.nested_absmax, q.nested_code, q.offset)
          for p, q in ws]
  cfg = lg.group_config(ns, k)
  ys = lg.gemv_group(x, args, code=code, ns=ns, k=k, **cfg)
  twins = lg.gemv_group(x, args, code=code, ns=ns, k=k, **cfg, interpret=True)
  for y, t, (p, q) in zip(ys, twins, ws):
    _check(y.astype(jnp.bfloat16), x, p, q, None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(t), rtol=1e-4,
                               atol=1e-4 * float(jnp.max(jnp.abs(t))))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,config", [
    (1000, 4096, _config(3)),        # partial tile, padded steps
    (14336, 4096, None),             # the default rows
    (4096, 14336, _config(2, 2)),
    (200, 2048, _config(4, 1)),      # groups past the last tile
    (14336, 4096, _config(8, 4, 128)),
    (1000, 4096, _config(3, 2, 128)),
    (300, 2048, _config(4, 2, 128)),  # groups past the last tile
    (14336, 4096, _config(8, 4, 64, 2)),
    (1000, 4096, _config(3, 2, 128, 2)),
    (4096, 14336, _config(2, 3, 64, 2)),
    (4096, 11008, None),             # k past whole 1024s: codes padded
    (3584, 18944, _config(1, 4, 64, 2)),
    (1000, 1280, _config(3, 2, 128)),
])
@pytest.mark.parametrize("dtype,quant_type", [(jnp.bfloat16, "nf4"),
                                              (jnp.float16, "fp4")])
def test_gpu_lut_variant(n, k, config, dtype, quant_type):
  """The compiled kernel: against the documented weight and its twin."""
  packed, qs = _weights(n, k, quant_type, dtype, n + 5)
  x = jnp.asarray(_util.rng_array((1, k), 11, dtype))
  bias = jnp.asarray(_util.rng_array((n,), 12, dtype))
  config = config or _config(lg.default_rows(n, k))
  y = _run(x, packed, qs, n, k, config, quant_type, bias, interpret=False)
  _check(y, x, packed, qs, bias)
  twin = _run(x, packed, qs, n, k, config, quant_type, bias, interpret=True)
  np.testing.assert_allclose(np.asarray(y, np.float32),
                             np.asarray(twin, np.float32), rtol=2e-2,
                             atol=2e-2 * float(jnp.max(jnp.abs(twin))))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 4096), (1000, 2048)])
def test_gpu_tma_skips_build(n, k):
  """The memory warpgroup branching past the build (the default since the
  fifty-third session) gives the same bits as its running the build with
  its stores off, on the GPU."""
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, n + 9)
  x = jnp.asarray(_util.rng_array((1, k), 13, jnp.bfloat16))
  args = (x, packed.reshape(-1), qs.absmax, qs.nested_absmax, qs.nested_code,
          qs.offset)
  cfg = lg.default_config(n, k)
  ys = [np.asarray(lg.gemv(*args, code=_code("nf4"), n=n, k=k,
                           **dict(cfg, tma_skips_build=skip)))
        for skip in (False, True)]
  np.testing.assert_array_equal(ys[1], ys[0])


def _emulate(x, weights, code, ns, k, rows, step_rows, wgs, ways=None,
             skip=False, executed=None, loads_first=False):
  """The kernel's PTX run by `_ptx` over every program of a group of
  weights `(packed, qs)`: build, then each pipeline step with its TMA
  tiles written into shared memory (rows past the weight zero, as TMA
  fills them). fp32 partials `[chunks, n_g]` per weight; `ways` (a dict)
  gets each shared access's most bank conflict ways, `executed` (a list)
  each program's build instructions a thread; `skip` and `loads_first`:
  `build_ptx`'s."""
  chunks = k // lg.CHUNK
  tile_rows = step_rows * wgs
  plan, n_pad = lg.row_plan(ns, k, rows, tile_rows)
  span = max(p[3] for p in plan)
  out = np.zeros((chunks, n_pad), np.float32)
  dtype = jnp.dtype(x.dtype)

  def texts(n, steps, group0, row0, n_nested):
    return (lg.build_ptx(code, dtype.name, n, k, steps * tile_rows, span,
                         n_nested, wgs, False, group0, skip,
                         loads_first=loads_first),
            lg.step_ptx(n, k, steps, n_pad, step_rows, wgs, group0, row0))

  def on_program(m, count):
    if executed is not None:
      executed.append(count)
    if ways is not None:
      for line, w in m.ways.items():
        ways[line] = max(w, ways.get(line, 1))

  _ptx.run_pipeline(x, weights, ns, k, plan, span, tile_rows, wgs, 256 * 512,
                    out, texts, on_program)
  return [out[:, p[5]:p[5] + n] for p, n in zip(plan, ns)]


def _twin_parts(x, packed, qs, code, n, k):
  return np.asarray(lg._twin(  # pylint: disable=protected-access
      x, packed.reshape(-1), qs.absmax, qs.nested_absmax.astype(jnp.float32),
      qs.nested_code, jnp.asarray(qs.offset, jnp.float32), code=code, n=n,
      k=k))


@pytest.mark.parametrize("n,k,rows,step_rows,wgs,dtype,quant_type", [
    (200, 1024, 2, 64, 1, jnp.bfloat16, "nf4"),   # padded steps, partial tile
    (100, 2048, 3, 128, 1, jnp.float16, "fp4"),   # a group with no tile
    (300, 1024, 1, 64, 2, jnp.bfloat16, "nf4"),   # two compute warpgroups
    (70, 14336 // 7, 1, 128, 2, jnp.bfloat16, "nf4"),
    # k not a multiple of 1024: the codes' rows padded (`codes_tiles`);
    # 5 and 11 chunks, the last tile of codes part padding.
    (130, 1280, 1, 64, 2, jnp.bfloat16, "nf4"),
    (90, 2816, 2, 64, 1, jnp.float16, "fp4"),
])
def test_ptx_emulated_matches_twin(n, k, rows, step_rows, wgs, dtype,
                                   quant_type):
  """The PTX itself on the CPU: the table's layout, the lane map, the
  reduce-scatter, the nested span and codes, the step counter and the
  stores give the twin's partials (fp32 sums in another order)."""
  packed, qs = _weights(n, k, quant_type, dtype, n * 3 + k)
  x = jnp.asarray(_util.rng_array((1, k), 5, dtype))
  code = _code(quant_type)
  [got] = _emulate(x, [(packed, qs)], code, (n,), k, (rows,), step_rows, wgs)
  want = _twin_parts(x, packed, qs, code, n, k)
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("n,k,cols", [(3, 1024, 16), (5, 11008, 176),
                                      (2, 1280, 32), (4, 4096, 64)])
def test_codes_tiles_pads_rows_to_16_bytes(n, k, cols):
  """Each row of codes keeps its `k / 64` codes, then zeros to whole 16
  bytes; k a multiple of 1024 is left as it is."""
  codes = jnp.arange(n * k // 64, dtype=jnp.int32).astype(jnp.uint8)
  got = np.asarray(lg.codes_tiles(codes, n, k))
  assert got.shape == (n, cols)
  want = np.asarray(codes).reshape(n, k // 64)
  np.testing.assert_array_equal(got[:, :k // 64], want)
  assert not got[:, k // 64:].any()
  helpers.assert_docstring_examples_pass(lg.codes_tiles, "codes_tiles")


@pytest.mark.parametrize("step_rows,wgs", [(64, 1), (128, 2)])
def test_ptx_table_has_no_bank_conflicts(step_rows, wgs):
  """The table's stores and lookups and the weight words' loads send the
  32 lanes of a warp to 32 distinct banks, whatever the bytes."""
  n, k = 2 * step_rows * wgs, 1024
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, 7)
  x = jnp.asarray(_util.rng_array((1, k), 3, jnp.bfloat16))
  ways = {}
  _emulate(x, [(packed, qs)], _code("nf4"), (n,), k, (1,), step_rows, wgs,
           ways)
  lookups = {l: w for l, w in ways.items() if l.startswith("ld.shared.f32 t")}
  stores = {l: w for l, w in ways.items()
            if l.startswith("@pw st.shared.f32 [a+")}
  words = {l: w for l, w in ways.items() if l.startswith("ld.shared.u32 w")}
  assert len(lookups) == 4 and len(stores) == 256 // wgs
  assert len(words) == step_rows // 4
  assert set(lookups.values()) == set(stores.values()) == set(
      words.values()) == {1}, (lookups, stores, words)


def test_ptx_memory_warpgroup_skips_the_build():
  """`tma_skips_build`: the memory warpgroup branches past the table's
  block (a handful of instructions), the compute threads run all of it,
  and the partials are the same."""
  n, k = 300, 1024
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, 17)
  x = jnp.asarray(_util.rng_array((1, k), 4, jnp.bfloat16))
  code = _code("nf4")
  runs = {}
  for skip in (False, True):
    executed = []
    [runs[skip]] = _emulate(x, [(packed, qs)], code, (n,), k, (1,), 64, 2,
                            skip=skip, executed=executed)
    counts = np.stack(executed)
    if skip:
      assert counts[:, 256:].max() <= 4 < counts[:, :256].min()
    else:  # without it the memory warpgroup runs the block, stores off
      assert counts[:, 256:].min() > 300
  np.testing.assert_array_equal(runs[True], runs[False])
  np.testing.assert_allclose(runs[True], _twin_parts(x, packed, qs, code, n,
                                                     k), rtol=1e-5,
                             atol=1e-5 * float(np.max(np.abs(runs[False]))))
  text = lg.build_ptx(code, "bfloat16", n, k, 384, 256, 63, 2, True, 0, True)
  assert text.index("@!pw bra LUT_BUILT;") < text.index("ld.global")
  assert text.index("LUT_BUILT:") < text.index("@pw bar.sync 15, 256;")
  with pytest.raises(ValueError, match="tma_skips_build"):
    lg.gemv(x, packed.reshape(-1), qs.absmax, qs.nested_absmax,
            qs.nested_code, qs.offset, code=code, n=n, k=k, wgs=1,
            tma_skips_build=True, interpret=True)


@pytest.mark.parametrize("wgs,skip", [(2, True), (2, False), (1, False)])
def test_ptx_build_takes_its_loads_back_first(wgs, skip):
  """`loads_first`: every loaded value summed, and a branch on the sum past
  a store to the thread's own first entry, after the last global load and
  before the table's first store; no barrier added; the partials are the
  same, and the store, taken, leaves them so (the table overwrites it)."""
  n, k = 1000, 2048
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, 23)
  x = jnp.asarray(_util.rng_array((1, k), 5, jnp.bfloat16))
  code = _code("nf4")
  runs = [_emulate(x, [(packed, qs)], code, (n,), k, (3,), 64, wgs,
                   skip=skip, loads_first=first)[0] for first in (False, True)]
  np.testing.assert_array_equal(runs[0], runs[1])
  text = lg.build_ptx(code, "bfloat16", n, k, 384, 256, 63, wgs, wgs > 1, 0,
                      skip, loads_first=True)
  branch = text.index("@!lf bra LUT_LOADED;")
  assert text.rindex("ld.global") < text.index("add.f32 e, e, g4;") < branch
  assert branch < text.index("st.shared.f32 [a], e;") < text.index(
      "LUT_LOADED:") < text.index("@pw st.shared.f32 [a+")
  assert "and.pred lf, lf, pw;" in text  # compute threads' entries only
  plain = lg.build_ptx(code, "bfloat16", n, k, 384, 256, 63, wgs, wgs > 1, 0,
                       skip)
  assert "LUT_LOADED" not in plain
  assert text.count("bar.") == plain.count("bar.") == 1
  # The store taken (the sum's test made always true): the table's own
  # stores overwrite it.
  build = lg.build_ptx

  def taken(*args, **kwargs):
    text = build(*args, **kwargs)
    assert "setp.eq.f32 lf, e, 0f7F7FFFFF;" in text
    return text.replace("setp.eq.f32 lf, e, 0f7F7FFFFF;",
                        "setp.eq.f32 lf, e, e;")
  with mock.patch.object(lg, "build_ptx", taken):
    got = _emulate(x, [(packed, qs)], code, (n,), k, (3,), 64, wgs,
                   skip=skip, loads_first=True)[0]
  np.testing.assert_array_equal(got, runs[0])


@pytest.mark.parametrize("wgs,skip", [(2, True), (1, False)])
def test_ptx_build_fences_its_loads_first(wgs, skip):
  """`loads_first` with `loads_fence`: a fence after the last global load
  and before the table's first store, no branch and no barrier added; the
  partials are the same."""
  n, k = 1000, 2048
  packed, qs = _weights(n, k, "nf4", jnp.bfloat16, 29)
  x = jnp.asarray(_util.rng_array((1, k), 7, jnp.bfloat16))
  code = _code("nf4")
  build = lg.build_ptx

  def fenced(*args, **kwargs):
    return build(*args, **dict(kwargs, loads_fence=True))
  plain = _emulate(x, [(packed, qs)], code, (n,), k, (3,), 64, wgs,
                   skip=skip)[0]
  with mock.patch.object(lg, "build_ptx", fenced):
    got = _emulate(x, [(packed, qs)], code, (n,), k, (3,), 64, wgs,
                   skip=skip, loads_first=True)[0]
  np.testing.assert_array_equal(got, plain)
  text = fenced(code, "bfloat16", n, k, 384, 256, 63, wgs, wgs > 1, 0, skip,
                loads_first=True)
  assert text.count("fence.acq_rel.cta;") == 1
  assert (text.rindex("ld.global") < text.index("fence.acq_rel.cta;")
          < text.index("@pw st.shared.f32 [a+"))
  assert "LUT_LOADED" not in text and text.count("bar.") == 1
  # without `loads_first` the fence asks for nothing
  assert "fence" not in build(code, "bfloat16", n, k, 384, 256, 63, wgs,
                              wgs > 1, 0, skip, loads_fence=True)


@pytest.mark.parametrize("dtype,chunks", [(jnp.bfloat16, 5),
                                          (jnp.float16, 4),
                                          (jnp.bfloat16, 18)])
def test_ptx_swiglu_build_matches_reference(dtype, chunks):
  """`SwigluInput`: the build makes its x from gate/up partials, summed
  in `sum_splits`'s order (5 chunks: one set aside; 18, past
  `_SWIGLU_LOADS_AHEAD`: up's loaded after gate's sum), as
  `swiglu_reference` does: the down partials are the twin's of that x."""
  n_in, n, k, wgs = 1088, 128, 1024, 2
  rng = np.random.default_rng(chunks)
  part = rng.normal(0, 1.5, (chunks, 2 * n_in)).astype(np.float32)
  part[0, :8] = [40.0, -40.0, 0.0, -0.0, 1e-3, 88.0, -88.0, 3.0]
  swi = lg.SwigluInput(chunks, 2 * n_in, n_in)
  packed, qs = _weights(n, k, "nf4", dtype, 31)
  code = _code("nf4")
  plan, n_pad = lg.row_plan((n,), k, (1,), 64 * wgs)
  span = plan[0][3]
  out = np.zeros((k // lg.CHUNK, n_pad), np.float32)

  def texts(n_, steps, group0, row0, n_nested):
    return (lg.build_ptx(code, jnp.dtype(dtype).name, n_, k, steps * 128,
                         span, n_nested, wgs, True, group0, True, swi),
            lg.step_ptx(n_, k, steps, n_pad, 64, wgs, group0, row0))

  _ptx.run_pipeline(part, [(packed, qs)], (n,), k, plan, span, 128, wgs,
                    256 * 512, out, texts)
  total = np.asarray(sum_splits(jnp.asarray(part)))
  x = lg.swiglu_reference(jnp.asarray(total[:k]),
                          jnp.asarray(total[n_in:n_in + k]), dtype)[None]
  want = _twin_parts(x, packed, qs, code, n, k)
  np.testing.assert_allclose(out[:, :n], want, rtol=1e-5,
                             atol=1e-5 * float(np.max(np.abs(want))))
  # The formula is `g * (1 / (1 + exp(-g))) * u` as XLA runs it on the
  # CPU (each op rounded to the dtype), but for rare elements where exp's
  # approximation crosses a rounding (a unit in the last place of exp(-g),
  # up to two of the product after the chain's roundings). The model's
  # `jax.nn.silu(g) * u` was that formula up to JAX 0.12.0; from 0.12.1
  # XLA's sigmoid is `exp(-|g|) / (1 + exp(-|g|))` (1 over the sum for
  # g >= 0), which rounds apart in float16 (up to three units).
  g, u = (jnp.asarray(t).astype(dtype) for t in (total[:k],
                                                   total[n_in:n_in + k]))
  model = np.asarray((jax.nn.silu(g) * u).astype(jnp.float32))
  formula = np.asarray((g * (1 / (1 + jnp.exp(-g))) * u).astype(jnp.float32))
  mine = np.asarray(x[0].astype(jnp.float32))
  ulp = 2.0 ** (-7 if dtype == jnp.bfloat16 else -10)
  np.testing.assert_allclose(mine, model, rtol=4 * ulp, atol=1e-6)
  np.testing.assert_allclose(mine, formula, rtol=2 * ulp, atol=1e-6)
  assert np.mean(mine == formula) > 0.995


def _table_x(smem, chunk_cols):
  """x's two values of every byte position of a program's table, read
  back from its entries for bytes 0xF7 and 0x7F (NF4's codes 15 and 7
  are 1.0 and 0.0): `[256]` fp32, the chunk's columns in order."""
  table = np.asarray(smem[:256 * 512]).view(np.float32)
  out = np.zeros(chunk_cols, np.float32)
  for p in range(chunk_cols // 2):
    l, i = p // 4, p % 4
    word = 16384 * (l >> 4) + (l + 16 * i) % 64
    out[2 * p] = table[word + 64 * 0xF7]
    out[2 * p + 1] = table[word + 64 * 0x7F]
  return out


@pytest.mark.parametrize("k,wgs,dtype", [
    (2048, 2, jnp.bfloat16),   # a 16-byte unit a thread
    (1024, 2, jnp.bfloat16),   # half the threads load
    (3072, 1, jnp.float16),    # one warpgroup, three units a thread
])
def test_ptx_norm_build_matches_reference(k, wgs, dtype):
  """`NormInput`: every program's table holds the RMSNorm'd x of its
  columns (`rms_norm.reference`: the sum of squares in another order and
  an approximate rsqrt, so at most one unit in the last place apart, on
  a few columns), and the partials are the twin's of that x."""
  from pallas_kernels import rms_norm  # pylint: disable=g-import-not-at-top
  n, eps = 100, 1e-5
  x = jnp.asarray(_util.rng_array((1, k), 41, dtype)) * 3
  weight = jnp.asarray(1 + 0.2 * _util.rng_array((k,), 42, jnp.float32),
                       dtype)
  packed, qs = _weights(n, k, "nf4", dtype, 43)
  code = _code("nf4")
  tile = 64 * wgs
  plan, n_pad = lg.row_plan((n,), k, (1,), tile)
  span = plan[0][3]
  out = np.zeros((k // lg.CHUNK, n_pad), np.float32)
  want_x = np.asarray(rms_norm.reference(x, weight, eps), np.float32)[0]
  got_x = np.zeros(k, np.float32)

  def texts(n_, steps, group0, row0, n_nested):
    return (lg.build_ptx(code, jnp.dtype(dtype).name, n_, k, steps * tile,
                         span, n_nested, wgs, wgs == 2, group0, wgs == 2,
                         None, lg.NormInput(eps)),
            lg.step_ptx(n_, k, steps, n_pad, 64, wgs, group0, row0))

  def on_program(m, count):
    del count
    s = m.ctaid[0]
    got_x[s * lg.CHUNK:(s + 1) * lg.CHUNK] = _table_x(m.smem, lg.CHUNK)

  _ptx.run_pipeline(x, [(packed, qs)], (n,), k, plan, span, tile, wgs,
                    256 * 512, out, texts, on_program, norm_weight=weight)
  ulp = 2.0 ** (-7 if dtype == jnp.bfloat16 else -10)
  np.testing.assert_allclose(got_x, want_x, rtol=ulp, atol=0)
  assert np.mean(got_x == want_x) > 0.98, np.mean(got_x == want_x)
  want = _twin_parts(jnp.asarray(got_x, dtype)[None], packed, qs, code, n, k)
  np.testing.assert_allclose(out[:, :n], want, rtol=1e-5,
                             atol=1e-5 * float(np.max(np.abs(want))))
  with pytest.raises(ValueError, match="norm: needs skip"):
    lg.build_ptx(code, "bfloat16", n, k, 128, span, 8, 2, True, 0, False,
                 None, lg.NormInput(eps))


def test_ptx_emulated_group_matches_twin():
  """A group of three weights in one launch: each program's row group
  finds its weight (`group0`), its output rows start at `row0`, and the
  padding of one weight never reaches the next."""
  k, ns, rows = 1024, (130, 64, 200), (2, 1, 2)
  code = _code("nf4")
  x = jnp.asarray(_util.rng_array((1, k), 9, jnp.bfloat16))
  weights = [_weights(n, k, "nf4", jnp.bfloat16, 40 + n) for n in ns]
  got = _emulate(x, weights, code, ns, k, rows, 64, 2)
  for g, ((packed, qs), n) in enumerate(zip(weights, ns)):
    want = _twin_parts(x, packed, qs, code, n, k)
    np.testing.assert_allclose(got[g], want, rtol=1e-5,
                               atol=1e-5 * float(np.max(np.abs(want))),
                               err_msg=f"weight {g}")


def test_default_group_is_one_launch_of_the_tables(monkeypatch):
  """`gemv_4bit_group` at M = 1 with every weight >= LUT_MIN_N rows (a
  layer's gate and up) takes the table kernel by default, all weights in
  one launch; so does a group of weights >= LUT_GROUP_MIN_N rows, LUT_MIN_N
  in all (q/k/v of Llama-3-8B: 7 row groups x 16 chunks; of 70B: 5 x 32,
  past one wave); a group with a smaller weight or too few rows keeps
  "reduce"."""
  k = 1024
  assert gk.lut_serves(1, (14336, 14336), 4096, 64, jnp.bfloat16, True, 256,
                       _code("nf4"))
  for ns, k_ in (((4096, 1024, 1024), 4096), ((8192, 1024, 1024), 8192)):
    assert gk.lut_serves(1, ns, k_, 64, jnp.bfloat16, True, 256,
                         _code("nf4")), ns
  for ns, k_ in (((2048, 512, 512), 2048), ((1024, 1024), 4096),
                 ((1024, 1024, 1024), 4096), ((1024,), 4096)):
    assert not gk.lut_serves(1, ns, k_, 64, jnp.bfloat16, True, 256,
                             _code("nf4")), ns
  # k a multiple of 256, past whole 1024s (the codes' rows padded):
  # Llama-2-7B's down, Qwen2.5-7B's gate/up; not past a K chunk.
  # Nor where the chunks leave over 30% of the SMs idle (3584x18944: 74
  # programs on 132), nor below LUT_MIN_K (8960x1536: 6 chunks).
  for ns, k_, served in (((4096,), 11008, True), ((18944, 18944), 3584, True),
                         ((4096,), 4096 + 64, False), ((4096,), 18944, False),
                         ((8960,), 1536, False), ((8192,), 2048, True),
                         ((8192,), 28672, True)):
    assert gk.lut_serves(1, ns, k_, 64, jnp.bfloat16, True, 256,
                         _code("nf4")) == served, (ns, k_)
  assert not gk.lut_serves(2, (14336,), 4096, 64, jnp.bfloat16, True, 256,
                           _code("nf4"))
  assert not gk.lut_serves(1, (14336,), 4096, 64, jnp.bfloat16, False, 256,
                           _code("nf4"))
  cfg = lg.group_config((14336, 14336), 4096)
  assert cfg["rows"] == (4, 4) and cfg["wgs"] == 2 and cfg["early"]
  # The TMA warpgroup branches past the table's build (fifty-third
  # session: measured faster; the build ends sooner without it).
  assert cfg["tma_skips_build"] and lg.default_config(4096, 4096)[
      "tma_skips_build"]
  assert lg.group_config((4096, 1024, 1024), 4096)["rows"] == (5, 1, 1)
  monkeypatch.setattr(gk, "LUT_MIN_K", k)  # a small k for the CPU
  ns = (4096, 4160)
  ws = [_weights(n, k, "nf4", jnp.bfloat16, 60 + i) for i, n in enumerate(ns)]
  x = jnp.asarray(_util.rng_array((1, k), 8, jnp.bfloat16))
  calls = []
  real = lg.gemv_group
  monkeypatch.setattr(lg, "gemv_group",
                      lambda *a, **kw: calls.append(kw["ns"]) or real(*a, **kw))
  ys = gk.gemv_4bit_group(
      x, tuple((p.reshape(-1), q.absmax,
                (q.nested_absmax, q.nested_code, q.offset)) for p, q in ws),
      jnp.asarray(codebooks.code_for("nf4")), ns=ns, k=k, blocksize=64,
      code=_code("nf4"), interpret=True)
  assert calls == [ns]
  for y, (p, q) in zip(ys, ws):
    _check(y, x, p, q, None)


def test_early_start_barrier():
  """`early`: the compute threads meet at named barrier 15 (256 threads);
  the memory warpgroup skips it. Only with two compute warpgroups."""
  text = lg.build_ptx(_code("nf4"), "bfloat16", 1000, 4096, 384, 256, 63, 2,
                      True)
  assert "@pw bar.sync 15, 256;" in text and "bar.sync 0;" not in text
  packed, qs = _weights(64, 1024, "nf4", jnp.bfloat16, 2)
  with pytest.raises(ValueError, match="early: needs two compute"):
    lg.gemv(jnp.ones((1, 1024), jnp.bfloat16), packed.reshape(-1),
            qs.absmax, qs.nested_absmax, qs.nested_code, qs.offset,
            code=_code("nf4"), n=64, k=1024, early=True, interpret=True)
