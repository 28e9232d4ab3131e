"""Regenerates the bitsandbytes 8-bit optimizer fixtures (tests/golden/bnb_optim).

Run on a CUDA machine with torch and bitsandbytes 0.50.2 importable:

  python tests/golden/make_bnb_optim_golden.py --out tests/golden/bnb_optim

It writes:
  * ``inputs.npz``: per parameter dtype (``float32``, ``bfloat16``) the seeded
    initial parameter ``<dtype>/p0`` of shape SHAPE and the ``<dtype>/grads``
    of STEPS steps, ``[STEPS, *SHAPE]``. Step 3 of the float32 gradients
    holds a NaN and an Inf (zeros in the bfloat16 gradients).
  * ``<case>.npz`` per optimizer case (CASES): ``meta`` (JSON: bnb class,
    kwargs, dtype, shape, steps, and the ``state_dict()`` layout with tensors
    written as ``"tensor:<dtype>:<shape>"``), ``qmap1``/``qmap2`` (8-bit
    cases), and after each step k = 1..STEPS ``step<k>/p`` plus the state
    tensors ``step<k>/state1``, ``state2``, ``absmax1``, ``absmax2`` (those
    the optimizer has).
  * ``VERSIONS.txt``: torch, bitsandbytes, CUDA and device.

SHAPE has 4288 elements (>= bnb's min_8bit_size of 4096, so the state is
8-bit) and 17 blocks of 256, the last one partial. Arrays are stored as raw
bit patterns (bf16 as uint16) so the comparison in the tests is exact. The
script uses only torch and bitsandbytes; jaxbnb is never imported here.
"""

import argparse
import json
import os

import numpy as np
import torch

import bitsandbytes as bnb

SHAPE = (64, 67)
STEPS = 5
SEED = 1234

# name -> (bnb class name, kwargs, parameter dtype)
CASES = {
    "adam8bit": ("Adam8bit", {}, "float32"),
    "adamw8bit": ("AdamW8bit", {"weight_decay": 1e-2}, "float32"),
    "lion8bit": ("Lion8bit", {"weight_decay": 1e-2}, "float32"),
    "sgd8bit": ("SGD8bit", {"lr": 1e-2, "momentum": 0.9}, "float32"),
    "rmsprop8bit": ("RMSprop8bit", {}, "float32"),
    "adagrad8bit": ("Adagrad8bit", {}, "float32"),
    "ademamix8bit": ("AdEMAMix8bit", {}, "float32"),
    "adamw32bit": ("AdamW", {"weight_decay": 1e-2}, "float32"),
    "adamw8bit_bf16": ("AdamW8bit", {"weight_decay": 1e-2}, "bfloat16"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STATE_KEYS = ("state1", "state2", "absmax1", "absmax2")
QUANT_KEY = "__bnb_optimizer_quant_state__"


def bits(t: torch.Tensor) -> np.ndarray:
  """Raw bit pattern of a tensor as a numpy array (a copy)."""
  t = t.detach().contiguous().cpu()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(np.uint16).copy()
  return t.numpy().copy()


def make_inputs(device):
  """Seeded p0 and gradients per dtype (torch tensors on `device`)."""
  gen = torch.Generator().manual_seed(SEED)
  p0 = torch.randn(SHAPE, generator=gen)
  grads = torch.randn((STEPS, *SHAPE), generator=gen) * 0.01
  # Non-finite gradients: bnb leaves those elements' params alone and resets
  # their state (checked by the tests for every optimizer).
  grads[2, 0, 0] = float("nan")
  grads[2, 5, 7] = float("inf")
  out = {"float32": (p0.to(device), grads.to(device))}
  finite = torch.where(torch.isfinite(grads), grads, torch.zeros_like(grads))
  out["bfloat16"] = (p0.to(torch.bfloat16).to(device),
                     finite.to(torch.bfloat16).to(device))
  return out


def layout(state_dict):
  """JSON-able state_dict() structure (tensors as 'tensor:dtype:shape')."""
  def conv(v):
    if isinstance(v, torch.Tensor):
      return f"tensor:{str(v.dtype).replace('torch.', '')}:{list(v.shape)}"
    if isinstance(v, dict):
      return {str(k): conv(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
      return [conv(x) for x in v]
    return v
  return conv(state_dict)


def run_case(name, inputs):
  cls_name, kwargs, dtype = CASES[name]
  p0, grads = inputs[dtype]
  p = torch.nn.Parameter(p0.clone())
  opt = getattr(bnb.optim, cls_name)([p], **kwargs)
  out = {}
  for k in range(1, STEPS + 1):
    p.grad = grads[k - 1].clone()
    opt.step()
    st = opt.state[p]
    out[f"step{k}/p"] = bits(p.data)
    for key in STATE_KEYS:
      if key in st:
        out[f"step{k}/{key}"] = bits(st[key])
  st = opt.state[p]
  for key in ("qmap1", "qmap2"):
    if key in st:
      out[key] = bits(st[key])
  sd = opt.state_dict()
  meta = {"name": name, "class": cls_name, "kwargs": kwargs, "dtype": dtype,
          "shape": list(SHAPE), "steps": STEPS, "state_dict": layout(sd),
          "state_keys": sorted(k for k in STATE_KEYS if k in st)}
  out["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "bnb_optim"))
  parser.add_argument("--device", default="cuda",
                      help="cuda for the fixtures; cpu only to smoke-test")
  parser.add_argument("--cases", default=",".join(CASES))
  opts = parser.parse_args()
  os.makedirs(opts.out, exist_ok=True)
  inputs = make_inputs(opts.device)
  arrays = {}
  for dtype, (p0, grads) in inputs.items():
    arrays[f"{dtype}/p0"] = bits(p0)
    arrays[f"{dtype}/grads"] = bits(grads)
  np.savez_compressed(os.path.join(opts.out, "inputs.npz"), **arrays)
  for name in opts.cases.split(","):
    np.savez_compressed(os.path.join(opts.out, f"{name}.npz"),
                        **run_case(name, inputs))
    print("wrote", name)
  dev = (torch.cuda.get_device_name() if opts.device.startswith("cuda")
         else opts.device)
  with open(os.path.join(opts.out, "VERSIONS.txt"), "w") as f:
    f.write(f"torch {torch.__version__}\nbitsandbytes {bnb.__version__}\n"
            f"cuda {torch.version.cuda}\ndevice {dev}\n")
  total = sum(os.path.getsize(os.path.join(opts.out, n))
              for n in os.listdir(opts.out))
  print(f"total {total / 1e6:.2f} MB in {opts.out}")


if __name__ == "__main__":
  main()
