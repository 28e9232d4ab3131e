"""L2 prefetches a kernel issues for a later kernel's input.

A decode step runs its GEMVs one after another with small kernels between
them (RoPE and attention, the residual adds), during which the HBM is
idle, and every GEMV starts with its weight stream's ramp. A kernel that
knows the next GEMV's weight can ask the memory system for some of it
(`cp.async.bulk.prefetch.L2.global`, sm_90: no shared memory, no
completion to wait for), so that the next GEMV finds those lines in L2.

What is fetched is `count` runs of `length` bytes, `stride` apart, from
the start of a flat input of `size` bytes (clipped to it): a whole
weight (`whole`), or the first row tiles of every row group of a table
GEMV launch (`leading_rows`), whose programs all start at once. The runs
are cut into pieces of `PIECE` bytes and spread over the programs of the
issuing kernel and, in each, over its first threads.

Example (the PTX of one prefetch, for a kernel of 132 programs):

  >>> from pallas_kernels import l2_prefetch
  >>> spec = l2_prefetch.whole(8 * 2**20)
  >>> spec.pieces
  2048
  >>> "cp.async.bulk.prefetch.L2.global" in l2_prefetch.ptx((spec,), 132)
  True
"""

from __future__ import annotations

import dataclasses
import functools

__all__ = ["PIECE", "Prefetch", "leading_rows", "ptx", "whole"]

PIECE = 4096  # bytes a prefetch instruction


@dataclasses.dataclass(frozen=True)
class Prefetch:
  """Which bytes of one flat input a kernel prefetches into L2.

  Attributes:
    size: the input's bytes (every run is clipped to them).
    count: runs.
    stride: bytes from one run's start to the next's (a multiple of 16).
    length: bytes a run (a multiple of 16).
  """
  size: int
  count: int
  stride: int
  length: int

  def __post_init__(self):
    for name in ("size", "count", "stride", "length"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
    for name in ("size", "stride", "length"):
      if getattr(self, name) % 16:
        raise ValueError(f"{name}: must be a multiple of 16 (the bulk "
                         f"prefetch's unit), got {getattr(self, name)}")
    if self.size >= 2**31:
      raise ValueError(f"size: must be < 2**31 bytes (32-bit offsets), got "
                       f"{self.size}")

  @property
  def pieces(self) -> int:
    """Prefetch instructions in all: `PIECE`-byte pieces of every run."""
    return self.count * -(-self.length // PIECE)


def whole(size: int) -> Prefetch:
  """All `size` bytes of an input (a multiple of 16)."""
  return Prefetch(size=size, count=1, stride=size, length=size)


def leading_rows(rows: int, row_bytes: int, rows_a_group: int,
                 lead: int) -> Prefetch:
  """The first `lead` rows of each group of `rows_a_group` rows of a
  `[rows, row_bytes]` input: what the programs of a launch that walks
  each row group from its first row read first."""
  lead = min(lead, rows_a_group)
  return Prefetch(size=rows * row_bytes, count=-(-rows // rows_a_group),
                  stride=rows_a_group * row_bytes, length=lead * row_bytes)


@functools.lru_cache(maxsize=None)
def ptx(specs: tuple[Prefetch, ...], programs: int, threads: int = 128
        ) -> str:
  """The PTX block (no results) that issues `specs`' prefetches, operand
  `$i` the generic address of input `i`: piece `q` of a spec (run
  `q // per_run`, its piece `q % per_run`) is issued by program
  `q % programs` (`%ctaid.y * %nctaid.x + %ctaid.x`), in it by thread
  `q // programs` (which loops past `threads`)."""
  lines = ["{", ".reg .b32 t, p, a, j, w, q, z;", ".reg .b64 g, d;",
           ".reg .pred f;", "mov.u32 t, %tid.x;", "mov.u32 p, %ctaid.y;",
           "mov.u32 a, %nctaid.x;", "mov.u32 q, %ctaid.x;",
           "mad.lo.u32 p, p, a, q;"]
  for i, spec in enumerate(specs):
    per_run = -(-spec.length // PIECE)
    per_program = -(-spec.pieces // programs)
    lines += [f"cvta.to.global.u64 g, ${i};"]
    for u in range(-(-per_program // threads)):
      lines += [
          f"add.u32 a, t, {threads * u};",
          f"setp.lt.u32 f, a, {per_program};",
          f"mad.lo.u32 a, a, {programs}, p;",
          f"@f setp.lt.u32 f, a, {spec.pieces};",
          f"div.u32 j, a, {per_run};", f"rem.u32 w, a, {per_run};",
          f"mul.lo.u32 w, w, {PIECE};",
          f"mad.lo.u32 q, j, {spec.stride}, w;",
          f"@f setp.lt.u32 f, q, {spec.size};",
          # The piece's bytes: to its run's end, to the input's end.
          f"mov.u32 z, {spec.length};", "sub.u32 z, z, w;",
          f"min.u32 z, z, {PIECE};",
          f"mov.u32 a, {spec.size};", "sub.u32 a, a, q;",
          "min.u32 z, z, a;",
          "cvt.u64.u32 d, q;", "add.u64 d, d, g;",
          "@f cp.async.bulk.prefetch.L2.global [d], z;"]
  lines += ["}"]
  return "\n".join(lines)
