"""Regenerates the bitsandbytes golden fixtures used by the CPU test-suite.

Run on a CUDA machine with torch and bitsandbytes 0.50.2 importable:

  python tests/golden/make_golden.py --out tests/golden

It writes:
  * ``bnb_4bit.npz``: inputs, packed bytes, absmax (plain and double-quantized),
    dequantized outputs and the packed QuantState JSON for many shapes, dtypes,
    blocksizes and both quant types, including all-zero blocks, values exactly
    on the quantization thresholds, NaN/Inf, odd element counts and every
    ``quant_storage`` dtype.
  * ``bnb_8bit.npz``: ``quantize_blockwise`` / ``dequantize_blockwise`` with the
    signed and unsigned dynamic maps, every blocksize, nested or not;
    ``int8_vectorwise_quant`` with and without an outlier threshold;
    ``int8_mm_dequant``.
  * ``bnb_maps.npz``: ``create_dynamic_map``, ``create_normal_map``,
    ``create_fp8_map``, ``create_linear_map`` and ``get_4bit_type`` tables.
  * ``bnb_linear4bit_*.safetensors`` + ``bnb_linear4bit_io.npz``: state dicts
    of real ``bnb.nn.Linear4bit`` modules and their outputs on fixed inputs.

Arrays are stored as raw bit patterns (bf16 as uint16) so the comparison in
the tests is exact. The script uses only torch and bitsandbytes; jaxbnb is
never imported here.
"""

import argparse
import json
import os

import numpy as np
import torch

import bitsandbytes as bnb
import bitsandbytes.functional as F

DTYPES = {"float32": torch.float32, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)

NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906,
    -0.33967943489551544, -0.23460740596055984, -0.13791173323988914,
    -0.045525018125772476, 0.03979014977812767, 0.1202552504837513,
    0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
FP4_THRESHOLDS = [0.8333333, 0.583333, 0.4166667, 0.29166667, 0.20833333,
                  0.0859375, 0.00260417]


def bits(t: torch.Tensor) -> np.ndarray:
  """Raw bit pattern of a tensor as a numpy array."""
  t = t.detach().contiguous().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(np.uint16)
  return t.numpy()


def threshold_values(quant_type: str) -> torch.Tensor:
  """Values exactly on, and one fp32 ulp around, every decision threshold."""
  base = NF4_THRESHOLDS if quant_type == "nf4" else (
      FP4_THRESHOLDS + [-t for t in FP4_THRESHOLDS])
  t = np.asarray(base, np.float32)
  vals = np.concatenate([t, np.nextafter(t, np.float32(2)),
                         np.nextafter(t, np.float32(-2)),
                         np.asarray([0.0, -0.0, 1.0, -1.0], np.float32)])
  return torch.from_numpy(vals)


def make_input(kind: str, shape, dtype, gen) -> torch.Tensor:
  n = int(np.prod(shape))
  a = torch.randn(n, generator=gen, dtype=torch.float32)
  if kind == "zeros":
    a[:64] = 0.0
    a[n // 2: n // 2 + 128] = 0.0
  elif kind == "nanin":
    a[3] = float("nan")
    a[70] = float("inf")
    a[140] = float("-inf")
    a[200:210] = float("nan")
    a[256:320] = float("nan")  # one whole block of NaN
  elif kind == "tiny":
    a = a * 1e-3
  elif kind.startswith("thresh"):
    qt = kind.split("_")[1]
    vals = threshold_values(qt)
    # Blocks of 32 with absmax exactly 1 (first element of every block).
    a = torch.zeros(n)
    reps = vals.repeat(n // len(vals) + 1)
    a[:] = reps[:n]
    a[::32] = 1.0
  return a.reshape(shape).to(dtype)


def gen_4bit(out):
  d = {}
  cases = []
  gen = torch.Generator().manual_seed(0)
  # Full sweep on an odd-sized shape (partial last block for every blocksize).
  for qt in ("nf4", "fp4"):
    for dn in DTYPES:
      for bs in BLOCKSIZES_4BIT:
        for nested in (False, True):
          cases.append((f"sweep_{qt}_{dn}_{bs}_{int(nested)}", (29, 111),
                        dn, qt, bs, nested, "uint8", "randn"))
  # Multiple nested blocks, odd element counts, tiny tensors, edge values.
  for qt in ("nf4", "fp4"):
    for dn in DTYPES:
      cases.append((f"bignest_{qt}_{dn}", (150, 130), dn, qt, 32, True,
                    "uint8", "randn"))
      cases.append((f"odd_{qt}_{dn}", (3, 5, 7), dn, qt, 64, False, "uint8",
                    "randn"))
      cases.append((f"one_{qt}_{dn}", (1, 1), dn, qt, 64, True, "uint8",
                    "randn"))
      cases.append((f"zeros_{qt}_{dn}", (8, 96), dn, qt, 64, True, "uint8",
                    "zeros"))
      cases.append((f"nanin_{qt}_{dn}", (8, 96), dn, qt, 64, False, "uint8",
                    "nanin"))
      cases.append((f"thresh_{qt}_{dn}", (16, 64), dn, qt, 32, False, "uint8",
                    f"thresh_{qt}"))
      cases.append((f"tiny_{qt}_{dn}", (4, 128), dn, qt, 128, True, "uint8",
                    "tiny"))
    for st in ("float16", "bfloat16", "float32", "int8", "uint8"):
      cases.append((f"storage_{qt}_{st}", (32, 64), "bfloat16", qt, 64, True,
                    st, "randn"))
  storage_dtypes = {"uint8": torch.uint8, "int8": torch.int8,
                    "float16": torch.float16, "bfloat16": torch.bfloat16,
                    "float32": torch.float32}
  names = []
  for name, shape, dn, qt, bs, nested, st, kind in cases:
    a = make_input(kind, shape, DTYPES[dn], gen).cuda()
    packed, qs = F.quantize_4bit(a, blocksize=bs, compress_statistics=nested,
                                 quant_type=qt,
                                 quant_storage=storage_dtypes[st])
    deq = F.dequantize_4bit(packed, qs)
    p = f"{name}/"
    d[p + "input"] = bits(a)
    d[p + "packed"] = bits(packed.view(torch.uint8)).reshape(-1)
    d[p + "absmax"] = bits(qs.absmax)
    d[p + "code"] = bits(qs.code)
    d[p + "dequant"] = bits(deq)
    if nested:
      d[p + "nested_absmax"] = bits(qs.state2.absmax)
      d[p + "nested_code"] = bits(qs.state2.code)
      d[p + "offset"] = np.asarray(qs.offset.item(), np.float32)
      d[p + "absmax_deq"] = bits(F.dequantize_blockwise(qs.absmax, qs.state2)
                                 + qs.offset)
    sd = qs.as_dict(packed=True)
    blob = [v for k, v in sd.items() if "quant_state" in k][0]
    d[p + "json"] = bits(blob)
    d[p + "meta"] = np.frombuffer(json.dumps(dict(
        shape=list(shape), dtype=dn, quant_type=qt, blocksize=bs,
        nested=nested, storage=st, kind=kind)).encode(), np.uint8)
    d[p + "packed_shape"] = np.asarray(packed.shape, np.int64)
    names.append(name)
  d["names"] = np.asarray(names)
  np.savez_compressed(os.path.join(out, "bnb_4bit.npz"), **d)
  print(f"4bit: {len(names)} cases")


def gen_8bit(out):
  d = {}
  names = []
  gen = torch.Generator().manual_seed(1)
  signed = F.create_dynamic_map(signed=True)
  unsigned = F.create_dynamic_map(signed=False)
  for dn in DTYPES:
    for bs in BLOCKSIZES_8BIT:
      for nested in (False, True):
        for data in ("randn", "rand"):
          name = f"bw_{dn}_{bs}_{int(nested)}_{data}"
          n = 5003
          if data == "randn":
            a = torch.randn(n, generator=gen)
            code = None
          else:
            a = torch.rand(n, generator=gen)
            code = unsigned
          a = a.to(DTYPES[dn]).cuda()
          q, qs = F.quantize_blockwise(a, code=code, blocksize=bs,
                                       nested=nested)
          deq = F.dequantize_blockwise(q, qs)
          p = f"{name}/"
          d[p + "input"] = bits(a)
          d[p + "q"] = bits(q)
          d[p + "absmax"] = bits(qs.absmax)
          d[p + "dequant"] = bits(deq)
          if nested:
            d[p + "nested_absmax"] = bits(qs.state2.absmax)
            d[p + "offset"] = np.asarray(qs.offset.item(), np.float32)
          names.append(name)
  # Edge values for the 8-bit map: zeros, NaN/Inf, code midpoints.
  for dn in ("float32",):
    a = torch.randn(1024, generator=gen)
    a[:256] = 0.0
    a[300] = float("nan")
    a[600] = float("inf")
    mids = ((signed[1:] + signed[:-1]) / 2).float()
    a[768:768 + 255] = mids
    a[768] = 1.0
    a = a.cuda()
    q, qs = F.quantize_blockwise(a, blocksize=256)
    p = "bw_edges/"
    d[p + "input"] = bits(a)
    d[p + "q"] = bits(q)
    d[p + "absmax"] = bits(qs.absmax)
    d[p + "dequant"] = bits(F.dequantize_blockwise(q, qs))
    names.append("bw_edges")
  d["names_bw"] = np.asarray(names)

  # LLM.int8 vector-wise quantization (fp16 only on CUDA).
  iv = []
  for i, (shape, thr) in enumerate([((16, 64), 0.0), ((16, 64), 3.0),
                                    ((1, 128), 3.0), ((7, 33), 6.0),
                                    ((5, 48), 0.0)]):
    a = torch.randn(shape, generator=gen) * 1.5
    a[2 % shape[0], 5] = 8.0
    a[0, 7] = -7.0
    if shape[0] > 3:
      a[3] = 0.0  # an all-zero row
    a = a.half().cuda()
    ca, stats, cols = F.int8_vectorwise_quant(a.clone(), threshold=thr)
    p = f"iv{i}/"
    d[p + "input"] = bits(a)
    d[p + "threshold"] = np.asarray(thr, np.float32)
    d[p + "CA"] = bits(ca)
    d[p + "stats"] = bits(stats)
    d[p + "cols"] = (bits(cols).astype(np.int64) if cols is not None
                     else np.zeros((0,), np.int64))
    d[p + "dequant"] = bits(F.int8_vectorwise_dequant(ca, stats))
    iv.append(f"iv{i}")
  d["names_iv"] = np.asarray(iv)

  # int8 matmul + dequant epilogue.
  a = (torch.randn(8, 64, generator=gen)).half().cuda()
  w = (torch.randn(24, 64, generator=gen) / 8).half().cuda()
  bias = torch.randn(24, generator=gen).half().cuda()
  ca, sa, _ = F.int8_vectorwise_quant(a)
  cb, sb, _ = F.int8_vectorwise_quant(w)
  acc = F.int8_linear_matmul(ca, cb)
  d["mm/A"] = bits(a)
  d["mm/W"] = bits(w)
  d["mm/bias"] = bits(bias)
  d["mm/acc"] = bits(acc)
  d["mm/out"] = bits(F.int8_mm_dequant(acc, sa, sb))
  d["mm/out_bias"] = bits(F.int8_mm_dequant(acc, sa, sb, bias=bias))
  np.savez_compressed(os.path.join(out, "bnb_8bit.npz"), **d)
  print(f"8bit: {len(names)} blockwise, {len(iv)} vectorwise")


def gen_maps(out):
  d = {
      "dynamic_signed": F.create_dynamic_map(signed=True),
      "dynamic_unsigned": F.create_dynamic_map(signed=False),
      "dynamic_signed_4_8": F.create_dynamic_map(True, 4, 8),
      "normal": F.create_normal_map(),
      "normal_noextra": F.create_normal_map(use_extra_value=False),
      "fp8_e5m2": F.create_fp8_map(True, 5, 2, 8),
      "fp8_e4m3": F.create_fp8_map(True, 4, 3, 8),
      "fp4_map": F.create_fp8_map(True, 2, 1, 4),
      "linear_signed": F.create_linear_map(True),
      "linear_unsigned": F.create_linear_map(False),
      "nf4": F.get_4bit_type("nf4", device="cpu"),
      "fp4": F.get_4bit_type("fp4", device="cpu"),
      "af4": F.get_4bit_type("af4", device="cpu"),
  }
  np.savez(os.path.join(out, "bnb_maps.npz"),
           **{k: bits(v) for k, v in d.items()})
  print(f"maps: {len(d)}")


def gen_linear(out):
  from safetensors.torch import save_file
  gen = torch.Generator().manual_seed(2)
  io = {}
  configs = [
      ("nf4_dq_bf16", dict(quant_type="nf4", compress_statistics=True,
                           compute_dtype=torch.bfloat16), torch.bfloat16,
       True, torch.uint8),
      ("fp4_fp32", dict(quant_type="fp4", compress_statistics=False,
                        compute_dtype=torch.float32), torch.float32, False,
       torch.uint8),
      ("nf4_dq_fp16_bf16storage", dict(quant_type="nf4",
                                       compress_statistics=True,
                                       compute_dtype=torch.float16),
       torch.float16, True, torch.bfloat16),
  ]
  for name, kw, wdtype, bias, storage in configs:
    lin = torch.nn.Linear(72, 40, bias=bias, dtype=wdtype)
    with torch.no_grad():
      lin.weight.copy_(torch.randn(40, 72, generator=gen) / 8)
      if bias:
        lin.bias.copy_(torch.randn(40, generator=gen))
    q = bnb.nn.Linear4bit(72, 40, bias=bias, quant_storage=storage, **kw)
    q.load_state_dict(lin.state_dict())
    q = q.cuda()
    x = torch.randn(3, 72, generator=gen).to(wdtype).cuda()
    with torch.no_grad():
      y = q(x)
    sd = {k: v.detach().cpu().contiguous() for k, v in q.state_dict().items()}
    save_file(sd, os.path.join(out, f"bnb_linear4bit_{name}.safetensors"))
    io[f"{name}/x"] = bits(x)
    io[f"{name}/y"] = bits(y)
    io[f"{name}/w_float"] = bits(lin.weight)
  np.savez_compressed(os.path.join(out, "bnb_linear4bit_io.npz"), **io)
  print(f"linear4bit: {len(configs)} modules")


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", default=os.path.dirname(__file__))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  assert torch.cuda.is_available(), "golden fixtures come from bnb on CUDA"
  print("torch", torch.__version__, "bitsandbytes", bnb.__version__,
        torch.cuda.get_device_name())
  gen_maps(args.out)
  gen_4bit(args.out)
  gen_8bit(args.out)
  gen_linear(args.out)
  with open(os.path.join(args.out, "VERSIONS.txt"), "w") as f:
    f.write(f"torch {torch.__version__}\nbitsandbytes {bnb.__version__}\n"
            f"device {torch.cuda.get_device_name()}\n")


if __name__ == "__main__":
  main()
