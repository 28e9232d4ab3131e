"""Runs the CLI with the table GEMV's build fusions (thirty-first
session) set from FUSE, a comma-separated list of those on: "swiglu"
(`gemv_4bit.SWIGLU_FUSED`: the MLP's down GEMV makes silu(gate) * up from
gate/up's partials) and "norm" (`gemv_4bit.NORM_FUSED`: the q/k/v and
gate/up GEMVs make the layer's RMSNorms). Unset, both are off (the
library's default is both on since the thirty-fourth session measured
them). On the GPU machine:

    FUSE=swiglu,norm python docs/bench/decode_fusions.py bench decode --impl jax-nf4-dq --batch 1
"""
import os
import sys
from pallas_kernels import gemv_4bit
_fuse = {f for f in os.environ.get("FUSE", "").split(",") if f}
if _fuse - {"swiglu", "norm"}:
  sys.exit(f"FUSE: names swiglu and norm, got {sorted(_fuse)}")
gemv_4bit.SWIGLU_FUSED = "swiglu" in _fuse
gemv_4bit.NORM_FUSED = "norm" in _fuse
from jaxbnb._src.tools import cli  # pylint: disable=g-import-not-at-top
sys.exit(cli.main(sys.argv[1:]))
