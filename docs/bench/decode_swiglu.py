"""Runs the CLI with the MLP's fused SwiGLU launches (`matmul_4bit_swiglu`,
thirty-first session, `gemv_4bit.SWIGLU_FUSED`) on with SWIGLU=fused, or
off, the default: the three matmuls apart (gate/up's partials summed with
silu(gate) * up in an XLA kernel). On the GPU machine:

    SWIGLU=fused python docs/bench/decode_swiglu.py bench decode --impl jax-nf4-dq --batch 1
"""
import os
import sys
if os.environ.get("SWIGLU") == "fused":
  from pallas_kernels import gemv_4bit
  gemv_4bit.SWIGLU_FUSED = True
from jaxbnb._src.tools import cli
sys.exit(cli.main(sys.argv[1:]))
