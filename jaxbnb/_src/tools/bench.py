"""`jaxbnb bench`: the benchmark subcommands, one module each.

* `matmul`, `quant`, `report`: 4-bit matmul and (de)quantization against
  bf16, bitsandbytes and a bandwidth floor (`bench_matmul`);
* `int8`: the LLM.int8 `matmul_8bit` against XLA's bf16 and int8 dots and
  a weight-bandwidth floor (`bench_int8`);
* `decode`, `decode-report`: end-to-end decode tokens/s (`bench_decode`);
* `optim`: optimizer step time and state memory (`bench_optim`);
* `qlora`, `qlora-report`: the (Q)LoRA training step (`bench_train`).

They share the timing helpers of `measure` and the reporting helpers of
`report`.
"""

from __future__ import annotations

from jaxbnb._src.tools import bench_decode
from jaxbnb._src.tools import bench_int8
from jaxbnb._src.tools import bench_matmul
from jaxbnb._src.tools import bench_optim
from jaxbnb._src.tools import bench_train

__all__ = ["add_parser"]


def add_parser(subparsers) -> None:
  """Adds `bench` and its subcommands to the `jaxbnb` subcommands.

  Args:
    subparsers: the subparsers action of the `jaxbnb` parser (what
      `argparse.ArgumentParser.add_subparsers` returns).
  """
  bench = subparsers.add_parser(
      "bench", help="time 4-bit matmul and (de)quantization against bf16, "
      "bitsandbytes and a bandwidth floor; decode speed; optimizer steps")
  sub = bench.add_subparsers(dest="bench_command", required=True)
  bench_matmul.add_parsers(sub)
  bench_int8.add_parsers(sub)
  bench_decode.add_parsers(sub)
  bench_optim.add_parsers(sub)
  bench_train.add_parsers(sub)
