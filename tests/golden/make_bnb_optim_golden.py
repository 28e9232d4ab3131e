"""Regenerates the bitsandbytes 8-bit optimizer fixtures (tests/golden/bnb_optim).

Run on a CUDA machine with torch and bitsandbytes 0.50.2 importable:

  python tests/golden/make_bnb_optim_golden.py --out tests/golden/bnb_optim

It writes (format version 2, ``format_version`` in every file):
  * ``inputs.npz``: ``format_version``; per parameter dtype (``float32``,
    ``bfloat16``) the seeded initial parameter ``<dtype>/p0`` of shape SHAPE
    and the clean gradients ``<dtype>/grads`` of STEPS steps,
    ``[STEPS, *SHAPE]``, all finite; and ``float32/nan_grads``,
    ``[NAN_STEPS, *SHAPE]``: the first NAN_STEPS - 1 clean gradients, then one
    holding a NaN and an Inf (NAN_ELEMENTS).
  * ``<case>.npz`` per optimizer case (CASES): ``format_version``, ``meta``
    (JSON: bnb class, kwargs, dtype, shape, steps, nan_steps, nan_elements,
    and the ``state_dict()`` layout with tensors written as
    ``"tensor:<dtype>:<shape>"``), ``qmap1``/``qmap2`` (8-bit cases), and
    after each step k = 1..STEPS of the clean trajectory ``step<k>/p`` plus
    the state tensors ``step<k>/state1``, ``state2``, ``absmax1``,
    ``absmax2`` (those the optimizer has). The float32 cases also hold the
    NaN trajectory, a fresh optimizer from the same p0 fed ``nan_grads``:
    ``nan/step<k>/...`` for k = 1..NAN_STEPS (meta ``nan_steps``; 0 for the
    bfloat16 case, which has no NaN trajectory).
  * ``VERSIONS.txt``: torch, bitsandbytes, CUDA and device.

Format version 1 (no ``format_version`` key) had one 5-step trajectory with
the NaN/Inf at step 3, which cut the comparison of the 1-state optimizers
(they do not reset a NaN state) to 2 steps; version 2 keeps the clean
trajectory NaN-free so every step of every optimizer is compared.

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

FORMAT_VERSION = 2
SHAPE = (64, 67)
STEPS = 20
NAN_STEPS = 3  # the NaN trajectory: 2 clean steps, then the NaN/Inf step
NAN_ELEMENTS = {"nan": (0, 0), "inf": (5, 7)}
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
  """Seeded p0, clean gradients and (float32) NaN-trajectory gradients per
  dtype: {dtype: (p0, grads, nan_grads or None)} (torch, on `device`)."""
  gen = torch.Generator().manual_seed(SEED)
  p0 = torch.randn(SHAPE, generator=gen)
  grads = torch.randn((STEPS, *SHAPE), generator=gen) * 0.01
  # Non-finite gradients: bnb leaves those elements' params alone and resets
  # their state (the 2-state kernels; the 1-state ones do not). A separate
  # trajectory, so the clean one stays comparable at every step.
  nan_grads = grads[:NAN_STEPS].clone()
  nan_grads[NAN_STEPS - 1][NAN_ELEMENTS["nan"]] = float("nan")
  nan_grads[NAN_STEPS - 1][NAN_ELEMENTS["inf"]] = float("inf")
  out = {"float32": (p0.to(device), grads.to(device), nan_grads.to(device))}
  out["bfloat16"] = (p0.to(torch.bfloat16).to(device),
                     grads.to(torch.bfloat16).to(device), None)
  return out


def trajectory(cls_name, kwargs, p0, grads, prefix=""):
  """Runs a fresh bnb optimizer over `grads`: ({prefix}step<k>/... arrays,
  the final optimizer state, the optimizer)."""
  p = torch.nn.Parameter(p0.clone())
  opt = getattr(bnb.optim, cls_name)([p], **kwargs)
  out = {}
  for k in range(1, grads.shape[0] + 1):
    p.grad = grads[k - 1].clone()
    opt.step()
    st = opt.state[p]
    out[f"{prefix}step{k}/p"] = bits(p.data)
    for key in STATE_KEYS:
      if key in st:
        out[f"{prefix}step{k}/{key}"] = bits(st[key])
  return out, opt.state[p], opt


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
  p0, grads, nan_grads = inputs[dtype]
  out, st, opt = trajectory(cls_name, kwargs, p0, grads)
  for key in ("qmap1", "qmap2"):
    if key in st:
      out[key] = bits(st[key])
  sd = opt.state_dict()
  if nan_grads is not None:
    out.update(trajectory(cls_name, kwargs, p0, nan_grads, prefix="nan/")[0])
  meta = {"name": name, "class": cls_name, "kwargs": kwargs, "dtype": dtype,
          "shape": list(SHAPE), "steps": STEPS,
          "nan_steps": NAN_STEPS if nan_grads is not None else 0,
          "nan_elements": {k: list(v) for k, v in NAN_ELEMENTS.items()},
          "format_version": FORMAT_VERSION, "state_dict": layout(sd),
          "state_keys": sorted(k for k in STATE_KEYS if k in st)}
  out["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
  out["format_version"] = np.asarray(FORMAT_VERSION, np.int32)
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
  arrays = {"format_version": np.asarray(FORMAT_VERSION, np.int32)}
  for dtype, (p0, grads, nan_grads) in inputs.items():
    arrays[f"{dtype}/p0"] = bits(p0)
    arrays[f"{dtype}/grads"] = bits(grads)
    if nan_grads is not None:
      arrays[f"{dtype}/nan_grads"] = bits(nan_grads)
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
