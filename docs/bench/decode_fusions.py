"""Runs the CLI with the table GEMV's build fusions (thirty-first
session) set from FUSE, a comma-separated list of those on: "swiglu"
(`gemv_4bit.SWIGLU_FUSED`: the MLP's down GEMV makes silu(gate) * up from
gate/up's partials) and "norm" (`gemv_4bit.NORM_FUSED`: the q/k/v and
gate/up GEMVs make the layer's RMSNorms). Unset, both are off (the
library's default is both on since the thirty-fourth session measured
them). WARP_DECODE, if set, is the TMA warp GEMV's decode
(`gemv_4bit_warp_tma.DECODE`: "prmt" or "lds", fortieth session);
WARP_ROUTE=s39 gives it the thirty-ninth session's routing below M = 8
(single weights with a side of 8192, no groups). K_MULTIPLE=1024 keeps
the Mosaic GPU GEMVs off weights whose k is not a multiple of 1024, as
before the forty-first session (`gemv_4bit.MOSAIC_K_MULTIPLE`). LOWER_ONCE=0
traces and lowers every kernel call on its own, as before the forty-second
session (`pallas_kernels.lowering.ENABLED`). On the GPU
machine:

    FUSE=swiglu,norm python docs/bench/decode_fusions.py bench decode --impl jax-nf4-dq --batch 1
"""
import os
import sys
from pallas_kernels import gemv_4bit
from pallas_kernels import gemv_4bit_warp_tma
_fuse = {f for f in os.environ.get("FUSE", "").split(",") if f}
if _fuse - {"swiglu", "norm"}:
  sys.exit(f"FUSE: names swiglu and norm, got {sorted(_fuse)}")
gemv_4bit.SWIGLU_FUSED = "swiglu" in _fuse
gemv_4bit.NORM_FUSED = "norm" in _fuse
_decode = os.environ.get("WARP_DECODE")
if _decode is not None:
  if _decode not in gemv_4bit_warp_tma.DECODES:
    sys.exit(f"WARP_DECODE: one of {gemv_4bit_warp_tma.DECODES}, got "
             f"{_decode!r}")
  gemv_4bit_warp_tma.DECODE = _decode
if os.environ.get("WARP_ROUTE") == "s39":
  gemv_4bit.WARP_TMA_MIN_ROWS = 8192
  gemv_4bit.WARP_TMA_GROUP_MIN_N = 1 << 40
elif os.environ.get("WARP_ROUTE"):
  sys.exit(f"WARP_ROUTE: s39 or unset, got {os.environ['WARP_ROUTE']!r}")
_k_multiple = os.environ.get("K_MULTIPLE")
if _k_multiple is not None:
  if _k_multiple not in ("256", "1024"):
    sys.exit(f"K_MULTIPLE: 256 or 1024, got {_k_multiple!r}")
  gemv_4bit.MOSAIC_K_MULTIPLE = int(_k_multiple)
_lower_once = os.environ.get("LOWER_ONCE")
if _lower_once is not None:
  if _lower_once not in ("0", "1"):
    sys.exit(f"LOWER_ONCE: 0 or 1, got {_lower_once!r}")
  from pallas_kernels import lowering  # pylint: disable=g-import-not-at-top
  lowering.ENABLED = _lower_once == "1"
from jaxbnb._src.tools import cli  # pylint: disable=g-import-not-at-top
sys.exit(cli.main(sys.argv[1:]))
