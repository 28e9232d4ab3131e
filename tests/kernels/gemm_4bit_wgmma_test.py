"""The 4-bit wgmma GEMM (`pallas_kernels.gemm_4bit_wgmma`, Mosaic GPU).

On the CPU: the jnp twin against the documented weight (through
`F.matmul_4bit`, as users reach it, and directly), the decode's PTX
(`wgmma_decode`) run by a small emulator for all 128 lanes of a
warpgroup and read back through
Mosaic GPU's `WGMMA_LAYOUT` (the lane map, the byte gather and the decode
that only the GPU otherwise runs), the config errors and the dispatch
rule. `pytest -m gpu` runs the compiled kernel.
"""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb import functional as F
from jaxbnb._src.quant import codebooks
from jaxbnb._src.quant import kernels
from jaxbnb._src.quant import ops
from pallas_kernels import _backend
from pallas_kernels import gemm_4bit_wgmma as gw
from pallas_kernels import lut_decode
from pallas_kernels import wgmma_decode as wd
from tests import helpers
from tests.kernels import _util


def _code(quant_type):
  return tuple(float(c) for c in codebooks.code_for(quant_type))


def _weights(n, k, quant_type, seed, nested=True):
  w = jnp.asarray(_util.rng_array((n, k), seed, jnp.bfloat16))
  return F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                         compress_statistics=nested)


def _check(y, x, packed, qs, bias=None):
  """Within the fp32-accumulation bound of `x @ W.T` for the weight the
  kernel multiplies (code and absmax rounded to bf16, product rounded
  once, as the byte-permute GEMVs)."""
  w = _util.kernel_weight(packed, qs, x.dtype, in_dtype=True)
  exact, bound = helpers.matmul_bound(x, w, x.dtype, bias=bias)
  helpers.assert_within(y, exact, bound, "wgmma gemm")


@pytest.mark.parametrize("m,n,k,quant_type,nested,cfg", [
    (64, 128, 512, "nf4", True, dict(tile_w=64, tile_x=64, tile_k=128)),
    (40, 192, 256, "fp4", False, dict(tile_w=64, tile_x=64, tile_k=64)),
    (100, 256, 1024, "nf4", True, dict(tile_w=64, tile_x=128, tile_k=128,
                                       split=2, variant="ws")),
    (200, 128, 512, "fp4", True, dict(tile_w=128, tile_x=128, tile_k=64)),
    (16, 64, 512, "nf4", True, dict(tile_w=64, tile_x=16, tile_k=64,
                                    variant="ks")),
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_twin_matches_documented_weight(m, n, k, quant_type, nested, cfg,
                                        with_bias):
  packed, qs = _weights(n, k, quant_type, n + k, nested)
  x = jnp.asarray(_util.rng_array((m, k), m, jnp.bfloat16))
  bias = (jnp.asarray(_util.rng_array((n,), 3, jnp.bfloat16))
          if with_bias else None)
  y = gw.gemm(x, packed.reshape(-1), _stats(qs, nested),
              code=_code(quant_type), n=n, k=k, bias=bias, interpret=True,
              **cfg)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  _check(y, x, packed, qs, bias)
  if nested:  # the statistics decoded as `ops.float_absmax` does
    y_float = gw.gemm(x, packed.reshape(-1), ops.float_absmax(qs),
                      code=_code(quant_type), n=n, k=k, bias=bias,
                      interpret=True, **cfg)
    np.testing.assert_array_equal(np.asarray(y, np.float32),
                                  np.asarray(y_float, np.float32))


def _stats(qs, nested=True):
  """`gemm`'s absmax: the double-quantized statistics (decoded by the
  kernel), or float32."""
  if nested and qs.nested:
    return (qs.absmax, qs.nested_absmax, qs.nested_code, qs.offset)
  return ops.float_absmax(qs)


_TAIL_CFG = dict(tile_w=64, tile_x=256, tile_k=128, stages=2, variant="ws",
                 prefetch=True)


def test_tail_rows_run_apart_with_k_split(monkeypatch):
  """`tail_rows`: the weight's last rows in a launch of their own, K split
  as `_split_config` splits so few rows (here "ks" in 4), the rest as
  one launch would run them: the head's columns equal the one-launch
  product's, the whole within the bound of the kernel's weight."""
  monkeypatch.setattr(_backend, "num_sms", lambda: 8)
  n, k, m = 1152, 1024, 256
  packed, qs = _weights(n, k, "nf4", 5)
  x = jnp.asarray(_util.rng_array((m, k), 6, jnp.bfloat16))
  assert gw._tail_config(m, n, k, 128, 64, "ws", 1, 1, False)["split"] == 4  # pylint: disable=protected-access
  y = gw.gemm(x, packed.reshape(-1), _stats(qs), code=_code("nf4"), n=n,
              k=k, tail_rows=128, interpret=True, **_TAIL_CFG)
  one = gw.gemm(x, packed.reshape(-1), _stats(qs), code=_code("nf4"), n=n,
                k=k, interpret=True, **_TAIL_CFG)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y[:, :n - 128], np.float32),
                                np.asarray(one[:, :n - 128], np.float32))
  _check(y, x, packed, qs)


@pytest.mark.parametrize("tail_rows,kw,match", [
    (64, {}, "tail_rows: expected a multiple of 128 rows below n = 1152"),
    (1152, {}, "tail_rows: expected a multiple of 128 rows below n = 1152"),
    (128, dict(split=2), r"split 2"),
    (128, dict(bias=True), r"bias True"),
])
def test_tail_rows_refused_where_the_tail_cannot_run(tail_rows, kw, match):
  n, k = 1152, 1024
  packed, qs = _weights(n, k, "nf4", 5)
  cfg = dict(_TAIL_CFG, split=kw.get("split", 1))
  if cfg["split"] > 1:
    cfg.update(tile_k=64, prefetch=False)
  bias = jnp.zeros((n,), jnp.bfloat16) if kw.get("bias") else None
  if bias is not None:  # a float32 output tile: 64-column steps
    cfg.update(tile_k=64, prefetch=False)
  with pytest.raises(ValueError, match=match):
    gw.gemm(jnp.ones((256, k), jnp.bfloat16), packed.reshape(-1),
            _stats(qs), code=_code("nf4"), n=n, k=k, bias=bias,
            tail_rows=tail_rows, interpret=True, **cfg)


@pytest.mark.parametrize("m,n,k,sms,below,rows", [
    (256, 18944, 3584, 132, 0.5, 2048),  # 148 programs: a last wave of 16
    (128, 18944, 3584, 132, 0.5, 2048),
    (256, 18944, 3584, 132, None, 2048),  # TAIL_BELOW_FILL's 0.5
    (256, 18944, 3584, 132, 0.0, 0),     # 0 turns the tail off
    (64, 18944, 3584, 132, 0.5, 0),      # 64 x 3584 a program: too short
    (64, 11008, 4096, 132, 0.5, 0),      # 64 x 4096: too short
    (64, 10240, 8192, 132, 0.5, 1792),   # 64 x 8192: a last wave of 28
    (64, 20480, 7168, 132, 0.5, 3584),   # 64 x 7168: a last wave of 56
    (256, 14336, 4096, 132, 0.5, 0),     # 112 programs: one wave
    (256, 28672, 8192, 132, 0.5, 0),     # a last wave of 92: 70%
    (256, 24576, 3072, 132, 0.5, 0),     # the tail's 7680 rows take no split
    (512, 18944, 3584, 132, 0.5, 0),     # two x tiles
    (256, 18944, 3584, 114, 0.5, 0),     # 148 on 114 SMs: 30% filled
])
def test_tail_rows_for_a_thin_last_wave(m, n, k, sms, below, rows,
                                        monkeypatch):
  """`tail_rows_for`: a default config's last wave of programs, where it
  fills less than `below` of the GPU's SMs and one x tile holds M, runs
  as a tail with K split (by default below half of them:
  TAIL_BELOW_FILL); nowhere where `below` is 0."""
  monkeypatch.setattr(_backend, "num_sms", lambda: sms)
  cfg = gw.default_config(m, k=k, nested=True, n=n)
  assert gw.tail_rows_for(m, n, k, cfg, below) == rows


def _tail_spy(monkeypatch, sms):
  """The routing on `sms` SMs with TAIL_BELOW_FILL at 0.5 and programs of
  any size taking the tail; returns the list the `tail_rows` of each
  `gw.gemm` call will be appended to."""
  monkeypatch.setattr(_backend, "num_sms", lambda: sms)
  monkeypatch.setattr(gw, "TAIL_BELOW_FILL", 0.5)
  monkeypatch.setattr(gw, "TAIL_MIN_PROGRAM_SIZE", 0)
  seen = []
  real = gw.gemm

  def spy(*args, **kw):
    seen.append(kw["tail_rows"])
    return real(*args, **kw)

  monkeypatch.setattr(gw, "gemm", spy)
  return seen


def test_package_gemm_takes_the_tail(monkeypatch):
  """`kernels.gemm` (the matmul path's call) passes `tail_rows_for`'s rows
  to the kernel when TAIL_BELOW_FILL allows it: 81 programs of 128 rows
  on 8 SMs leave a last wave of one, run as 2 x 4 K splits; the product
  within the bound of the kernel's weight."""
  seen = _tail_spy(monkeypatch, 8)
  n, k, m = 10368, 1024, 256
  packed, qs = _weights(n, k, "nf4", 8)
  x = jnp.asarray(_util.rng_array((m, k), 9, jnp.bfloat16))
  y = kernels.gemm(x, packed, qs, None, None, "interpret")
  assert seen == [128]
  _check(y, x, packed, qs)


def test_prefetch_takes_plain_and_ws_only():
  packed, qs = _weights(64, 256, "nf4", 3)
  with pytest.raises(ValueError, match="prefetch: expected variant 'plain' "
                     "or 'ws', got 'ks'"):
    gw.gemm(jnp.ones((64, 256), jnp.bfloat16), packed.reshape(-1),
            _stats(qs), code=_code("nf4"), n=64, k=256, variant="ks",
            prefetch=True, interpret=True)


def test_nested_statistics_of_the_wrong_shape_are_refused():
  """The right number of codes in any shape is taken (`[n, k / 64]`, as
  some loaders keep them, equals the flat codes); a wrong count is refused
  naming the argument."""
  packed, qs = _weights(64, 256, "nf4", 3)
  x = jnp.ones((64, 256), jnp.bfloat16)
  flat, two_d = (gw.gemm(x, packed.reshape(-1), (codes, qs.nested_absmax,
                                                  qs.nested_code, qs.offset),
                         code=_code("nf4"), n=64, k=256, interpret=True)
                 for codes in (qs.absmax, qs.absmax.reshape(64, 4)))
  np.testing.assert_array_equal(np.asarray(flat, np.float32),
                                np.asarray(two_d, np.float32))
  with pytest.raises(ValueError, match=r"absmax: expected 256 codes .*got "
                     r"shapes \(255,\)"):
    gw.gemm(x, packed.reshape(-1), (qs.absmax[:-1], qs.nested_absmax,
                                    qs.nested_code, qs.offset),
            code=_code("nf4"), n=64, k=256, interpret=True)


def test_matmul_4bit_routes_large_m_through_the_gemm():
  """`F.matmul_4bit` (and the group call, weight by weight) under the
  interpret mode: M = 64-256 on a weight of GEMM_MIN_N rows takes the
  wgmma GEMM, and its products are the kernel's weight's; M = 63 and 257
  do not."""
  n, k = kernels.GEMM_MIN_N, 128
  packed, qs = _weights(n, k, "nf4", 7)
  for m, served in ((63, False), (64, True), (150, True), (256, True),
                    (257, False)):
    assert kernels.gemm_serves(m, n, k, jnp.bfloat16, qs, "interpret") is served
  x = jnp.asarray(_util.rng_array((3, 50, k), 5, jnp.bfloat16))  # M = 150
  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_4bit(x, packed, qs)
    ys = F.matmul_4bit_group(x, [(packed, qs), (packed, qs)])
    assert not kernels.can_group(150, k, jnp.bfloat16, (qs, qs))
  assert y.shape == (3, 50, n)
  _check(y.reshape(150, n), x.reshape(150, k), packed, qs)
  np.testing.assert_array_equal(np.asarray(ys[0], np.float32),
                                np.asarray(y, np.float32))


@pytest.mark.parametrize("m,n,k,blocksize,dtype,mode,served", [
    (128, 14336, 4096, 64, jnp.bfloat16, "interpret", True),
    (256, 14336, 4096, 64, jnp.bfloat16, "interpret", True),
    (128, 4096, 4096, 64, jnp.bfloat16, "interpret", True),    # K split
    (64, 4096, 14336, 64, jnp.bfloat16, "interpret", True),    # K split
    (256, 4096, 4096, 64, jnp.bfloat16, "interpret", True),    # K split
    (256, 1024, 4096, 64, jnp.bfloat16, "interpret", True),    # K split
    (64, 1024, 4096, 64, jnp.bfloat16, "interpret", True),     # K split
    (256, 6144, 4096, 64, jnp.bfloat16, "interpret", True),    # one wave
    (256, 8192, 4096, 64, jnp.bfloat16, "interpret", True),    # one wave
    (256, 9216, 4096, 64, jnp.bfloat16, "interpret", False),   # M > 128
    (128, 9216, 4096, 64, jnp.bfloat16, "interpret", True),    # K split
    (128, 512, 4096, 64, jnp.bfloat16, "interpret", False),    # too few rows
    (128, 4096, 2048, 64, jnp.bfloat16, "interpret", True),    # K split
    (64, 3584, 3584, 64, jnp.bfloat16, "interpret", True),     # K split
    (256, 3584, 3584, 64, jnp.bfloat16, "interpret", True),    # K split
    (128, 4096, 3072, 64, jnp.bfloat16, "interpret", True),    # K split
    (64, 8192, 3072, 64, jnp.bfloat16, "interpret", True),     # K split
    (256, 2048, 2048, 64, jnp.bfloat16, "interpret", True),    # K split
    (64, 5632, 2048, 64, jnp.bfloat16, "interpret", True),     # K split
    (64, 2048, 1536, 64, jnp.bfloat16, "interpret", True),     # K split
    (128, 8960, 1536, 64, jnp.bfloat16, "interpret", True),    # K split
    (128, 2048, 1024, 64, jnp.bfloat16, "interpret", False),   # K short
    (256, 4096, 1024, 64, jnp.bfloat16, "interpret", False),   # K short
    (64, 512, 2048, 64, jnp.bfloat16, "interpret", False),     # too few rows
    (128, 14336, 4096, 128, jnp.bfloat16, "interpret", False),  # blocksize
    (128, 14336, 4096, 64, jnp.float16, "interpret", False),   # dtype
    (128, 14336, 4096, 64, jnp.bfloat16, "reference", False),
    (128, 14400, 4096, 64, jnp.bfloat16, "interpret", False),  # n % 128
])
def test_gemm_serves(m, n, k, blocksize, dtype, mode, served):
  qs = F.QuantState(absmax=jnp.zeros((1,)), code=jnp.zeros((16,)),
                    shape=(n, k), blocksize=blocksize, quant_type="nf4",
                    dtype=jnp.dtype(dtype).name)
  assert kernels.gemm_serves(m, n, k, dtype, qs, mode) is served


def _nested_state(n, k, nested=True):
  """A QuantState of `[n, k]` with (or without) the double quantization's
  fields: what the routing reads."""
  return F.QuantState(absmax=jnp.zeros((1,)), code=jnp.zeros((16,)),
                      shape=(n, k), blocksize=64, quant_type="nf4",
                      dtype="bfloat16",
                      **(dict(nested_absmax=jnp.zeros((1,)),
                              nested_code=jnp.zeros((256,)),
                              offset=jnp.zeros(())) if nested else {}))


@pytest.mark.parametrize("m,n,nested,bias,served", [
    (512, 14336, True, False, True),    # 224 programs, 2 waves of 132
    (768, 14336, True, False, True),
    (1024, 4096, True, False, True),    # 128 programs: one wave
    (768, 11008, True, False, True),    # 258
    (1024, 11008, True, False, True),   # 344 in 3 waves
    (512, 11008, True, False, False),   # 172 in 2 waves: 65% filled
    (512, 4096, True, False, False),    # 64 programs
    (768, 4096, True, False, False),    # 96: 73%
    (456, 14336, True, False, True),    # 512 padded rows: 9/8 of 456
    (455, 14336, True, False, False),   # more than 9/8
    (300, 14336, True, False, False),   # would run as 512
    (257, 14336, True, False, False),
    (1025, 14336, True, False, False),  # past GEMM_LARGE_MAX_M
    (4096, 14336, True, False, False),  # dequantize + dot wins there
    (512, 2048, True, False, False),    # too few rows
    (512, 14336, False, False, False),  # plain absmax: not measured
    (512, 14336, True, True, False),    # a bias: not measured
])
def test_gemm_serves_past_256_rows(m, n, nested, bias, served, monkeypatch):
  """Past GEMM_MAX_M the GEMM takes up to GEMM_LARGE_MAX_M rows where
  their 256-row tiles pad them by at most an eighth, on double-quantized
  weights of GEMM_LARGE_MIN_N rows or more without a bias, where its
  programs (128 weight rows by 256 of x) fill at least 80% of their waves
  of 132 SMs (the forty-sixth session's sweep run t and `bench matmul`);
  elsewhere dequantize + dot stays."""
  monkeypatch.setattr(_backend, "num_sms", lambda: 132)
  k = 4096
  qs = _nested_state(n, k, nested)
  assert qs.nested is nested
  assert kernels.gemm_large_m(m, n, qs, bias) is served
  assert kernels.gemm_serves(m, n, k, jnp.bfloat16, qs, "interpret",
                             bias) is served
  if served:  # unsplit, x's 256-row tile, the scale words made ahead
    cfg = gw.default_config(m, bias, k, nested=True, n=n)
    assert (cfg["variant"], cfg["tile_x"], cfg["tile_k"], cfg["split"],
            cfg["prefetch"]) == ("ws", 256, 128, 1, True)


@pytest.mark.parametrize("m,n,served", [
    (1024, 4096, False),   # 128 programs: 56% of two waves of 114
    (512, 14336, True),    # 224: 98% of two waves
    (768, 11008, False),   # 258: 75% of three waves
    (1024, 11008, False),  # 344: 75% of four waves
    (768, 14336, True),    # 336: 98% of three waves
])
def test_gemm_past_256_rows_counts_the_gpus_sms(m, n, served, monkeypatch):
  """The wave rule counts the device's SMs (`_backend.num_sms`): on an
  H100 PCIe's 114 a 4096-row weight at M = 1024 (128 programs) would
  leave a second wave of 14 programs, so it stays on dequantize + dot,
  where 132 SMs take it in one wave."""
  monkeypatch.setattr(_backend, "num_sms", lambda: 114)
  assert kernels.gemm_large_m(m, n, _nested_state(n, 4096)) is served


def test_matmul_4bit_takes_the_gemm_past_256_rows(monkeypatch):
  """`F.matmul_4bit` at M = 1024 (a prefill of 4 x 256 tokens) on a
  4096-row double-quantized weight runs the wgmma GEMM unsplit with the
  statistics, and its product is the kernel weight's; at M = 512 (64
  programs) and 600 (padded to 768) it dequantizes and multiplies with
  XLA's dot."""
  n, k = 4096, 128
  packed, qs = _weights(n, k, "nf4", 15)
  seen = _spy_on_gemm(monkeypatch)
  x = jnp.asarray(_util.rng_array((4, 256, k), 16, jnp.bfloat16))
  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_4bit(x, packed, qs)
    F.matmul_4bit(x[:2], packed, qs)
    F.matmul_4bit(x[:, :150], packed, qs)
  assert [(stats, kw["variant"], kw["tile_x"], kw["split"])
          for stats, kw in seen] == [(True, "ws", 256, 1)]
  assert y.shape == (4, 256, n)
  _check(y.reshape(1024, n), x.reshape(1024, k), packed, qs)


def test_default_config_splits_few_rows(monkeypatch):
  """Below SPLIT_BELOW_N rows, at M <= 128, K splits as many ways as
  keep the programs within one wave of the GPU's SMs (132 here): "ks" (64 rows a
  program) at M <= 64, "ws" (128) above; at M = 129-256 on at most
  SPLIT_WIDE_MAX_N rows, x's 256-row tile in "plain" split 2 (4096
  rows), unsplit (6144 and 8192 rows: one program an SM) or "ks" split
  8 (1024); the steps narrow where K does not take the split or would give a warpgroup a single step, and
  no more steps are in flight than a program has; every such default
  passes `check_config` and fits shared memory. Larger weights keep
  theirs."""
  monkeypatch.setattr(_backend, "num_sms", lambda: 132)
  cfg = gw.default_config(64, k=4096, n=4096)
  assert (cfg["variant"], cfg["tile_k"], cfg["split"]) == ("ks", 256, 2)
  cfg = gw.default_config(128, k=14336, n=4096)
  assert (cfg["variant"], cfg["tile_k"], cfg["split"]) == ("ws", 128, 4)
  cfg = gw.default_config(64, k=11008, n=4096)
  assert (cfg["tile_k"], cfg["stages"], cfg["split"]) == (64, 4, 2)
  assert gw.default_config(64, k=4096, n=2048)["split"] == 4
  assert gw.default_config(64, k=4096, n=8192)["split"] == 1
  assert gw.default_config(64, k=4096, n=6144)["split"] == 1
  assert gw.default_config(64, k=4096, n=3072)["split"] == 2
  cfg = gw.default_config(128, k=4096, n=6144)
  assert (cfg["variant"], cfg["split"]) == ("ws", 2)
  assert gw.default_config(64, k=4096, n=14336) == gw.default_config(
      64, k=4096)
  cfg = gw.default_config(64, k=4096, n=1024)
  assert (cfg["variant"], cfg["tile_k"], cfg["stages"], cfg["split"]) == (
      "ks", 128, 2, 8)
  cfg = gw.default_config(128, k=4096, n=1024)
  assert (cfg["variant"], cfg["tile_k"], cfg["stages"], cfg["split"]) == (
      "ws", 128, 2, 16)
  for m in (200, 256):
    cfg = gw.default_config(m, k=14336, n=4096, nested=True)
    assert (cfg["variant"], cfg["tile_x"], cfg["tile_k"], cfg["split"],
            cfg["prefetch"]) == ("plain", 256, 128, 2, True)
    cfg = gw.default_config(m, k=4096, n=1024)
    assert (cfg["variant"], cfg["tile_x"], cfg["tile_k"], cfg["split"]) == (
        "ks", 256, 64, 8)
  for n in (6144, 8192):
    cfg = gw.default_config(256, k=4096, n=n, nested=True)
    assert (cfg["variant"], cfg["tile_x"], cfg["tile_k"], cfg["stages"],
            cfg["split"], cfg["prefetch"]) == ("plain", 256, 128, 2, 1, True)
  assert gw.default_config(256, k=4096, n=2048)["split"] == 4
  assert gw.default_config(256, k=4096, n=9216) == gw.default_config(
      256, k=4096)
  for m, n, k, out_f32 in itertools.product(
      (64, 100, 128, 200, 256), (1024, 2048, 3072, 4096, 5120, 6144, 8192),
      (4096, 11008, 14336), (False, True)):
    cfg = gw.default_config(m, out_f32, k, n=n)
    gw.check_config(m, n, k, jnp.bfloat16, out_f32=out_f32,
                    **{a: cfg[a] for a in ("tile_w", "tile_x", "tile_k",
                                           "split", "stages", "variant")})
    assert gw.can_use(m, n, k, 64, jnp.bfloat16, out_f32)


@pytest.mark.parametrize("m,n,k,expected", [
    # Gemma-2-2B's K = 2304 (9 x 256): 3, 6, 9 and 12 ways fill the SMs
    # where powers of two took 2 ("ks") or 4 ("ws").
    (64, 1024, 2304, ("ks", 6, 64, 3)),
    (128, 1024, 2304, ("ws", 12, 64, 3)),
    (256, 1024, 2304, ("ks", 6, 64, 2)),
    (64, 2048, 2304, ("ks", 3, 128, 3)),
    (64, 2304, 2304, ("ks", 3, 128, 3)),
    (128, 2304, 2304, ("ws", 6, 128, 3)),
    (256, 2304, 2304, ("ks", 3, 64, 2)),  # 3 ways take "ks", not "plain"
    (64, 2304, 9216, ("ks", 3, 256, 2)),
    (128, 5120, 13824, ("ws", 3, 128, 3)),
    # A way K does not take is not counted: 2560 rows at M = 256 stay in
    # "plain" split 2 (3 ways would fit the SMs, but 2560 = 5 x 512).
    (256, 2560, 2560, ("plain", 2, 128, 2)),
    # Powers of two where they divide K: as before.
    (64, 1024, 4096, ("ks", 8, 128, 2)),
    (128, 3072, 3072, ("ws", 4, 128, 3)),
    (64, 1536, 8960, ("ks", 2, 64, 4)),
])
def test_default_config_splits_k_ways_not_powers_of_two(monkeypatch, m, n, k,
                                                        expected):
  """K splits as many ways of SPLIT_WAYS (3, 6, 9, 12 among them) as keep
  the programs within one wave of the SMs (132 here) and that K takes in
  64-column steps, each way with the widest steps that give a warpgroup
  two; every such default passes `check_config`."""
  monkeypatch.setattr(_backend, "num_sms", lambda: 132)
  cfg = gw.default_config(m, k=k, n=n, nested=True)
  assert (cfg["variant"], cfg["split"], cfg["tile_k"], cfg["stages"]) == (
      expected)
  for out_f32 in (False, True):
    gw.check_config(m, n, k, jnp.bfloat16, out_f32=out_f32,
                    **{a: cfg[a] for a in ("tile_w", "tile_x", "tile_k",
                                           "split", "stages", "variant")})


def test_default_split_configs_pass_check_config(monkeypatch):
  """Every K-split default on weights of 1024-8192 rows and K of 1536-
  14336 (powers of two and multiples of 3, 5, 7 and 9 of 256) is one the
  kernel takes, with a float32 output, within shared memory."""
  monkeypatch.setattr(_backend, "num_sms", lambda: 132)
  for m, n, k in itertools.product(
      (64, 100, 128, 200, 256), (1024, 1536, 2048, 2304, 2560, 3072, 5120,
                                 8192),
      (1536, 2048, 2304, 2560, 3584, 4608, 6912, 8960, 9216, 14336)):
    cfg = gw.default_config(m, k=k, n=n, nested=True)
    assert cfg["split"] in gw.SPLIT_WAYS
    gw.check_config(m, n, k, jnp.bfloat16, out_f32=True,
                    **{a: cfg[a] for a in ("tile_w", "tile_x", "tile_k",
                                           "split", "stages", "variant")})
    rows = cfg["tile_w"] * (2 if cfg["variant"] == "ws" else 1)
    assert cfg["split"] == 1 or n // rows * cfg["split"] <= 132


def test_pallas_mode_needs_hopper():
  """On a machine without a Hopper GPU the "pallas" mode never picks it."""
  qs = F.QuantState(absmax=jnp.zeros((1,)), code=jnp.zeros((16,)),
                    shape=(14336, 4096), blocksize=64, quant_type="nf4",
                    dtype="bfloat16")
  assert kernels.gemm_serves(128, 14336, 4096, jnp.bfloat16, qs,
                             "pallas") is gw.on_hopper()


@pytest.mark.parametrize("kwargs,match", [
    (dict(tile_w=32), "tile_w: expected 64 or 128, got 32"),
    (dict(tile_x=96), "tile_x: expected 16, 32, 64, 128, 192 or 256, got 96"),
    (dict(tile_k=32), "tile_k: expected 64, 128 or 256, got 32"),
    (dict(split=3), r"k: expected a multiple of tile_k x split \(64 x 3\)"),
    (dict(variant="async"),
     "variant: expected 'plain', 'ws' or 'ks', got 'async'"),
    (dict(variant="ks", tile_k=128, split=4),
     r"k: expected a multiple of tile_k x split x 2 \(variant ks\)"),
    (dict(variant="ws", tile_w=128), r"n: expected a multiple of 256 "),
    (dict(stages=0), "stages: expected >= 1, got 0"),
    (dict(cluster=2), r"cluster: expected 1, or 2 or 4 with variant 'ws' or "
     r"'ks', got 2 \(variant 'plain'\)"),
    (dict(cluster=4, variant="ks"),
     r"n: expected a multiple of 256 \(tile_w 64, variant 'ks', cluster 4\)"),
    (dict(tile_x=256, stages=6, variant="ws"),
     "stages: 6 steps of tiles .* need .* bytes of shared memory"),
])
def test_config_errors_name_the_argument(kwargs, match):
  n, k = 128, 512
  with pytest.raises(ValueError, match=match):
    gw.gemm(jnp.ones((64, k), jnp.bfloat16), jnp.zeros((n * k // 2,),
                                                        jnp.uint8),
            jnp.ones((n * k // 64,)), code=_code("nf4"), n=n, k=k,
            interpret=True, **kwargs)


def test_float32_x_is_refused():
  with pytest.raises(ValueError, match="x: the wgmma kernel takes bfloat16, "
                     "got float32"):
    gw.gemm(jnp.ones((64, 64)), jnp.zeros((64 * 32,), jnp.uint8),
            jnp.ones((64,)), code=_code("nf4"), n=64, k=64, interpret=True)


def test_smem_estimate_matches_mosaic():
  """`smem_bytes` against what Mosaic GPU reported on the H200 for two
  configs with a float32 output (284720 and 280624 bytes, 48 of them
  barriers): the defaults fit with a bias, with and without."""
  assert gw.smem_bytes(128, 128, 128, 3, "ws", True) == 284720 - 48
  assert gw.smem_bytes(64, 256, 64, 4, "ws", True) > gw.SMEM_LIMIT
  for m in (64, 128, 256):
    for out_f32 in (False, True):
      c = gw.default_config(m, out_f32)
      assert gw.smem_bytes(c["tile_w"], c["tile_x"], c["tile_k"],
                           c["stages"], c["variant"], out_f32) <= gw.SMEM_LIMIT


def test_default_config_follows_k():
  """M <= 64 takes steps of 256 columns where K allows, else 128, and so
  does M = 65-128 when the kernel decodes the double quantization (no
  float32 output); M = 129-256 with the statistics steps 128 columns
  (64 where K is not a multiple of 128) and makes the scale words a step
  ahead; every default fits shared memory and is taken by `can_use`."""
  assert gw.default_config(64, k=4096)["tile_k"] == 256
  assert gw.default_config(64, k=384)["tile_k"] == 128
  assert gw.default_config(64)["tile_k"] == 256
  assert gw.default_config(128, k=4096)["tile_k"] == 128
  assert gw.default_config(128, k=4096, nested=True)["tile_k"] == 256
  assert gw.default_config(100, k=384, nested=True)["tile_k"] == 128
  assert gw.default_config(128, True, 4096, nested=True)["tile_k"] == 128
  wide = gw.default_config(256, k=4096, nested=True)
  assert (wide["tile_k"], wide["stages"], wide["prefetch"]) == (128, 2, True)
  narrow = gw.default_config(129, k=320, nested=True)
  assert (narrow["tile_k"], narrow["stages"], narrow["prefetch"]) == (64, 4,
                                                                      True)
  assert "prefetch" not in gw.default_config(256, True, 4096, nested=True)
  assert "prefetch" not in gw.default_config(256, k=4096)
  for m, k, out_f32 in itertools.chain(
      itertools.product((65, 128, 129, 256), (4096, 384), (False, True)),
      [(129, 320, False), (256, 320, True)]):
    cfg = gw.default_config(m, out_f32, k, nested=True)
    gw.check_config(m, 10240, k, jnp.bfloat16, out_f32=out_f32,
                    **{a: cfg[a] for a in ("tile_w", "tile_x", "tile_k",
                                           "split", "stages", "variant")})
    assert gw.smem_bytes(cfg["tile_w"], cfg["tile_x"], cfg["tile_k"],
                         cfg["stages"], cfg["variant"],
                         out_f32) <= gw.SMEM_LIMIT
  for m, k in ((64, 4096), (64, 384), (128, 384), (256, 4096)):
    assert gw.can_use(m, 10240, k, 64, jnp.bfloat16)
    assert gw.can_use(m, 10240, k, 64, jnp.bfloat16, out_f32=True)
  assert not gw.can_use(64, 10240, 192, 64, jnp.bfloat16)


def test_docstring_example_runs():
  helpers.assert_docstring_examples_pass(gw.gemm, "gemm")


_MASK32 = np.uint64(0xFFFFFFFF)


def _f32(u):
  return (u & _MASK32).astype(np.uint32).view(np.float32)


def _u64(f):
  return np.asarray(f, np.float32).view(np.uint32).astype(np.uint64)


def _emulate(text, nreg, smem, operands, gmem=b"", wide_out=False):
  """Runs the decode PTX for the 128 lanes of a warpgroup on numpy
  registers (64 bits wide; 32-bit instructions keep the low half);
  returns `[nreg, 128]` uint32 (operand i of every lane). `operands`:
  the input operands `$(nreg + i)` by i (shared addresses into `smem`,
  global ones into `gmem`, both bytes; an operand may be an array, one
  value a lane). `wide_out`: the outputs as 64-bit words."""
  lanes = np.arange(128, dtype=np.uint64)
  env = {"%tid.x": lanes}
  env.update({f"${nreg + i}": np.broadcast_to(np.asarray(v, np.uint64), 128)
              for i, v in operands.items()})
  mems = {"shared": np.frombuffer(np.asarray(smem).tobytes(), np.uint8),
          "global": np.frombuffer(bytes(gmem), np.uint8)}

  def val(tok):
    tok = tok.strip()
    if tok in env:
      return env[tok]
    if tok.startswith("0f"):  # a float literal's bits
      return np.full(128, int(tok[2:], 16), np.uint64)
    return np.full(128, int(tok, 0), np.uint64)

  def load(space, addr, size):
    mem = mems[space]
    assert np.all(addr % size == 0) and np.all(addr + size <= mem.size), space
    out = np.zeros(128, np.uint64)
    for b in range(size):
      out |= mem[(addr + b).astype(np.int64)].astype(np.uint64) << np.uint64(
          8 * b)
    return out

  for line in text.splitlines():
    line = line.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    op, rest = line.split(None, 1)
    if op.startswith(("ld.shared", "ld.global.nc")):
      m = re.match(r"(\{[^}]*\}|\S+),\s*\[(\S+?)(?:\+(\d+))?\]", rest)
      regs = [r.strip() for r in m.group(1).strip("{}").split(",")]
      base = env[m.group(2)] + np.uint64(int(m.group(3) or 0))
      size = {".u8": 1, "u16": 2}.get(op[-3:], 4)
      for i, r in enumerate(regs):
        env[r] = load("shared" if op.startswith("ld.shared") else "global",
                      base + np.uint64(size * i), size)
      continue
    if op == "mov.b64" and "{" in rest:  # pack two words, or unpack
      m = re.match(r"(\{[^}]*\}|\S+),\s*(\{[^}]*\}|\S+)", rest)
      dst, srcs = m.group(1), m.group(2)
      if dst.startswith("{"):
        lo, hi = (r.strip() for r in dst.strip("{}").split(","))
        env[lo], env[hi] = env[srcs] & _MASK32, env[srcs] >> np.uint64(32)
      else:
        lo, hi = (val(r) for r in srcs.strip("{}").split(","))
        env[dst] = (lo & _MASK32) | (hi << np.uint64(32))
      continue
    args = [a.strip() for a in rest.split(",")]
    d, src = args[0], [val(a) for a in args[1:]]
    wide = op.endswith(("64", ".wide.u32"))
    if op.startswith("mov"):
      r = src[0].copy()
    elif op.startswith("and"):
      r = src[0] & src[1]
    elif op.startswith("or"):
      r = src[0] | src[1]
    elif op.startswith("xor"):
      r = src[0] ^ src[1]
    elif op.startswith("shr"):
      r = (src[0] & (~np.uint64(0) if wide else _MASK32)) >> src[1]
    elif op.startswith("shl"):
      r = src[0] << src[1]
    elif op.startswith(("mul.lo", "mul.wide.u32")):
      r = (src[0] & _MASK32) * (src[1] & _MASK32)
    elif op.startswith("add.rn.f32"):
      r = _u64(_f32(src[0]) + _f32(src[1]))
    elif op.startswith("mul.rn.f32"):
      r = _u64(_f32(src[0]) * _f32(src[1]))
    elif op.startswith("add"):
      r = src[0] + src[1]
    elif op.startswith("sub"):
      r = src[0] - src[1]
    elif op.startswith("mad.lo"):
      r = src[0] * src[1] + src[2]
    elif op == "cvt.u32.u64":
      r = src[0] & _MASK32
    elif op == "cvt.rn.bf16x2.f32":  # d = {a, b}: a in the high half
      hi, lo = (np.asarray(jnp.asarray(_f32(v)).astype(jnp.bfloat16).view(
          jnp.uint16)).astype(np.uint64) for v in src)
      r = (hi << np.uint64(16)) | lo
    elif op.startswith("prmt"):
      r = lut_decode._prmt(*(v.astype(np.uint32) for v in src)).astype(  # pylint: disable=protected-access
          np.uint64)
    elif op == "fma.rn.bf16x2":  # x * s + (-0): the product rounded once
      r = lut_decode._mul_pairs(src[0].astype(np.uint32),  # pylint: disable=protected-access
                                src[1].astype(np.uint32),
                                jnp.bfloat16).astype(np.uint64)
    else:
      raise AssertionError(f"emulator: unknown instruction {line!r}")
    env[d] = r if wide else r & _MASK32
  out = np.stack([env[f"${i}"] for i in range(nreg)])
  return out if wide_out else out.astype(np.uint32)


def _swizzled(packed):
  """`[rows, b]` bytes as TMA's b-byte swizzle stores them: address bits
  4.. XOR bits 7.. (16-byte chunks of a row permuted by the row)."""
  rows, b = packed.shape
  off = np.arange(rows * b).reshape(rows, b)
  mask = b // 16 - 1
  dst = off ^ (((off >> 7) & mask) << 4)
  out = np.empty(rows * b, np.uint8)
  out[dst.reshape(-1)] = packed.reshape(-1)
  return out


@pytest.mark.parametrize("tile_w,tile_k,quant_type,swizzle,load_table", [
    (64, 64, "nf4", False, False), (64, 128, "fp4", False, False),
    (128, 128, "nf4", False, False), (64, 256, "nf4", False, False),
    (64, 64, "nf4", True, True), (64, 128, "fp4", True, False),
    (128, 128, "nf4", False, True), (128, 256, "fp4", True, True)])
def test_decode_ptx_fills_wgmma_registers(tile_w, tile_k, quant_type,
                                          swizzle, load_table):
  """The decode's PTX, emulated lane by lane, leaves in operand
  `(i * tile_k / 8 + j) * 2 + h` of lane `32 w + 4 g + c` the bf16 pair of
  row `64 i + 16 w + 8 h + g`, columns `8 j + 2 c` and `+ 1`: Mosaic GPU's
  `WGMMA_LAYOUT` (the order `inline_mgpu` hands it over in), each value the
  code times the block's bf16 absmax, rounded once. With `swizzle` the
  bytes sit as TMA's swizzle puts them; with `load_table` half the table
  words come from global memory (`table_operands`), the others are
  constants."""
  rng = np.random.default_rng(tile_w + tile_k)
  packed = rng.integers(0, 256, (tile_w, tile_k // 2), dtype=np.uint8)
  absmax = rng.uniform(0.1, 3.0, (tile_w, tile_k // 64)).astype(np.float32)
  scales = np.asarray(lut_decode.scale_words(jnp.asarray(absmax.T),
                                             jnp.bfloat16), np.uint32)
  stored = _swizzled(packed) if swizzle else packed.reshape(-1)
  smem = np.concatenate([stored, scales.reshape(-1).view(np.uint8)])
  nreg = tile_w // 64 * tile_k // 8 * 2
  text = wd.decode_ptx(_code(quant_type), tile_w, tile_k, swizzle=swizzle,
                       load_table=load_table)
  assert ("ld.global" in text) == load_table
  out = _emulate(text, nreg, smem, {0: 0, 1: packed.size, 2: 0},
                 wd.table_operands(_code(quant_type)).tobytes())
  np.testing.assert_array_equal(_read_back(out, tile_w, tile_k),
                                _decoded(packed, absmax, quant_type))


def _read_back(out, tile_w, cols):
  """`[tile_w, cols]` float32 values of the decode's operands `out`
  (`[nreg, 128]`) through `WGMMA_LAYOUT`."""
  got = np.zeros((tile_w, cols), np.float32)
  lane = np.arange(128)
  w, g, c = lane // 32, lane % 32 // 4, lane % 4
  for i in range(tile_w // 64):
    for j in range(cols // 8):
      for h in range(2):
        pair = out[(i * cols // 8 + j) * 2 + h]
        lo, hi = lut_decode.split_pairs(jnp.asarray(pair), jnp.bfloat16)
        rows = 64 * i + 16 * w + 8 * h + g
        got[rows, 8 * j + 2 * c] = np.asarray(lo, np.float32)
        got[rows, 8 * j + 2 * c + 1] = np.asarray(hi, np.float32)
  return got


def _decoded(packed, absmax, quant_type):
  """What the decode must give: the code and the block's absmax in bf16,
  their product rounded once to bf16; `packed [rows, cols / 2]`, `absmax
  [rows, cols / 64]` float32."""
  rows = packed.shape[0]
  codes = np.stack([packed >> 4, packed & 15], -1).reshape(rows, -1)
  table = np.asarray(_code(quant_type), np.float32).astype(
      jnp.bfloat16).astype(np.float32)
  scale = np.repeat(absmax.astype(jnp.bfloat16).astype(np.float32), 64,
                    axis=1)
  return (table[codes] * scale).astype(jnp.bfloat16).astype(np.float32)


@pytest.mark.parametrize("tile_w,tile_k,swizzle,load_table,part,ahead", [
    (64, 256, True, True, None, False), (128, 128, False, False, None, False),
    (64, 64, False, True, None, False), (128, 256, True, False, 2, False),
    (64, 256, True, True, None, True), (128, 128, False, True, None, True),
    (64, 64, False, False, None, True), (128, 256, True, True, 1, True)])
def test_decode_ptx_decodes_the_nested_absmax(tile_w, tile_k, swizzle,
                                              load_table, part, ahead):
  """With `nested`, each block's absmax comes from the double-quantized
  statistics in global memory: the row's code byte for this step,
  `nested_code[code] * nested_absmax[block // 256]`, then `+ offset`, in
  fp32 and rounded apart (bitsandbytes' order, `ops.float_absmax`), then
  bf16. The tile sits inside a larger weight (rows from tile_w of three
  tiles, step 3 of 8), so the row and step offsets and the nested index
  all count; with `part`, one 64-column part of the step. `ahead`: the
  scale words made by `scales_ptx` (a step ahead in the kernel) and handed
  to the decode in registers give the same values."""
  rng = np.random.default_rng(tile_w * 3 + tile_k)
  kb, steps, row0, step = tile_k // 64, 8, tile_w, 3
  nkb, rows_all = kb * steps, 3 * tile_w
  packed = rng.integers(0, 256, (tile_w, tile_k // 2), dtype=np.uint8)
  codes = rng.integers(0, 256, (rows_all, nkb), dtype=np.uint8)
  nested_absmax = rng.uniform(0.5, 2.0, -(-rows_all * nkb // 256)).astype(
      np.float32)
  nested_code = np.asarray(codebooks.create_dynamic_map(signed=True),
                           np.float32)
  offset = np.float32(0.0371)
  # Global memory: codes, nested absmax, nested code, offset, table words.
  layout, gmem = {}, b""
  for name, arr in (("codes", codes), ("nested", nested_absmax),
                    ("code2", nested_code), ("offset", np.asarray([offset])),
                    ("table", wd.table_operands(_code("nf4")))):
    gmem += b"\0" * (-len(gmem) % 16)
    layout[name] = len(gmem)
    gmem += arr.tobytes()
  flat = ((row0 + np.arange(tile_w))[:, None] * nkb + step * kb
          + np.arange(kb)[None])
  prod = nested_code[codes.reshape(-1)[flat]] * nested_absmax[flat // 256]
  absmax = (prod.astype(np.float32) + offset).astype(np.float32)
  stored = _swizzled(packed) if swizzle else packed.reshape(-1)
  groups = tile_w // 64
  cols = tile_k if part is None else 64
  nreg = groups * cols // 8 * 2
  stats = [layout["codes"] + row0 * nkb + step * kb, layout["codes"],
           layout["nested"], layout["code2"], layout["offset"]]
  if ahead:
    _, wide = wd.scale_slots(tile_w, tile_k)
    words = _emulate(wd.scales_ptx(tile_w, tile_k, (nkb, 256)), wide,
                     b"", dict(enumerate(stats)), gmem, wide_out=True)
    text = wd.decode_ptx(_code("nf4"), tile_w, tile_k, swizzle=swizzle,
                         load_table=load_table, part=part, scales=True)
    assert "ld.global.nc.f32" not in text
    operands = {0: 0, **{1 + j: words[j] for j in range(wide)},
                1 + wide: layout["table"]}
  else:
    text = wd.decode_ptx(_code("nf4"), tile_w, tile_k, swizzle=swizzle,
                         load_table=load_table, part=part, nested=(nkb, 256))
    operands = {0: 0, **{1 + i: a for i, a in enumerate(stats)},
                6: layout["table"]}
  assert "ld.shared.u32 sc" not in text
  out = _emulate(text, nreg, stored, operands, gmem)
  want = _decoded(packed, absmax, "nf4")
  if part is not None:
    want = want[:, 64 * part:64 * part + 64]
  np.testing.assert_array_equal(_read_back(out, tile_w, cols), want)


def test_decode_ptx_refuses_a_nested_blocksize_it_cannot_index():
  with pytest.raises(ValueError, match="nested: .*power of two.*got 96"):
    wd.decode_ptx(_code("nf4"), 64, 128, nested=(64, 96))


@pytest.mark.parametrize("tile_w,tile_k,swizzle", [(64, 128, False),
                                                   (128, 256, True)])
def test_decode_ptx_part_is_its_columns_of_the_whole(tile_w, tile_k, swizzle):
  """`part=q` (the overlapped step's decode of 64 columns) gives, register
  for register, the whole tile's operands of columns `64 q .. 64 q + 63`:
  row group i's column groups `8 q .. 8 q + 7`."""
  rng = np.random.default_rng(7)
  packed = rng.integers(0, 256, (tile_w, tile_k // 2), dtype=np.uint8)
  absmax = rng.uniform(0.1, 3.0, (tile_k // 64, tile_w)).astype(np.float32)
  scales = np.asarray(lut_decode.scale_words(jnp.asarray(absmax),
                                             jnp.bfloat16), np.uint32)
  stored = _swizzled(packed) if swizzle else packed.reshape(-1)
  smem = np.concatenate([stored, scales.reshape(-1).view(np.uint8)])
  code = _code("nf4")
  nreg = tile_w // 64 * tile_k // 8 * 2
  whole = _emulate(wd.decode_ptx(code, tile_w, tile_k, swizzle=swizzle),
                   nreg, smem, {0: 0, 1: packed.size})
  whole = whole.reshape(tile_w // 64, tile_k // 64, 16, 128)
  for q in range(tile_k // 64):
    part = _emulate(wd.decode_ptx(code, tile_w, tile_k, swizzle=swizzle,
                                  part=q), nreg // (tile_k // 64), smem,
                    {0: 0, 1: packed.size})
    np.testing.assert_array_equal(part.reshape(tile_w // 64, 16, 128),
                                  whole[:, q])


def test_lowers_for_cuda():
  """All three variants lower to a Mosaic GPU module (needs JAX's CUDA plugin;
  CPU-only installs skip)."""
  s = jax.ShapeDtypeStruct
  n, k, m = 256, 1024, 128
  stats = (s((n * k // 64,), jnp.uint8), s((n * k // 64 // 256,), jnp.float32),
           s((256,), jnp.float32), s((), jnp.float32))
  for variant, absmax, prefetch in [
      *itertools.product(("plain", "ws", "ks"),
                         (s((n * k // 64,), jnp.float32), stats), (False,)),
      ("plain", stats, True), ("ws", stats, True)]:
    text = _lowered(functools.partial(
        gw.gemm, code=_code("nf4"), n=n, k=k, tile_w=64, tile_x=128,
        tile_k=64, variant=variant, prefetch=prefetch), m, n, k, absmax)
    assert "mosaic_gpu" in text


def _lowered(fn, m, n, k, absmax):
  """`fn(x, packed, absmax)` lowered for an H200, or the test skipped
  where this JAX has no Mosaic GPU lowering (CPU-only installs)."""
  s = jax.ShapeDtypeStruct
  try:
    return helpers.lowered_for_h200(
        lambda x, p, a: fn(x, p, a), s((m, k), jnp.bfloat16),
        s((n * k // 2,), jnp.uint8), absmax)
  except AssertionError as e:  # no Mosaic GPU lowering rule registered
    pytest.skip(f"this JAX has no Mosaic GPU lowering (CUDA plugin): {e!r}")


def test_tail_rows_lower_as_two_kernels():
  """With `tail_rows` the GEMM lowers to two Mosaic GPU kernels, the
  second reading the weight from row `n - tail_rows` (needs JAX's CUDA
  plugin; CPU-only installs skip)."""
  s = jax.ShapeDtypeStruct
  n, k, m = 1152, 1024, 256
  stats = (s((n * k // 64,), jnp.uint8), s((n * k // 64 // 256,), jnp.float32),
           s((256,), jnp.float32), s((), jnp.float32))
  for absmax in (stats, s((n * k // 64,), jnp.float32)):
    text = _lowered(functools.partial(gw.gemm, code=_code("nf4"), n=n, k=k,
                                      tail_rows=128, **_TAIL_CFG), m, n, k,
                    absmax)
    assert text.count("custom_call @mosaic_gpu") == 2
    assert "dynamic_update_slice" in text


_GPU_CASES = [
    (64, None), (96, None), (128, None), (200, None), (256, None),
    (256, dict(tile_w=64, tile_x=256, tile_k=64, split=2, stages=2,
               variant="plain")),
    (128, dict(tile_w=128, tile_x=128, tile_k=64, split=1, stages=3,
               variant="ws")),
    (64, dict(tile_w=64, tile_x=64, tile_k=128, split=1, stages=2,
              variant="ks")),
    (24, dict(tile_w=64, tile_x=32, tile_k=64, split=1, stages=3,
              variant="ks")),
    (16, dict(tile_w=64, tile_x=16, tile_k=128, split=1, stages=4,
              variant="plain")),
    (128, dict(tile_w=64, tile_x=128, tile_k=64, split=2, stages=2,
               variant="ks")),
    (256, dict(tile_w=64, tile_x=256, tile_k=64, split=1, stages=2,
               variant="ws", cluster=2)),
    (96, dict(tile_w=64, tile_x=128, tile_k=64, split=1, stages=3,
              variant="ks", cluster=4)),
    # The weight tile swizzled by TMA (rows of 32, 64 and 128 bytes) and the
    # table words loaded from memory, alone and together, in each variant.
    (64, dict(tile_w=64, tile_x=64, tile_k=128, split=1, stages=4,
              variant="plain", swizzle=True, load_table=True)),
    (64, dict(tile_w=64, tile_x=64, tile_k=256, split=1, stages=2,
              variant="plain", swizzle=True)),
    (128, dict(tile_w=64, tile_x=128, tile_k=128, split=1, stages=3,
               variant="ws", swizzle=True, load_table=True)),
    (256, dict(tile_w=64, tile_x=256, tile_k=64, split=2, stages=2,
               variant="ws", swizzle=True)),
    (200, dict(tile_w=64, tile_x=256, tile_k=64, split=1, stages=2,
               variant="ws", load_table=True)),
    (128, dict(tile_w=64, tile_x=128, tile_k=64, split=1, stages=3,
               variant="ks", swizzle=True, load_table=True)),
    # Each step's decode in parts overlapping the previous part's wgmma.
    (64, dict(tile_w=64, tile_x=64, tile_k=128, split=1, stages=4,
              variant="plain", overlap=True)),
    (64, dict(tile_w=64, tile_x=64, tile_k=256, split=1, stages=2,
              variant="plain", overlap=True, swizzle=True, load_table=True)),
    (256, dict(tile_w=64, tile_x=128, tile_k=128, split=1, stages=2,
               variant="ws", overlap=True)),
    (128, dict(tile_w=64, tile_x=128, tile_k=128, split=1, stages=3,
               variant="ws", overlap=True, load_table=True)),
    # The K-split defaults for weights of few rows (`_split_config`), at
    # the indices they ran with on the H200 (an index's parity sets NF4 or
    # FP4).
    (64, dict(tile_w=64, tile_x=64, tile_k=256, split=2, stages=2,
              variant="ks", swizzle=True, load_table=True)),
    (64, dict(tile_w=64, tile_x=64, tile_k=64, split=2, stages=4,
              variant="ks", swizzle=True, load_table=True)),
    (128, dict(tile_w=64, tile_x=128, tile_k=128, split=4, stages=3,
               variant="ws", load_table=True)),
    # The same for 1024 rows (M = 64, 128), and at M = 129-256 on 4096 rows
    # ("plain", the scale words made ahead) and 1024 ("ks" with x's
    # 256-row tile, the second warpgroup's sums in the float32 output
    # tile).
    (64, dict(tile_w=64, tile_x=64, tile_k=128, split=8, stages=2,
              variant="ks", swizzle=True, load_table=True)),
    (128, dict(tile_w=64, tile_x=128, tile_k=128, split=16, stages=1,
               variant="ws", load_table=True)),
    (256, dict(tile_w=64, tile_x=256, tile_k=128, split=2, stages=2,
               variant="plain", prefetch=True)),
    (200, dict(tile_w=64, tile_x=256, tile_k=64, split=8, stages=2,
               variant="ks", load_table=True)),
    # Overlapped parts in "ks".
    (128, dict(tile_w=64, tile_x=128, tile_k=128, split=1, stages=2,
               variant="ks", overlap=True, swizzle=True)),
    # The statistics' scale words made a step ahead (with float32 absmax
    # these run without): K split (the step index), two row groups and
    # 64-column steps (padded slots), overlapped parts.
    (64, dict(tile_w=64, tile_x=64, tile_k=256, split=1, stages=2,
              variant="plain", swizzle=True, load_table=True, prefetch=True)),
    (128, dict(tile_w=64, tile_x=128, tile_k=128, split=2, stages=2,
               variant="ws", load_table=True, prefetch=True)),
    (96, dict(tile_w=128, tile_x=128, tile_k=64, split=1, stages=3,
              variant="plain", prefetch=True)),
    (64, dict(tile_w=64, tile_x=64, tile_k=128, split=1, stages=4,
              variant="plain", overlap=True, prefetch=True)),
    (256, dict(tile_w=64, tile_x=256, tile_k=64, split=1, stages=2,
               variant="ws", prefetch=True)),
    # At M = 129-256 on 6144 and 8192 rows: "plain", unsplit.
    (256, dict(tile_w=64, tile_x=256, tile_k=128, split=1, stages=2,
               variant="plain", prefetch=True)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(_GPU_CASES)))
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_gemm(case, nested, with_bias):
  """The compiled kernel (default tiles, all three variants, K split, x
  tiles of 16-256 rows, clusters sharing x, the weight tile swizzled, the
  table words from memory, steps decoded in overlapped parts, the
  statistics' scale words made a step ahead) against the
  documented weight: with the double-quantized statistics decoded in the
  kernel and with float32 absmax (scale words by TMA); with a bias
  (float32 tile, transposed by XLA) and without (bf16 `y` stored by the
  kernel itself, transposed in shared memory). NF4 and FP4 alternate over
  the cases."""
  m, cfg = _GPU_CASES[case]
  k = 2048
  _gemm_checked(m, 1024, k, ("nf4", "fp4")[case % 2],
                cfg or gw.default_config(m, with_bias, k, nested=nested),
                nested, with_bias, seeds=(m, m + 1, 2))


def _gemm_checked(m, n, k, quant_type, cfg, nested, with_bias, seeds):
  """`gw.gemm` with `cfg` on random weights, x and bias (`seeds`), against
  the documented weight."""
  packed, qs = _weights(n, k, quant_type, seeds[0])
  x = jnp.asarray(_util.rng_array((m, k), seeds[1], jnp.bfloat16))
  bias = (jnp.asarray(_util.rng_array((n,), seeds[2], jnp.bfloat16))
          if with_bias else None)
  y = gw.gemm(x, packed.reshape(-1), _stats(qs, nested),
              code=_code(quant_type), n=n, k=k, bias=bias, **cfg)
  assert y.shape == (m, n) and y.dtype == jnp.bfloat16
  _check(y, x, packed, qs, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("m,cfg", [
    (64, dict(tile_w=64, tile_x=64, tile_k=64, split=6, stages=3,
              variant="ks", swizzle=True, load_table=True)),
    (64, dict(tile_w=64, tile_x=64, tile_k=128, split=3, stages=3,
              variant="ks", swizzle=True, load_table=True)),
    (128, dict(tile_w=64, tile_x=128, tile_k=64, split=12, stages=3,
               variant="ws", load_table=True)),
    (100, dict(tile_w=64, tile_x=128, tile_k=128, split=6, stages=3,
               variant="ws", load_table=True)),
    (256, dict(tile_w=64, tile_x=256, tile_k=64, split=6, stages=2,
               variant="ks", load_table=True)),
    (200, dict(tile_w=64, tile_x=256, tile_k=64, split=3, stages=2,
               variant="ks", load_table=True))])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gpu_gemm_splits_k_ways_not_powers_of_two(m, cfg, nested, with_bias):
  """The compiled kernel with K = 2304 split 3, 6 and 12 ways (the
  defaults `_split_config` picks for Gemma-2-2B's weights), with the
  statistics decoded in the kernel and as float32 absmax, with and
  without a bias, against the documented weight."""
  _gemm_checked(m, 1024, 2304, "nf4", cfg, nested, with_bias,
                seeds=(m + cfg["split"], m + 3, 5))


@pytest.mark.gpu
@pytest.mark.parametrize("n,k,m", [(14336, 1024, 128), (14336, 1024, 256),
                                   (4096, 4096, 64), (4096, 4096, 128),
                                   (4096, 4096, 256), (1024, 4096, 64),
                                   (1024, 4096, 100), (1024, 4096, 256),
                                   (6144, 4096, 256), (8192, 4096, 200),
                                   (14336, 1024, 512), (4096, 4096, 1024),
                                   (14336, 2048, 700), (3584, 3584, 64),
                                   (3584, 3584, 128), (3584, 3584, 256),
                                   (8192, 3072, 64), (3072, 3072, 128),
                                   (2048, 2048, 256), (5632, 2048, 100),
                                   (8960, 1536, 128), (1536, 1536, 64),
                                   (1024, 2304, 64), (1024, 2304, 128),
                                   (2048, 2304, 256), (2304, 2304, 256),
                                   (2304, 9216, 128)])
def test_gpu_matmul_4bit_takes_the_gemm(n, k, m):
  """`F.matmul_4bit` in the default ("pallas") mode on the H200 runs the
  wgmma GEMM (`gemm_serves`) on a 14336-row weight, with K split on
  weights of 1024-8960 rows and K = 1536-9216 (3, 6 or 12 ways on K =
  2304 and 9216), at M = 129-256 unsplit on
  6144 and 8192 rows, and past 256 rows unsplit in x's 256-row tiles (700
  padded to 768), within the bound of the kernel's weight."""
  packed, qs = _weights(n, k, "nf4", 9)
  assert kernels.gemm_serves(m, n, k, jnp.bfloat16, qs, "pallas")
  x = jnp.asarray(_util.rng_array((m, k), 4, jnp.bfloat16))
  _check(F.matmul_4bit(x, packed, qs), x, packed, qs)


def test_group_keeps_weights_served_only_with_a_split():
  """A q/k/v group (4096, 1024 and 1024 rows) at M = 64 stays one GEMV
  launch, though the wgmma GEMM would take the 4096-row weight alone
  with K split; a 14336-row weight still leaves the group."""
  k = 4096
  qs = {n: F.QuantState(absmax=jnp.zeros((1,)), code=jnp.zeros((16,)),
                        shape=(n, k), blocksize=64, quant_type="nf4",
                        dtype="bfloat16") for n in (4096, 1024, 14336)}
  assert kernels.gemm_serves(64, 4096, k, jnp.bfloat16, qs[4096], "interpret")
  assert kernels.can_group(64, k, jnp.bfloat16,
                           (qs[4096], qs[1024], qs[1024]), "interpret")
  assert not kernels.can_group(64, k, jnp.bfloat16, (qs[14336], qs[14336]),
                               "interpret")


def test_group_keeps_split_weights_at_128_rows():
  """Llama-3.2-1B's gate and up (8192x2048 each) at M = 128 stay one GEMV
  group launch (GROUP_KEEPS_SPLIT_MAX_M), though the wgmma GEMM would
  take each alone with K split."""
  k = 2048
  qs = F.QuantState(absmax=jnp.zeros((1,)), code=jnp.zeros((16,)),
                    shape=(8192, k), blocksize=64, quant_type="nf4",
                    dtype="bfloat16")
  assert kernels.gemm_serves(128, 8192, k, jnp.bfloat16, qs, "interpret")
  assert kernels.can_group(128, k, jnp.bfloat16, (qs, qs), "interpret")


def _spy_on_gemm(monkeypatch):
  """A list that gets, for each call of `gw.gemm` (still run), whether it
  took the statistics and its keyword arguments."""
  seen = []
  real = gw.gemm

  def spy(x, packed, absmax, **kw):
    seen.append((isinstance(absmax, tuple), kw))
    return real(x, packed, absmax, **kw)

  monkeypatch.setattr(gw, "gemm", spy)
  return seen


def test_matmul_4bit_splits_k_for_few_rows(monkeypatch):
  """`F.matmul_4bit` on a 4096-row weight at M = 64 runs the wgmma GEMM
  with K split in two ("ks"), the statistics decoded by the kernel, and
  a bias added after the partial sums; the product is the kernel
  weight's."""
  n, k, m = 4096, 4096, 64
  packed, qs = _weights(n, k, "nf4", 12)
  seen = _spy_on_gemm(monkeypatch)
  x = jnp.asarray(_util.rng_array((m, k), 13, jnp.bfloat16))
  bias = jnp.asarray(_util.rng_array((n,), 14, jnp.bfloat16))
  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_4bit(x, packed, qs, bias=bias)
  assert [(kw["split"], kw["variant"], stats) for stats, kw in seen] == [
      (2, "ks", True)]
  _check(y, x, packed, qs, bias)


def test_matmul_4bit_splits_short_k_with_narrowed_steps(monkeypatch):
  """`F.matmul_4bit` on Qwen2.5-1.5B's 1536x1536 at M = 64 (K = 1536,
  since the fiftieth session in the GEMM's range) runs the wgmma GEMM
  with K split four ways in 64-column steps ("ks": 256-column steps would
  leave K = 1536 unsplittable), and the product is the kernel weight's."""
  n, k, m = 1536, 1536, 64
  packed, qs = _weights(n, k, "nf4", 15)
  seen = _spy_on_gemm(monkeypatch)
  x = jnp.asarray(_util.rng_array((m, k), 16, jnp.bfloat16))
  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_4bit(x, packed, qs)
  assert [(kw["split"], kw["tile_k"], kw["variant"], stats)
          for stats, kw in seen] == [(4, 64, "ks", True)]
  _check(y, x, packed, qs)


def test_matmul_4bit_splits_k_twelve_ways(monkeypatch):
  """`F.matmul_4bit` on Gemma-2-2B's k/v weight (1024x2304) at M = 128
  runs the wgmma GEMM with K split twelve ways ("ws", 64-column steps:
  2304 takes no power of two past 4), and the product is the kernel
  weight's (the twelve partials summed)."""
  monkeypatch.setattr(_backend, "num_sms", lambda: 132)
  n, k, m = 1024, 2304, 128
  packed, qs = _weights(n, k, "fp4", 17)
  seen = _spy_on_gemm(monkeypatch)
  x = jnp.asarray(_util.rng_array((m, k), 18, jnp.bfloat16))
  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_4bit(x, packed, qs)
  assert [(kw["split"], kw["tile_k"], kw["variant"], stats)
          for stats, kw in seen] == [(12, 64, "ws", True)]
  _check(y, x, packed, qs)


@pytest.mark.parametrize("m,nested,with_bias,decodes", [
    (64, True, False, True), (128, True, False, True),
    (129, True, False, True), (256, True, False, True),
    (128, True, True, True), (129, True, True, False),
    (256, True, True, False), (64, False, False, False)])
def test_matmul_4bit_hands_the_statistics_to_the_kernel(monkeypatch, m,
                                                        nested, with_bias,
                                                        decodes):
  """`F.matmul_4bit` gives the wgmma GEMM the double-quantized statistics
  (decoded by the kernel) at every M without a bias and up to
  `GEMM_NESTED_BIAS_MAX_M` rows with one, and float32 absmax above that
  or for a plain absmax; the product is the kernel weight's either way."""
  n, k = kernels.GEMM_MIN_N, 128
  packed, qs = _weights(n, k, "nf4", 11, nested)
  assert kernels.gemm_decodes_nested(m, qs, with_bias) is decodes
  seen = _spy_on_gemm(monkeypatch)
  x = jnp.asarray(_util.rng_array((m, k), 6, jnp.bfloat16))
  bias = (jnp.asarray(_util.rng_array((n,), 7, jnp.bfloat16)) if with_bias
          else None)
  with jaxbnb.kernel_mode("interpret"):
    y = F.matmul_4bit(x, packed, qs, bias=bias)
  assert [stats for stats, _ in seen] == [decodes]
  _check(y, x, packed, qs, bias)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [256, 200, 128, 64])
@pytest.mark.parametrize("nested", [True, False])
def test_gpu_gemm_tail_rows(m, nested):
  """The compiled kernel with Qwen2.5-7B's 18944x3584 (gate or up) split
  into two launches: the first 16896 rows (132 programs of "ws", or 264
  of "plain" at M = 64) writing `y` in place, the last 2048 rows with K
  split ("ks" or "ws", `_split_config`) read from the weight's row 16896
  on and written into the columns left; against the documented weight,
  with the statistics decoded in the kernel and with float32 absmax."""
  n, k = 18944, 3584
  packed, qs = _weights(n, k, "nf4", m)
  x = jnp.asarray(_util.rng_array((m, k), m + 1, jnp.bfloat16))
  cfg = gw.default_config(m, k=k, nested=nested, n=n)
  y = jax.jit(functools.partial(
      gw.gemm, code=_code("nf4"), n=n, k=k, tail_rows=2048, **cfg))(
          x, packed.reshape(-1), _stats(qs, nested))
  _check(y, x, packed, qs)


@pytest.mark.gpu
def test_gpu_package_gemm_takes_the_tail(monkeypatch):
  """With TAIL_BELOW_FILL at 0.5, `F.matmul_4bit` at M = 256 on 18944x3584
  (148 programs: a last wave of 16 on 132 SMs) runs its last 2048 rows
  as the tail launch, within the bound of the kernel's weight."""
  seen = _tail_spy(monkeypatch, 132)
  n, k, m = 18944, 3584, 256
  packed, qs = _weights(n, k, "nf4", 4)
  x = jnp.asarray(_util.rng_array((m, k), 5, jnp.bfloat16))
  y = F.matmul_4bit(x, packed, qs)
  assert seen == [2048]
  _check(y, x, packed, qs)
