"""The sum of a kernel's K-split partials, written so XLA fuses it onward;
and, where a residual add reads it, both in one Pallas kernel.

The GEMV kernels split K over programs and return fp32 partials
`[splits, ...]`. Summed with `jnp.sum(part, axis=0)` that is a reduction,
and XLA gives a reduction its own kernel: in a decode step the partials'
sum, then the residual add with RMSNorm's sum of squares, then its
multiply, each ran apart (about 1.2-1.9 us a kernel on the H200,
docs/benchmarks.md, twenty-sixth session). Written as adds of slices the
sum is elementwise, and XLA fuses it into whatever reads it: the
residual add, the norm's reduction, SiLU(gate) * up.

XLA makes that fusion one thread an output value, though: at one row of
x, a residual add of 4096 values reading the down projection's 56
partials (K = 14336) ran on a few SMs, each thread adding 56 loads, and
took 3.1 us on the H100 against 1.2 for o's 16 (docs/benchmarks.md,
fifty-second session). `add_splits` does the sum and the residual add in
one Pallas kernel whose programs take 32 columns each, with every one of
their partials' loads in flight at once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _backend
from pallas_kernels._backend import pl

__all__ = ["ADD_BLOCK", "add_reference", "add_splits", "can_add",
           "sum_splits"]

ADD_BLOCK = 32  # columns an `add_splits` program: one warp, one a thread


def sum_splits(part: jax.Array) -> jax.Array:
  """`part` summed over axis 0 by pairwise adds of slices (no reduction op).

  The order is fixed: a pairwise tree (rows `2i` and `2i + 1` first), the
  odd last row of a level set aside and added, in turn, after the tree.

  Args:
    part: `[splits, ...]`, splits >= 1.

  Returns:
    `part.sum(0)`, same dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels.split_sum import sum_splits
    >>> sum_splits(jnp.arange(12.0).reshape(3, 4)).tolist()
    [12.0, 15.0, 18.0, 21.0]
  """
  if part.ndim < 1 or part.shape[0] < 1:
    raise ValueError(f"part: needs a leading axis of >= 1 splits, got shape "
                     f"{part.shape}")
  aside = []
  while part.shape[0] > 1:
    if part.shape[0] % 2:
      aside.append(part[-1])
      part = part[:-1]
    part = part[0::2] + part[1::2]
  total = part[0]
  for row in aside:
    total = total + row
  return total


def _pairwise(rows: list) -> jax.Array:
  """`sum_splits`' order over a list of equal arrays (row i = part[i]):
  `add_splits`' programs load their partials a row at a time (Triton's
  blocks are powers of two; the splits, 56 at K = 14336, are not)."""
  aside = []
  while len(rows) > 1:
    if len(rows) % 2:
      aside.append(rows[-1])
      rows = rows[:-1]
    rows = [a + b for a, b in zip(rows[0::2], rows[1::2])]
  total = rows[0]
  for row in aside:
    total = total + row
  return total


def can_add(n: int) -> bool:
  """Whether `add_splits` takes `n` columns: a positive multiple of
  `ADD_BLOCK` (the caller picks the kernel only where Pallas' GPU
  kernels run, or interpret mode)."""
  return n > 0 and n % ADD_BLOCK == 0


def add_reference(part: jax.Array, residual: jax.Array, row0: int = 0
                  ) -> jax.Array:
  """`residual + sum_splits(part)` of columns `row0 ..`, the sum rounded to
  the residual's dtype first (a model's `x + mlp(x)` in its dtype)."""
  n = residual.shape[-1]
  total = sum_splits(part[:, row0:row0 + n])
  return residual + total.astype(residual.dtype).reshape(residual.shape)


def _add_kernel(part_ref, res_ref, o_ref, *, splits, row0):
  i = pl.program_id(0)
  cols = pl.ds(i * ADD_BLOCK, ADD_BLOCK)
  total = _pairwise([part_ref[s, pl.ds(row0 + i * ADD_BLOCK, ADD_BLOCK)]
                     for s in range(splits)])
  dtype = o_ref.dtype
  # As XLA adds two 16-bit arrays: both in fp32, the sum rounded once.
  y = total.astype(dtype).astype(jnp.float32)
  o_ref[0, cols] = (res_ref[0, cols].astype(jnp.float32) + y).astype(dtype)


@functools.partial(jax.jit, static_argnames=("row0", "interpret"))
def add_splits(part: jax.Array, residual: jax.Array, *, row0: int = 0,
               interpret: bool = False) -> jax.Array:
  """`add_reference(part, residual, row0)` in one kernel.

  The same bits as the reference: the partials summed in `sum_splits`'
  order, rounded to the residual's dtype, added to it in fp32 and
  rounded again. One program takes `ADD_BLOCK` columns.

  Args:
    part: float32 `[splits, cols]`, a GEMV's K-split partials of one row.
    residual: `[1, n]`, a float dtype; `n` a multiple of `ADD_BLOCK`.
    row0: the first of the `n` columns of `part` to sum (a weight's rows
      in a launch of several).
    interpret: run the kernel in Pallas' interpreter (CPU).

  Returns:
    `[1, n]` in the residual's dtype.

  Raises:
    ValueError: naming the argument.

  Example:
    >>> import jax.numpy as jnp
    >>> from pallas_kernels.split_sum import add_splits
    >>> part = jnp.ones((3, 64), jnp.float32)
    >>> y = add_splits(part, jnp.full((1, 32), 0.5, jnp.bfloat16), row0=32,
    ...                interpret=True)
    >>> y.dtype.name, float(y[0, 0])
    ('bfloat16', 3.5)
  """
  if part.ndim != 2 or part.shape[0] < 1 or part.dtype != jnp.float32:
    raise ValueError(f"part: needs float32 [splits >= 1, cols], got "
                     f"{part.dtype} {part.shape}")
  if residual.ndim != 2 or residual.shape[0] != 1 or not jnp.issubdtype(
      residual.dtype, jnp.floating):
    raise ValueError(f"residual: needs a float [1, n], got {residual.dtype} "
                     f"{residual.shape}")
  splits, cols = part.shape
  n = residual.shape[1]
  if not can_add(n):
    raise ValueError(f"residual: n must be a positive multiple of "
                     f"{ADD_BLOCK}, got {n}")
  if row0 < 0 or row0 + n > cols:
    raise ValueError(f"row0: columns {row0}..{row0 + n} must lie in part's "
                     f"{cols}, got row0={row0}")
  part, residual = _backend.same_vma(part, residual)
  return pl.pallas_call(
      functools.partial(_add_kernel, splits=splits, row0=row0),
      out_shape=_backend.out_struct((1, n), residual.dtype, part, residual),
      grid=(n // ADD_BLOCK,),
      compiler_params=_backend.compiler_params(num_warps=1, num_stages=1),
      interpret=interpret,
      name="jaxbnb_add_splits",
  )(part, residual)
