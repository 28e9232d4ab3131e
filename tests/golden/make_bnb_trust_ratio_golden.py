"""Regenerates tests/golden/bnb_trust_ratio.npz: bnb's LAMB and LARS (32-bit).

  python tests/golden/make_bnb_trust_ratio_golden.py \
      --out tests/golden/bnb_trust_ratio.npz [--backend cuda]

bitsandbytes 0.50.2 runs `LAMB32bit` / `LARS32bit` (`max_unorm > 0`) as a
preconditioning pass that sums the squared update, then the Adam or
momentum step scaled by the trust ratio. Two sources of that computation:

* `--backend cuda` (a CUDA machine): the optimizer classes themselves, i.e.
  bnb's CUDA kernels.
* `--backend default` (the default; any machine): bnb's own torch version
  of those kernels, `bitsandbytes.backends.default.ops`
  (`_optimizer_precondition_32bit` then `_optimizer_update_32bit`, called
  as its registered `optimizer_update_32bit` calls them). It follows the
  CUDA kernels except that Adam's decoupled weight decay comes before the
  step instead of after (a difference of `lr wd |update|`). bnb's CPU
  backend (what the classes run on a CPU) computes LAMB's update norm
  without the bias corrections, unlike CUDA, so it is not used.

Also `PytorchLARS`, bnb's pure-PyTorch LARS that its tests compare `LARS`
against. The committed fixture was made with `--backend default`.

Cases (CASES): name -> (bnb optimizer name, lr, beta1, beta2, eps,
weight_decay, max_unorm); the trust ratio clips in every case but
`lars_unclipped`. Stored: `p0` [SHAPE] float32, `grads` [STEPS, *SHAPE],
`<case>` [STEPS, *SHAPE] (the parameter after each step), `meta` (JSON).
The script imports torch and bitsandbytes only, never jaxbnb.
"""

import argparse
import json

import numpy as np

SHAPE = (24, 40)
STEPS = 5
SEED = 0
CASES = {
    "lamb": ("lamb", 1e-2, 0.9, 0.999, 1e-8, 0.0, 1.0),
    "lamb_wd": ("lamb", 1e-2, 0.9, 0.999, 1e-8, 1e-2, 0.05),
    "lars": ("lars", 0.5, 0.9, 0.0, 0.0, 0.0, 0.02),
    "lars_wd": ("lars", 0.5, 0.9, 0.0, 0.0, 1e-2, 0.02),
    "lars_unclipped": ("lars", 0.01, 0.9, 0.0, 0.0, 0.0, 5.0),
}


def _default(name, p0, grads, lr, b1, b2, eps, wd, max_unorm):
  import torch
  from bitsandbytes.backends.default import ops
  p = torch.tensor(p0.copy())
  s1 = torch.zeros_like(p)
  s2 = torch.zeros_like(p) if name == "lamb" else None
  unorm = torch.zeros(1)
  opt_id = ops.name2optimizer_id[name]
  out = []
  for t, g in enumerate(grads, 1):
    g = torch.tensor(g)
    pnorm = torch.norm(p.float()).item()
    unorm.zero_()
    ops._optimizer_precondition_32bit(g, p, s1, s2, unorm, b1, b2, eps, wd,
                                      t, lr, 1.0, opt_id)
    ops._optimizer_update_32bit(g, p, s1, s2, unorm, max_unorm, pnorm, b1,
                                b2, 0.0, 0.0, eps, wd, t, lr, 1.0, opt_id)
    out.append(p.numpy().copy())
  return np.stack(out)


def _cuda(name, p0, grads, lr, b1, b2, eps, wd, max_unorm):
  import bitsandbytes as bnb
  import torch
  p = torch.nn.Parameter(torch.tensor(p0.copy(), device="cuda"))
  if name == "lamb":
    opt = bnb.optim.LAMB32bit([p], lr=lr, betas=(b1, b2), eps=eps,
                              weight_decay=wd, max_unorm=max_unorm)
  else:
    opt = bnb.optim.LARS32bit([p], lr=lr, momentum=b1, weight_decay=wd,
                              max_unorm=max_unorm)
  out = []
  for g in grads:
    p.grad = torch.tensor(g, device="cuda")
    opt.step()
    out.append(p.detach().cpu().numpy().copy())
  return np.stack(out)


def _pytorch_lars(p0, grads):
  import bitsandbytes as bnb
  import torch
  p = torch.nn.Parameter(torch.tensor(p0.copy()))
  opt = bnb.optim.PytorchLARS([p], lr=0.5, momentum=0.9, max_unorm=0.02)
  out = []
  for g in grads:
    p.grad = torch.tensor(g)
    opt.step()
    out.append(p.detach().numpy().copy())
  return np.stack(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--backend", choices=("default", "cuda"),
                      default="default")
  args = parser.parse_args()
  import bitsandbytes as bnb
  import torch
  rng = np.random.default_rng(SEED)
  p0 = (rng.standard_normal(SHAPE) * 0.1).astype(np.float32)
  grads = (rng.standard_normal((STEPS, *SHAPE)) * 0.05).astype(np.float32)
  run = _cuda if args.backend == "cuda" else _default
  arrays = {name: run(*cfg[:1], p0, grads, *cfg[1:])
            for name, cfg in CASES.items()}
  arrays["pytorch_lars"] = _pytorch_lars(p0, grads)
  meta = {"backend": args.backend, "cases": CASES,
          "pytorch_lars": ("lars", 0.5, 0.9, 0.0, 0.0, 0.0, 0.02),
          "bitsandbytes": bnb.__version__, "torch": torch.__version__}
  np.savez(args.out, p0=p0, grads=grads, meta=json.dumps(meta), **arrays)


if __name__ == "__main__":
  main()
