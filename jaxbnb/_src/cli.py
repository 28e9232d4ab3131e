"""The `jaxbnb` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _demo(args: argparse.Namespace) -> int:
  """Quantizes a random weight matrix and reports bytes and error."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from jaxbnb import functional as F  # pylint: disable=g-import-not-at-top
  from jaxbnb._src.quantize_model import memory_footprint  # pylint: disable=g-import-not-at-top

  dtype = jnp.dtype(args.dtype)
  key = jax.random.key(args.seed)
  w = (jax.random.normal(key, (args.rows, args.cols), jnp.float32)
       / jnp.sqrt(args.cols)).astype(dtype)
  print(f"jaxbnb demo on {jax.devices()[0].platform}: weight "
        f"[{args.rows}, {args.cols}] {dtype.name}")
  print(f"{'format':<22}{'bytes':>14}{'ratio':>8}{'mean|err|':>12}"
        f"{'rel err':>10}{'time':>9}")
  base = memory_footprint(w)
  print(f"{dtype.name:<22}{base:>14,}{1.0:>8.3f}{0.0:>12.2e}{0.0:>10.4f}"
        f"{'':>9}")
  x = jax.random.normal(jax.random.key(args.seed + 1), (args.batch, args.cols),
                        dtype)
  y_ref = x.astype(jnp.float32) @ w.astype(jnp.float32).T
  for quant_type in ("nf4", "fp4"):
    for double in (False, True):
      t0 = time.perf_counter()
      q = F.Params4bit.from_float(w, quant_type=quant_type,
                                  blocksize=args.blocksize,
                                  compress_statistics=double)
      jax.block_until_ready(q)
      elapsed = time.perf_counter() - t0
      wd = q.dequantize().astype(jnp.float32)
      err = jnp.abs(wd - w.astype(jnp.float32))
      rel = float(err.mean() / jnp.abs(w.astype(jnp.float32)).mean())
      nbytes = memory_footprint(q)
      name = f"{quant_type}{' + double quant' if double else ''}"
      print(f"{name:<22}{nbytes:>14,}{nbytes / base:>8.3f}"
            f"{float(err.mean()):>12.2e}{rel:>10.4f}{elapsed:>8.2f}s")
  q = F.Params4bit.from_float(w, quant_type="nf4", compress_statistics=True)
  y = F.matmul_4bit(x, q.data, q.quant_state)
  rel = float(jnp.linalg.norm(y.astype(jnp.float32) - y_ref)
              / jnp.linalg.norm(y_ref))
  print(f"matmul_4bit (nf4 + double quant) x[{args.batch}, {args.cols}]: "
        f"relative error {rel:.4f} vs the {dtype.name} matmul")
  return 0


def main(argv: list[str] | None = None) -> int:
  """Entry point of the `jaxbnb` console script."""
  from jaxbnb import __version__  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(
      prog="jaxbnb",
      description="bitsandbytes for JAX: 4-bit and 8-bit quantization.")
  parser.add_argument("--version", action="version",
                      version=f"jaxbnb {__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  demo = sub.add_parser(
      "demo", help="quantize a random weight matrix; show bytes and error")
  demo.add_argument("--rows", type=int, default=4096)
  demo.add_argument("--cols", type=int, default=4096)
  demo.add_argument("--dtype", default="bfloat16",
                    choices=["float32", "float16", "bfloat16"])
  demo.add_argument("--blocksize", type=int, default=64)
  demo.add_argument("--batch", type=int, default=8)
  demo.add_argument("--seed", type=int, default=0)
  demo.set_defaults(func=_demo)
  from jaxbnb._src import bench  # pylint: disable=g-import-not-at-top
  bench.add_parser(sub)
  args = parser.parse_args(argv)
  for name in ("rows", "cols", "batch"):
    if getattr(args, name, 1) < 1:
      parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
  return args.func(args)


if __name__ == "__main__":
  sys.exit(main())
