"""Runs the CLI with `gemv_4bit_warp_tma`'s default K chunks a program set by
KCHUNKS (docs/benchmarks.md, twenty-eighth session): 1, 2, 4, or a rule:
A (2 where k <= 4096, else 1), B (A, but 4 for one weight of at most 4096
rows). On the GPU machine:

    KCHUNKS=A python docs/bench/decode_kchunks.py bench decode --impl jax-nf4-dq --batch 8
"""
import os
import sys
from pallas_kernels import gemv_4bit_warp_tma as wt
_orig = wt.default_config
def default_config(ns, k, num_sms=132, kchunks=None):
  if kchunks is None:
    rule = os.environ.get("KCHUNKS", "1")
    if rule in ("A", "B"):
      kchunks = 2 if k <= 4096 else 1
      if rule == "B" and k <= 4096 and len(ns) == 1 and ns[0] <= 4096:
        kchunks = 4
    else:
      kchunks = int(rule)
  return _orig(ns, k, num_sms, kchunks=kchunks)
wt.default_config = default_config
from jaxbnb._src.tools import cli
sys.exit(cli.main(sys.argv[1:]))
