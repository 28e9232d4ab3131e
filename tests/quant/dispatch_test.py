"""Kernel dispatch: modes, and the kernels under jit/vmap/grad/remat/shard_map.

Every kernel test is parametrized by `MODE`: on CPU the kernels run in
Pallas interpret mode ("interpret"); the same tests, marked `gpu`, run the
compiled kernels ("pallas") on a GPU with `pytest -m gpu`, gradients
through the backward path included.

Accuracy is asserted against bounds derived from the numerics (see
`tests/helpers.matmul_bound`): the fused GEMV multiplies with the fp32 code
table (float32 inputs) or the codes rounded to bfloat16 (16-bit inputs),
scales by the absmax and accumulates in float32; dequantization is bit-exact
with the reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jaxbnb
from jaxbnb import functional as F
from jaxbnb import optim
from jaxbnb._src.quant import dispatch
from jaxbnb._src.quant import kernels
from pallas_kernels import gemv_4bit as gk
from tests import helpers
from tests.kernels import _util

MODES = _util.MODES
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _w(n, k, seed=0, dtype=jnp.float32):
  return jnp.asarray(_util.rng_array((n, k), seed, dtype))


def _uses_pallas(fn, *args) -> bool:
  """Whether tracing `fn(*args)` (in the current mode) emits a pallas_call."""
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_modes_and_errors():
  assert jaxbnb.get_kernel_mode() in jaxbnb.KERNEL_MODES
  with jaxbnb.kernel_mode("reference"):
    assert jaxbnb.get_kernel_mode() == "reference"
    assert dispatch.use_kernels() == (False, False)
    assert dispatch.resolve() == "reference"
  with jaxbnb.kernel_mode("interpret"):
    assert dispatch.use_kernels() == (True, True)
    assert dispatch.resolve() == "interpret"
  with jaxbnb.kernel_mode("pallas"):
    assert dispatch.use_kernels() == (True, False)
    assert dispatch.resolve() == "pallas"
  with pytest.raises(ValueError, match="kernel mode must be one of"):
    jaxbnb.set_kernel_mode("fast")
  with pytest.raises(ValueError, match="'triton'"):
    with jaxbnb.kernel_mode("triton"):
      pass
  # The context manager restores the previous mode, also after an error.
  before = jaxbnb.get_kernel_mode()
  with pytest.raises(RuntimeError):
    with jaxbnb.kernel_mode("reference"):
      raise RuntimeError
  assert jaxbnb.get_kernel_mode() == before


def test_auto_mode_uses_reference_on_cpu():
  if _util.on_gpu():
    pytest.skip("CPU-only behaviour")
  assert dispatch.use_kernels("auto") == (False, False)
  assert dispatch.resolve("auto") == "reference"
  packed, qs = F.quantize_4bit(_w(16, 64), quant_type="nf4")
  x = jnp.ones((2, 64))
  with jaxbnb.kernel_mode("auto"):
    assert not _uses_pallas(lambda x: F.matmul_4bit(x, packed, qs), x)
  with jaxbnb.kernel_mode("interpret"):
    assert _uses_pallas(lambda x: F.matmul_4bit(x, packed, qs), x)


def test_jitted_function_follows_the_mode_it_is_called_under():
  # The mode is in jit's cache key: one jitted function (or one function
  # jitted twice) traced under "reference" is traced again under
  # "interpret", and back; 8-bit optimizer updates the same.
  packed, qs = F.quantize_4bit(_w(16, 64), quant_type="nf4")
  x = jnp.ones((2, 64))
  f = jax.jit(lambda x: F.matmul_4bit(x, packed, qs))
  for mode, want in (("reference", False), ("interpret", True),
                     ("reference", False)):
    with jaxbnb.kernel_mode(mode):
      assert ("pallas_call" in str(f.trace(x).jaxpr)) == want, mode
      assert ("pallas_call" in str(jax.make_jaxpr(f)(x))) == want, mode
  tx = optim.adam8bit(1e-3)
  params = {"w": jnp.ones((64, 64))}
  state = tx.init(params)
  for mode, want in (("reference", False), ("interpret", True)):
    with jaxbnb.kernel_mode(mode):
      jaxpr = jax.make_jaxpr(jax.jit(tx.update))(params, state, params)
      assert ("pallas_call" in str(jaxpr)) == want, mode


def test_set_kernel_mode_is_per_thread():
  before = jaxbnb.get_kernel_mode()
  try:
    jaxbnb.set_kernel_mode("interpret")
    out = []
    thread = threading.Thread(
        target=lambda: out.append(jaxbnb.get_kernel_mode()))
    thread.start()
    thread.join()
    assert jaxbnb.get_kernel_mode() == "interpret"
    assert out == [dispatch._initial_mode()]  # pylint: disable=protected-access
    with jaxbnb.kernel_mode("reference"):
      with jaxbnb.kernel_mode("pallas"):
        assert jaxbnb.get_kernel_mode() == "pallas"
      assert jaxbnb.get_kernel_mode() == "reference"
    assert jaxbnb.get_kernel_mode() == "interpret"
  finally:
    jaxbnb.set_kernel_mode(before)
  assert jaxbnb.get_kernel_mode() == before


def _mode_in_subprocess(value):
  env = {**os.environ, "JAXBNB_KERNELS": value, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
      [sys.executable, "-c",
       "import threading, jaxbnb\n"
       "out = []\n"
       "t = threading.Thread(target=lambda: out.append("
       "jaxbnb.get_kernel_mode()))\n"
       "t.start(); t.join()\n"
       "print(jaxbnb.get_kernel_mode(), out[0])"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
      check=False)


def test_kernel_mode_environment_variable():
  # The initial mode of every thread comes from JAXBNB_KERNELS.
  proc = _mode_in_subprocess("reference")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["reference", "reference"]
  # An invalid value is a clear error at import, naming the variable and
  # the allowed modes.
  proc = _mode_in_subprocess("fast")
  assert proc.returncode != 0
  err = proc.stderr.strip().splitlines()[-1]
  assert err.startswith("ValueError"), proc.stderr
  assert "JAXBNB_KERNELS" in err and "'fast'" in err, err
  for mode in jaxbnb.KERNEL_MODES:
    assert repr(mode) in err, err


def test_pallas_mode_dequantizes_with_the_kernel_where_the_gemv_cannot():
  # K = 96 is not a multiple of the blocksize: the fused GEMV cannot serve
  # it, the dequantize kernel + dot does (as for M past the GEMV's): in
  # "pallas" mode that path is lowered (for an H200, no GPU needed),
  # "interpret" gives the reference's result bit for bit.
  with jaxbnb.kernel_mode("reference"):
    packed, qs = F.quantize_4bit(_w(8, 96, 1), quant_type="nf4")
    x = jnp.asarray(_util.rng_array((2, 96), 2, jnp.float32))
    y_ref = F.matmul_4bit(x, packed, qs)
  with jaxbnb.kernel_mode("pallas"):
    text = helpers.lowered_for_h200(lambda x: F.matmul_4bit(x, packed, qs),
                                    jax.ShapeDtypeStruct((2, 96), x.dtype))
  assert "jaxbnb_dequantize_4bit" in text
  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_4bit(x, packed, qs)
  helpers.assert_bits_equal(y, y_ref)


def test_pallas_mode_on_cpu_never_falls_back_silently():
  if _util.on_gpu():
    pytest.skip("CPU-only behaviour")
  # On CPU the compiled kernels cannot run at all: "pallas" raises (Pallas'
  # own error, at lowering) instead of quietly running the reference.
  w = _w(16, 64)
  with jaxbnb.kernel_mode("pallas"):
    with pytest.raises(ValueError, match="interpret mode"):
      F.quantize_4bit(w, quant_type="nf4")
  with jaxbnb.kernel_mode("reference"):
    packed, qs = F.quantize_4bit(w, quant_type="nf4")
  with jaxbnb.kernel_mode("pallas"):
    with pytest.raises(ValueError, match="interpret mode"):
      F.dequantize_4bit(packed, qs)
    with pytest.raises(ValueError, match="interpret mode"):
      F.matmul_4bit(jnp.ones((2, 64)), packed, qs)


def test_ops_without_a_kernel_run_the_reference_in_every_mode():
  # 8-bit blockwise quantization and LLM.int8's row quantization have no
  # Pallas kernel: every mode, "pallas" included, runs the same pure-jnp
  # code (nothing to fall back from). (The int8 matmuls have kernels:
  # tests/kernels/int8_*_test.py.)
  x = _w(16, 64, 3)
  outs = {}
  for mode in ("reference", "interpret", "pallas"):
    with jaxbnb.kernel_mode(mode):
      q, qs = F.quantize_blockwise(x, blocksize=64, nested=True)
      cb, scb, _ = F.int8_vectorwise_quant(x)
      outs[mode] = (q, F.dequantize_blockwise(q, qs), cb, scb)
  for mode in ("interpret", "pallas"):
    for a, b in zip(outs[mode], outs["reference"]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_quantize_dequantize_kernels_equal_reference(quant_type, nested,
                                                     mode):
  w = _w(48, 320, 1, jnp.bfloat16)
  with jaxbnb.kernel_mode("reference"):
    p_ref, qs_ref = F.quantize_4bit(w, quant_type=quant_type,
                                    compress_statistics=nested)
    d_ref = F.dequantize_4bit(p_ref, qs_ref)
  with jaxbnb.kernel_mode(mode):
    assert _uses_pallas(lambda w: F.quantize_4bit(w, quant_type=quant_type),
                        w)
    p, qs = F.quantize_4bit(w, quant_type=quant_type,
                            compress_statistics=nested)
    d = F.dequantize_4bit(p, qs)
    d_jit = jax.jit(F.dequantize_4bit)(p, qs)
  # Bit-exact: the kernels implement the reference's operations exactly.
  np.testing.assert_array_equal(np.asarray(p), np.asarray(p_ref))
  assert qs == qs_ref
  np.testing.assert_array_equal(np.asarray(qs.absmax),
                                np.asarray(qs_ref.absmax))
  helpers.assert_bits_equal(d, d_ref)
  helpers.assert_bits_equal(d_jit, d_ref)


def _check_matmul(y, x, packed, qs, bias=None, err_msg="", gemv=True):
  """y against x @ W.T (+ bias) with the W the serving path multiplies with.

  The kernels where the fused GEMV serves (`kernels.gemv_serves`): its
  weight (`_util.kernel_weight`, per the variant the dispatch picks); other
  M, and the reference (`gemv=False`): the
  weight dequantized to the compute dtype (the dequantization kernel is
  bit-exact), then a float32-accumulated dot. Bound: `helpers.matmul_bound`.
  """
  m = int(np.prod(x.shape[:-1]))
  x2 = np.asarray(x.astype(jnp.float32)).reshape(m, -1)
  if (gemv and kernels.gemv_serves(m, qs.shape[0], x.shape[-1], x.dtype)
      and x.shape[-1] % qs.blocksize == 0):
    cfg = gk.default_config(m, qs.shape[0], x.shape[-1], qs.blocksize,
                            jnp.dtype(x.dtype).name, mma=True)
    w = _util.kernel_weight(packed, qs, x.dtype, in_dtype=gk.scales_in_compute_dtype(cfg))
    if gk.lut_serves(m, (qs.shape[0],), x.shape[-1], qs.blocksize, x.dtype,
                     qs.nested, qs.nested_blocksize if qs.nested else 256,
                     code="given"):
      w = _util.kernel_weight(packed, qs, jnp.float32)  # the table's fp32 codes
  else:
    w = np.asarray(F.dequantize_4bit(packed, qs).astype(x.dtype).astype(
        jnp.float32))
  exact, bound = helpers.matmul_bound(x2, w, x.dtype, bias=bias)
  helpers.assert_within(np.asarray(y.astype(jnp.float32)).reshape(m, -1),
                        exact, bound, err_msg)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 3, 8, 100])   # gemv reduce/dot, dequant+dot
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_forward_and_grad(m, dtype, mode):
  n, k = 40, 192
  w = _w(n, k, 2)
  x = jnp.asarray(_util.rng_array((m, k), 3, dtype))
  bias = jnp.asarray(_util.rng_array((n,), 4, dtype))
  packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
  g = jnp.asarray(_util.rng_array((m, n), 5, jnp.float32))

  def loss(x, b):
    return jnp.sum(F.matmul_4bit(x, packed, qs, b).astype(jnp.float32) * g)

  with jaxbnb.kernel_mode("reference"):
    y_ref = F.matmul_4bit(x, packed, qs, bias)
    dx_ref, db_ref = jax.grad(loss, argnums=(0, 1))(x, bias)
  with jaxbnb.kernel_mode(mode):
    assert _uses_pallas(F.matmul_4bit, x, packed, qs, bias)
    y = jax.jit(F.matmul_4bit)(x, packed, qs, bias)
    dx, db = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, bias)
  assert y.dtype == dx.dtype == db.dtype == dtype
  _check_matmul(y, x, packed, qs, bias, "y")
  with jaxbnb.kernel_mode(mode):  # without a bias (its own 16-bit path)
    y_nb = jax.jit(F.matmul_4bit)(x, packed, qs)
  _check_matmul(y_nb, x, packed, qs, None, "y without bias")
  _check_matmul(y_ref, x, packed, qs, bias, "y_ref", gemv=False)
  # The backward pass is g @ W with W dequantized by the (bit-exact)
  # dequantization kernel, so dx is a float32-accumulated product over N.
  w_deq = np.asarray(F.dequantize_4bit(packed, qs).astype(dtype).astype(
      jnp.float32))
  g_in = np.asarray(g.astype(dtype).astype(jnp.float32))
  exact, bound = helpers.matmul_bound(g_in, w_deq.T, dtype)
  helpers.assert_within(dx, exact, bound, "dx")
  helpers.assert_within(dx_ref, exact, bound, "dx_ref")
  # d bias = sum of g over the batch, in float32, rounded to the bias dtype.
  db_exact = np.asarray(g_in, np.float64).sum(0)
  db_bound = helpers.sum_bound(g_in, 0)
  if dtype != jnp.float32:
    db_bound = db_bound + helpers.ulp(np.abs(db_exact) + db_bound, dtype)
  helpers.assert_within(db, db_exact, db_bound, "dbias")
  helpers.assert_within(db_ref, db_exact, db_bound, "dbias_ref")


def test_gemv_serves_large_m_only_for_large_16bit_weights():
  """M = 65..128 goes to the fused GEMV for 16-bit x and weights of at
  least 4096 x 4096 elements (where it beat dequantize + dot on the H200);
  other M above 64 dequantizes and multiplies."""
  serves = kernels.gemv_serves
  assert serves(64, 16, 64, jnp.float32)
  assert serves(65, 4096, 4096, jnp.bfloat16)
  assert serves(128, 14336, 4096, jnp.float16)
  assert not serves(129, 14336, 4096, jnp.bfloat16)
  assert not serves(128, 1024, 4096, jnp.bfloat16)
  assert not serves(100, 4096, 4096, jnp.float32)


@pytest.mark.parametrize("m,dtype,kernel", [
    (100, jnp.bfloat16, "jaxbnb_gemv_4bit_mma"),   # the fused "mma" kernel
    (100, jnp.float32, None),                      # fp32: dequantize + dot
    (129, jnp.bfloat16, None),                     # past GEMV_MAX_M
])
def test_large_m_routing(m, dtype, kernel, monkeypatch):
  """With the weight-size threshold lowered to this small weight, the
  dispatch sends M = 100 in bf16 to the fused kernel's default config (64
  rows, prefetch), and the result is within the bound of its weight."""
  # The routing is decided at trace time and traces are cached by shape:
  # a weight shape no other test uses, so no trace made under the other
  # threshold serves this test, and this test's serve no other.
  n, k = 56, 448
  monkeypatch.setattr(kernels, "GEMV_LARGE_M_MIN_SIZE", n * k)
  w = _w(n, k, 6)
  x = jnp.asarray(_util.rng_array((m, k), 7, dtype))
  packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
  with jaxbnb.kernel_mode("interpret"):
    text = str(jax.make_jaxpr(F.matmul_4bit)(x, packed, qs))
  if kernel:
    assert kernel in text
    cfg = gk.default_config(m, n, k, 64, jnp.dtype(dtype).name, mma=True)
    assert cfg[:2] == ("mma", 64) and cfg[7] == 1
  else:
    assert "jaxbnb_gemv_4bit" not in text
  with jaxbnb.kernel_mode("interpret"):
    y = jax.jit(F.matmul_4bit)(x, packed, qs)
  _check_matmul(y, x, packed, qs, None, f"M = {m}")


def test_m1_routing_takes_the_table_kernel(monkeypatch):
  """At M = 1 an NF4 + DQ weight of at least `LUT_MIN_N` rows goes to the
  table GEMV (`gemv_4bit_lut`), alone through `F.matmul_4bit` and paired
  (a layer's gate and up) through `F.matmul_4bit_group` in one call of
  `gemv_group`; a smaller weight in the pair keeps the "reduce" kernel.
  The threshold is lowered to these small weights (shapes no other test
  traces)."""
  from pallas_kernels import gemv_4bit_lut  # pylint: disable=g-import-not-at-top
  n, k = 72, 1024
  monkeypatch.setattr(gk, "LUT_MIN_N", n)
  monkeypatch.setattr(gk, "LUT_MIN_K", k)  # small shapes for the CPU
  # Fresh traces: a trace cached by an earlier test (same shapes, same
  # mode; with pytest-xdist any test may run first) would never reach
  # the patched function below.
  jax.clear_caches()
  calls = []
  real = gemv_4bit_lut.gemv_group
  monkeypatch.setattr(gemv_4bit_lut, "gemv_group",
                      lambda *a, **kw: calls.append(kw["ns"]) or real(*a, **kw))
  x = jnp.asarray(_util.rng_array((1, k), 21, jnp.bfloat16))
  ws = [F.quantize_4bit(_w(n, k, 22 + i, jnp.bfloat16), quant_type="nf4",
                        compress_statistics=True) for i in range(2)]
  with jaxbnb.kernel_mode("interpret"):
    y = jax.jit(F.matmul_4bit)(x, *ws[0])
    ys = jax.jit(F.matmul_4bit_group)(x, ws)
  assert calls == [(n,), (n, n)]
  _check_matmul(y, x, *ws[0], None, "single")
  for y_g, (p, q) in zip(ys, ws):
    _check_matmul(y_g, x, p, q, None, "group")
  small = F.quantize_4bit(_w(n - 8, k, 30, jnp.bfloat16), quant_type="nf4",
                          compress_statistics=True)
  with jaxbnb.kernel_mode("interpret"):
    jax.jit(F.matmul_4bit_group)(x, [ws[0], small])
  assert calls == [(n,), (n, n)]
  # bitsandbytes' own layout without double quantization: not the table.
  plain = F.quantize_4bit(_w(n, k, 31, jnp.bfloat16), quant_type="nf4",
                          compress_statistics=False)
  with jaxbnb.kernel_mode("interpret"):
    y = jax.jit(F.matmul_4bit)(x, *plain)
  assert calls == [(n,), (n, n)]
  _check_matmul(y, x, *plain, None, "plain absmax")


def test_m1_qkv_group_takes_the_table_kernel(monkeypatch):
  """Llama-3-8B's q/k/v (4096 + 1024 + 1024 rows, k 4096) at M = 1: one
  `gemv_group` call of the table GEMV, each output within the GEMV's
  bound; a group with 512-row k/v (Llama-3.2-1B's) stays off it."""
  from pallas_kernels import gemv_4bit_lut  # pylint: disable=g-import-not-at-top
  jax.clear_caches()  # see test_m1_routing_takes_the_table_kernel
  calls = []
  real = gemv_4bit_lut.gemv_group
  monkeypatch.setattr(gemv_4bit_lut, "gemv_group",
                      lambda *a, **kw: calls.append(kw["ns"]) or real(*a, **kw))
  k, ns = 4096, (4096, 1024, 1024)
  ws = [F.quantize_4bit(_w(n, k, 40 + i, jnp.bfloat16), quant_type="nf4",
                        compress_statistics=True) for i, n in enumerate(ns)]
  x = jnp.asarray(_util.rng_array((1, k), 43, jnp.bfloat16))
  with jaxbnb.kernel_mode("interpret"):
    ys = jax.jit(F.matmul_4bit_group)(x, ws)
  assert calls == [ns]
  for y, (p, q) in zip(ys, ws):
    w = _util.kernel_weight(p, q, jnp.float32)  # the table's fp32 codes
    exact, bound = helpers.matmul_bound(np.asarray(x, np.float32), w,
                                        jnp.bfloat16)
    helpers.assert_within(y, exact, bound, f"q/k/v n={q.shape[0]}")
  assert not gk.lut_serves(1, (2048, 512, 512), 2048, 64, jnp.bfloat16,
                           True, 256, "code")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m", [1, 2, 8, 100])  # reduce, mma, one by one
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_group_forward_and_grad(m, dtype, mode):
  """q/k/v-like weights through one GEMV launch: each output as its own
  `matmul_4bit`'s (the GEMV's bound), dA summed over the weights."""
  k, ns = 192, (40, 24, 72)
  weights = [F.quantize_4bit(_w(n, k, 10 + i), quant_type="nf4",
                             compress_statistics=True)
             for i, n in enumerate(ns)]
  x = jnp.asarray(_util.rng_array((m, k), 3, dtype)).reshape(
      (1, m, k) if m > 1 else (m, k))
  gs = [jnp.asarray(_util.rng_array((*x.shape[:-1], n), 5 + n, jnp.float32))
        for n in ns]

  def loss(x, group):
    ys = (F.matmul_4bit_group(x, weights) if group else
          [F.matmul_4bit(x, p, qs) for p, qs in weights])
    return sum(jnp.sum(y.astype(jnp.float32) * g) for y, g in zip(ys, gs))

  with jaxbnb.kernel_mode(mode):
    ys = jax.jit(F.matmul_4bit_group)(x, weights)
    launches = str(jax.make_jaxpr(F.matmul_4bit_group)(x, weights)).count(
        "pallas_call")
    dx = jax.jit(jax.grad(loss), static_argnums=1)(x, True)
    dx_one = jax.jit(jax.grad(loss), static_argnums=1)(x, False)
    singles = [jax.jit(F.matmul_4bit)(x, p, qs) for p, qs in weights]
  if kernels.gemv_serves(m, sum(ns), x.shape[-1], dtype):
    assert launches == 1
  else:  # one by one: dequantize each (a kernel each) and multiply
    for y, y1 in zip(ys, singles):
      y, y1 = np.asarray(y, np.float32), np.asarray(y1, np.float32)
      if mode == "pallas":
        # XLA's GPU compiler may merge the group's dots that share x into
        # one GEMM (another accumulation order): rounding only, at most
        # about one unit of the output dtype's last place.
        ulp = 1e-5 if dtype == jnp.float32 else 2.0**-7
        np.testing.assert_allclose(y, y1, rtol=0,
                                   atol=ulp * float(np.abs(y1).max()))
      else:
        np.testing.assert_array_equal(y, y1)
  for y, (packed, qs), n in zip(ys, weights, ns):
    assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype
    _check_matmul(y, x, packed, qs, None, f"group y n={n}")
  # dA: the same products as one by one, summed in another order.
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(dx, np.float32),
                             np.asarray(dx_one, np.float32), rtol=tol,
                             atol=tol * float(jnp.abs(dx_one).max()))


def _swiglu_loss(x, weights, gs, fused):
  gate, up, down = weights
  if fused:
    y = F.matmul_4bit_swiglu(x, gate, up, down)
  else:
    g, u = F.matmul_4bit_group(x, [gate, up])
    y = F.matmul_4bit(jax.nn.silu(g) * u, *down)
  return jnp.sum(y.astype(jnp.float32) * gs), y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,n,n_out", [(1, 4096, 4096),  # fused at M = 1
                                       (2, 4096, 4096),  # composed
                                       (1, 2048, 1024)])  # down too small
def test_matmul_swiglu_is_the_three_matmuls(monkeypatch, mode, m, n, n_out):
  """`F.matmul_4bit_swiglu` as users call it (jitted, differentiated),
  with `gemv_4bit.SWIGLU_FUSED` on: its values and dA are bit for bit
  those of `matmul_4bit_group` of gate and up, `jax.nn.silu(g) * u`,
  `matmul_4bit` of down, which compile to the same kernels; at one row,
  where the table GEMV serves all three, it is one `gemv_swiglu`
  (interpreted on the CPU: the twins in the same order; compiled in
  tests/kernels/gemv_4bit_lut_test.py)."""
  from pallas_kernels import gemv_4bit_lut  # pylint: disable=g-import-not-at-top
  jax.clear_caches()  # see test_m1_routing_takes_the_table_kernel
  calls = []
  real = gemv_4bit_lut.gemv_swiglu
  monkeypatch.setattr(gemv_4bit_lut, "gemv_swiglu",
                      lambda *a, **kw: calls.append(kw["n"]) or real(*a, **kw))
  monkeypatch.setattr(gk, "SWIGLU_FUSED", True)  # the default
  k = 1024
  monkeypatch.setattr(gk, "LUT_MIN_K", k)  # a small k for the CPU
  weights = [F.quantize_4bit(_w(rows, cols, 60 + i, jnp.bfloat16),
                             quant_type="nf4", compress_statistics=True)
             for i, (rows, cols) in enumerate(((n, k), (n, k), (n_out, n)))]
  x = jnp.asarray(_util.rng_array((m, k), 61, jnp.bfloat16))
  gs = jnp.asarray(_util.rng_array((m, n_out), 62, jnp.float32))
  step = jax.jit(jax.value_and_grad(_swiglu_loss, has_aux=True),
                 static_argnums=3)
  with jaxbnb.kernel_mode(mode):
    (_, y), dx = step(x, weights, gs, True)
    (_, want), dx_want = step(x, weights, gs, False)
  fused = kernels.swiglu_serves(m, k, x.dtype, tuple(q for _, q in weights),
                                mode)
  assert fused == (m == 1 and n_out >= 4096)
  assert calls == ([n] if fused else []), calls
  assert y.shape == (m, n_out) and y.dtype == jnp.bfloat16
  y, want = np.asarray(y, np.float32), np.asarray(want, np.float32)
  if fused and mode == "pallas":
    # The GPU's ex2.approx may move an element of silu(g) * u by a unit
    # in the last place of bf16 from XLA's exp: a few ulps of the output.
    np.testing.assert_allclose(y, want, rtol=0,
                               atol=2.0**-6 * float(np.abs(want).max()))
  else:
    np.testing.assert_array_equal(y, want)
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.asarray(dx_want, np.float32))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("what", ["group", "swiglu"])
def test_matmul_rms_norm_fused_is_the_norm_then_the_matmuls(monkeypatch,
                                                           mode, what):
  """`rms_norm=(weight, eps)` on `F.matmul_4bit_group` (a layer's q/k/v)
  and `F.matmul_4bit_swiglu` (its MLP), jitted and differentiated: with
  `gemv_4bit.NORM_FUSED` on, the norm is made in the table GEMV's builds
  (one `gemv_group` with `rms_norm` a launch); interpreted, values and
  gradients (to A and the norm's weight) are bit for bit those of
  `rms_norm.reference` and then the matmuls, the path with the switch
  off."""
  from pallas_kernels import gemv_4bit_lut  # pylint: disable=g-import-not-at-top
  from pallas_kernels import rms_norm  # pylint: disable=g-import-not-at-top
  k = 1024
  monkeypatch.setattr(gk, "LUT_MIN_K", k)  # a small k for the CPU
  shapes = (((4096, k), (1024, k), (1024, k)) if what == "group" else
            ((4096, k), (4096, k), (4096, 4096)))
  weights = [F.quantize_4bit(_w(r, c, 80 + i, jnp.bfloat16),
                             quant_type="nf4", compress_statistics=True)
             for i, (r, c) in enumerate(shapes)]
  x = jnp.asarray(_util.rng_array((1, k), 81, jnp.bfloat16)) * 4
  nw = jnp.asarray(1 + 0.1 * _util.rng_array((k,), 82, jnp.float32),
                   jnp.bfloat16)
  outs = [r for r, _ in shapes] if what == "group" else [4096]
  gs = [jnp.asarray(_util.rng_array((1, n), 83 + n, jnp.float32))
        for n in outs]

  def loss(x, nw):
    if what == "group":
      ys = F.matmul_4bit_group(x, weights, rms_norm=(nw, 1e-5))
    else:
      ys = [F.matmul_4bit_swiglu(x, *weights, rms_norm=(nw, 1e-5))]
    return sum(jnp.sum(y.astype(jnp.float32) * g)
               for y, g in zip(ys, gs)), ys

  def step(x, nw):  # a new function a trace: the switches are read there
    return jax.jit(jax.value_and_grad(lambda *a: loss(*a), argnums=(0, 1),
                                      has_aux=True))(x, nw)

  jax.clear_caches()  # see test_m1_routing_takes_the_table_kernel
  calls = []
  # Interpreted, the builds are `gemv_group`'s twins; compiled, the launches
  # are `_compiled`'s (`gemv_swiglu` calls it for gate/up directly).
  spied, kwarg = (("gemv_group", "rms_norm") if mode == "interpret"
                  else ("_compiled", "norm"))
  real = getattr(gemv_4bit_lut, spied)
  monkeypatch.setattr(gemv_4bit_lut, spied, lambda *a, **kw: calls.append(
      kw.get(kwarg) is not None) or real(*a, **kw))
  with jaxbnb.kernel_mode(mode):
    monkeypatch.setattr(gk, "NORM_FUSED", False)  # the path with it off
    (_, want), dwant = step(x, nw)
    assert True not in calls
    monkeypatch.setattr(gk, "NORM_FUSED", True)  # the default
    monkeypatch.setattr(gk, "SWIGLU_FUSED", True)
    (_, ys), dgot = step(x, nw)
  assert calls.count(True) == 1, calls
  normed = rms_norm.reference(x, nw, 1e-5)
  if what == "group":  # the table GEMV's fp32 codes, as the q/k/v test
    for y, (p, q) in zip(ys, weights):
      exact, bound = helpers.matmul_bound(
          np.asarray(normed, np.float32),
          _util.kernel_weight(p, q, jnp.float32), jnp.bfloat16)
      helpers.assert_within(y, exact, bound, f"normed n={q.shape[0]}")
  pairs = list(zip(ys, want)) + list(zip(dgot, dwant))
  for a, b in pairs:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if mode == "pallas":  # the kernel's sum of squares and rsqrt
      np.testing.assert_allclose(a, b, rtol=0,
                                 atol=2.0**-5 * float(np.abs(b).max()))
    elif what == "swiglu":
      # Jitted whole, XLA may keep gate and up in fp32 (excess precision)
      # in one graph and round them to bf16 in the other: a few bf16
      # ulps of h apart, a fraction of a percent of y's scale.
      np.testing.assert_allclose(a, b, rtol=0,
                                 atol=2.0**-7 * float(np.abs(b).max()))
    else:
      np.testing.assert_array_equal(a, b)


def test_matmul_rms_norm_errors_name_the_argument():
  q = F.quantize_4bit(_w(32, 64, 1))
  x = jnp.ones((1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"rms_norm's weight must have shape "
                     r"\(64,\) \(A's K\), got \(32,\)"):
    F.matmul_4bit_group(x, [q], rms_norm=(jnp.ones((32,)), 1e-6))
  with pytest.raises(TypeError, match="`rms_norm` must be a .weight, eps. "
                     "pair, got Array"):
    F.matmul_4bit_swiglu(x, q, q, F.quantize_4bit(_w(8, 32, 2)),
                         rms_norm=jnp.ones((64,)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("m,n_out", [(1, 4096),   # fused: one add kernel
                                     (2, 4096),   # composed
                                     (1, 1024)])  # down too small
def test_matmul_swiglu_residual_is_the_add(monkeypatch, mode, m, n_out):
  """`residual=` on `F.matmul_4bit_swiglu` (a decoder layer's `x +
  mlp(x)`), jitted and differentiated: values bit for bit `residual + y`,
  the gradient to the residual the output's, to A unchanged; where the
  fused launches serve it, down's partials and the residual meet in one
  `split_sum.add_splits` (interpreted on the CPU)."""
  from pallas_kernels import split_sum  # pylint: disable=g-import-not-at-top
  jax.clear_caches()  # see test_m1_routing_takes_the_table_kernel
  calls = []
  real = split_sum.add_splits
  monkeypatch.setattr(split_sum, "add_splits", lambda *a, **kw: (
      calls.append(a[1].shape) or real(*a, **kw)))
  k, n = 1024, 4096
  monkeypatch.setattr(gk, "LUT_MIN_K", k)  # a small k for the CPU
  weights = [F.quantize_4bit(_w(rows, cols, 90 + i, jnp.bfloat16),
                             quant_type="nf4", compress_statistics=True)
             for i, (rows, cols) in enumerate(((n, k), (n, k), (n_out, n)))]
  x = jnp.asarray(_util.rng_array((m, k), 91, jnp.bfloat16))
  res = jnp.asarray(_util.rng_array((m, n_out), 92, jnp.bfloat16))
  gs = jnp.asarray(_util.rng_array((m, n_out), 93, jnp.float32))

  def loss(x, res, with_residual):
    if with_residual:
      y = F.matmul_4bit_swiglu(x, *weights, residual=res)
    else:
      y = res + F.matmul_4bit_swiglu(x, *weights)
    return jnp.sum(y.astype(jnp.float32) * gs), y

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True),
                 static_argnums=2)
  with jaxbnb.kernel_mode(mode):
    (_, y), grads = step(x, res, True)
    (_, want), grads_want = step(x, res, False)
    fused = kernels.swiglu_serves(m, k, x.dtype,
                                  tuple(q for _, q in weights), mode)
  assert fused == (m == 1 and n_out >= 4096)
  assert calls == ([(1, n_out)] if fused else []), calls
  assert y.shape == (m, n_out) and y.dtype == jnp.bfloat16
  helpers.assert_bits_equal(np.asarray(grads[1]),
                            np.asarray(gs.astype(jnp.bfloat16)))
  if mode == "interpret":
    helpers.assert_bits_equal(np.asarray(y), np.asarray(want))
    helpers.assert_bits_equal(np.asarray(grads[0]), np.asarray(grads_want[0]))
    return
  # Compiled whole, XLA may add y to the residual before rounding it to
  # bf16 (excess precision), where the kernel rounds it first: within a
  # unit in the last place of bf16 of the operands.
  y, want = np.asarray(y, np.float32), np.asarray(want, np.float32)
  scale = np.abs(want) + np.abs(np.asarray(res, np.float32))
  assert np.all(np.abs(y - want) <= 2.0**-7 * scale), np.abs(y - want).max()
  np.testing.assert_allclose(np.asarray(grads[0], np.float32),
                             np.asarray(grads_want[0], np.float32),
                             rtol=2.0**-6, atol=1e-6)


def test_matmul_swiglu_residual_errors_name_the_argument():
  gate, up = (F.quantize_4bit(_w(128, 64, i)) for i in range(2))
  down = F.quantize_4bit(_w(32, 128, 2))
  x = jnp.ones((2, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"`residual` must be bfloat16 \[2, "
                     r"32\] \(A's rows, down's N_out\), got bfloat16 "
                     r"\[2, 64\]"):
    F.matmul_4bit_swiglu(x, gate, up, down,
                         residual=jnp.ones((2, 64), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"got float32 \[2, 32\]"):
    F.matmul_4bit_swiglu(x, gate, up, down, residual=jnp.ones((2, 32)))


def test_matmul_swiglu_composes_when_switched_off(monkeypatch):
  """With `gemv_4bit.SWIGLU_FUSED` off (on by default since the H200
  measured it), even where the table GEMV serves the three weights,
  `F.matmul_4bit_swiglu` runs them apart."""
  from pallas_kernels import gemv_4bit_lut  # pylint: disable=g-import-not-at-top
  assert gk.SWIGLU_FUSED and gk.NORM_FUSED
  monkeypatch.setattr(gk, "SWIGLU_FUSED", False)
  jax.clear_caches()  # see test_m1_routing_takes_the_table_kernel
  calls = []
  monkeypatch.setattr(gemv_4bit_lut, "gemv_swiglu",
                      lambda *a, **kw: calls.append(1))
  k, n = 1024, 4096
  ws = [F.quantize_4bit(_w(r, c, 70 + i, jnp.bfloat16), quant_type="nf4",
                        compress_statistics=True)
        for i, (r, c) in enumerate(((n, k), (n, k), (n, n)))]
  x = jnp.asarray(_util.rng_array((1, k), 71, jnp.bfloat16))
  with jaxbnb.kernel_mode("interpret"):
    assert not kernels.swiglu_serves(1, k, x.dtype, tuple(q for _, q in ws))
    y = jax.jit(F.matmul_4bit_swiglu)(x, *ws)
  assert not calls and y.shape == (1, n)


def test_matmul_swiglu_errors_name_the_argument():
  gate, up = (F.quantize_4bit(_w(128, 64, i)) for i in range(2))
  down = F.quantize_4bit(_w(32, 128, 2))
  x = jnp.ones((1, 64), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"down's weight shape must be "
                     r"\[32, 128\] .*got \[32, 64\]"):
    F.matmul_4bit_swiglu(x, gate, up, F.quantize_4bit(_w(32, 64, 3)))
  with pytest.raises(ValueError, match=r"gate's weight shape must be "
                     r"\[128, 32\] \(A has K=32"):
    F.matmul_4bit_swiglu(jnp.ones((1, 32), jnp.bfloat16), gate, up, down)
  with pytest.raises(TypeError, match="`up` must be a .packed, QuantState. "
                     "pair, got Array"):
    F.matmul_4bit_swiglu(x, gate, up[0], down)
  with pytest.raises(TypeError, match="A"):
    F.matmul_4bit_swiglu(jnp.ones((1, 64), jnp.int32), gate, up, down)


@pytest.mark.parametrize("mode", MODES)
def test_matmul_group_of_unlike_weights_goes_one_by_one(mode):
  """Different block sizes cannot share a launch: the results are exactly
  those of one `matmul_4bit` per weight."""
  k = 256
  weights = [F.quantize_4bit(_w(32, k, 1), blocksize=64),
             F.quantize_4bit(_w(16, k, 2), blocksize=128)]
  x = jnp.asarray(_util.rng_array((1, k), 3, jnp.bfloat16))
  with jaxbnb.kernel_mode(mode):
    ys = jax.jit(F.matmul_4bit_group)(x, weights)
    singles = [jax.jit(F.matmul_4bit)(x, p, qs) for p, qs in weights]
  for y, y1 in zip(ys, singles):
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y1))


@pytest.mark.parametrize("mode", MODES)
def test_matmul_vmap_and_checkpoint(mode):
  n, k = 24, 128
  packed, qs = F.quantize_4bit(_w(n, k, 6), quant_type="fp4")
  xs = jnp.asarray(_util.rng_array((5, 2, k), 7, jnp.float32))
  with jaxbnb.kernel_mode(mode):
    y_v = jax.vmap(lambda x: F.matmul_4bit(x, packed, qs))(xs)
    remat = jax.checkpoint(lambda x: jnp.sum(F.matmul_4bit(x, packed, qs)))
    dx = jax.grad(remat)(xs[0])
    dx_jit = jax.jit(jax.grad(remat))(xs[0])
  # vmap of a [2, K] call: every row goes through the fused GEMV.
  _check_matmul(y_v, xs, packed, qs, None, "vmap")
  w_deq = np.asarray(F.dequantize_4bit(packed, qs))
  exact, bound = helpers.matmul_bound(np.ones((2, n)), w_deq.T, jnp.float32)
  helpers.assert_within(dx, exact, bound, "remat grad")
  helpers.assert_within(dx_jit, exact, bound, "jit remat grad")


def _mesh():
  """8 virtual CPU devices (conftest); on a GPU machine, its GPUs (<= 8)."""
  devices = jax.devices()
  assert _util.on_gpu() or len(devices) >= 8, (
      "the shard_map tests need the 8 virtual CPU devices tests/conftest.py "
      f"sets up; got {devices}")
  devices = devices[:8]
  return Mesh(np.asarray(devices), ("model",))


def _stacked_states(blocks, nested):
  """Quantizes each shard of the weight; stacks them on a leading axis."""
  parts = [F.quantize_4bit(b, quant_type="nf4", compress_statistics=nested)
           for b in blocks]
  packed = jnp.stack([p for p, _ in parts])
  qs = jax.tree.map(lambda *a: jnp.stack(a), *[s for _, s in parts])
  return packed, qs


def _local(a):
  return jax.tree.map(lambda v: v[0], a)


def _dequantized(packed, qs, shards, axis):
  return np.concatenate([np.asarray(F.dequantize_4bit(packed[i], _local(
      jax.tree.map(lambda v, i=i: v[i:i + 1], qs)))) for i in range(shards)],
                        axis=axis)


# Pallas' interpret mode cannot trace its grid loop under shard_map's
# check_vma (JAX 0.11: "Scan carry ... mismatched varying manual axes"), so
# kernels run there with check_vma=False, as JAX's own Pallas collectives
# do; the compiled kernels and the reference path keep the default check.
SHARD_MODES = [
    pytest.param("interpret", False, id="interpret"),
    pytest.param("pallas", True, id="pallas", marks=pytest.mark.gpu),
    pytest.param("reference", True, id="reference"),
]


@pytest.mark.parametrize("mode,check_vma", SHARD_MODES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("m", [2, 40])
def test_shard_map_column_parallel(nested, m, mode, check_vma):
  mesh = _mesh()
  shards = mesh.devices.size
  n, k = shards * 16, 256
  w = _w(n, k, 8)
  x = jnp.asarray(_util.rng_array((m, k), 9, jnp.float32))
  bias = jnp.asarray(_util.rng_array((n,), 10, jnp.float32))
  packed, qs = _stacked_states(jnp.split(w, shards, axis=0), nested)

  def shard(x, p, s, b):
    return F.matmul_4bit(x, _local(p), _local(s), b)

  f = jax.shard_map(shard, mesh=mesh,
                    in_specs=(P(), P("model"), P("model"), P("model")),
                    out_specs=P(None, "model"), check_vma=check_vma)
  with jaxbnb.kernel_mode(mode):
    y = jax.jit(f)(x, packed, qs, bias)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(f(x, packed, qs, bias) ** 2)))(x)
  w_deq = _dequantized(packed, qs, shards, 0)
  # float32 throughout: the GEMV's weight is the dequantized weight exactly.
  exact, bound = helpers.matmul_bound(x, w_deq, jnp.float32, bias=bias)
  helpers.assert_within(y, exact, bound, "y")
  # d/dx sum(y**2) = 2 y @ W, with y itself within `bound` of exact.
  dx_exact, dx_bound = helpers.matmul_bound(2 * exact, w_deq.T, jnp.float32)
  dx_bound = dx_bound + 2 * bound @ np.abs(w_deq)
  helpers.assert_within(dx, dx_exact, dx_bound, "dx")


@pytest.mark.parametrize("mode,check_vma", SHARD_MODES)
@pytest.mark.parametrize("m", [1, 24])
def test_shard_map_row_parallel(m, mode, check_vma):
  mesh = _mesh()
  shards = mesh.devices.size
  n, k = 48, shards * 128
  w = _w(n, k, 11)
  x = jnp.asarray(_util.rng_array((m, k), 12, jnp.float32))
  packed, qs = _stacked_states(jnp.split(w, shards, axis=1), True)

  def shard(x, p, s):
    return jax.lax.psum(F.matmul_4bit(x, _local(p), _local(s)), "model")

  f = jax.shard_map(shard, mesh=mesh,
                    in_specs=(P(None, "model"), P("model"), P("model")),
                    out_specs=P(), check_vma=check_vma)
  with jaxbnb.kernel_mode(mode):
    y = jax.jit(f)(x, packed, qs)
    dx = jax.jit(jax.grad(lambda x: jnp.sum(f(x, packed, qs))))(x)
  w_deq = _dequantized(packed, qs, shards, 1)
  # The psum of the per-shard float32 partial sums is just more additions:
  # the full-K bound covers it.
  exact, bound = helpers.matmul_bound(x, w_deq, jnp.float32)
  helpers.assert_within(y, exact, bound, "y")
  dx_exact, dx_bound = helpers.matmul_bound(np.ones((m, n)), w_deq.T,
                                            jnp.float32)
  helpers.assert_within(dx, dx_exact, dx_bound, "dx")


@pytest.mark.parametrize("mode", MODES)
def test_nnx_layer_uses_kernels(mode):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxbnb.nnx import Linear4bit  # pylint: disable=g-import-not-at-top
  layer = Linear4bit(128, 32, quant_type="nf4", rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(_util.rng_array((32,), 14, jnp.float32))
  x = jnp.asarray(_util.rng_array((2, 128), 13, jnp.float32))
  w = layer.weight.get_value()
  with jaxbnb.kernel_mode("reference"):
    y_ref = layer(x)
  with jaxbnb.kernel_mode(mode):
    assert _uses_pallas(lambda x: layer(x), x)
    y = nnx.jit(lambda m, x: m(x))(layer, x)
  bias = np.asarray(layer.bias[...])
  _check_matmul(y, x, w.data, w.quant_state, bias, "kernel")
  _check_matmul(y_ref, x, w.data, w.quant_state, bias, "reference",
                gemv=False)


@pytest.mark.gpu
def test_auto_mode_uses_kernels_on_gpu():
  assert dispatch.use_kernels("auto") == (True, False)
  assert dispatch.resolve("auto") == "pallas"
  w = _w(512, 1024, 14, jnp.bfloat16)
  x = jnp.asarray(_util.rng_array((1, 1024), 15, jnp.bfloat16))
  packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
  hlo = jax.jit(F.matmul_4bit).lower(x, packed, qs).as_text()
  assert "jaxbnb_gemv_4bit" in hlo or "__gpu$xla.gpu.triton" in hlo
  y = F.matmul_4bit(x, packed, qs)
  _check_matmul(y, x, packed, qs, None, "auto")
