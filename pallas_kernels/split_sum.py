"""The sum of a kernel's K-split partials, written so XLA fuses it onward.

The GEMV kernels split K over programs and return fp32 partials
`[splits, ...]`. Summed with `jnp.sum(part, axis=0)` that is a reduction,
and XLA gives a reduction its own kernel: in a decode step the partials'
sum, then the residual add with RMSNorm's sum of squares, then its
multiply, each ran apart (about 1.2-1.9 us a kernel on the H200,
docs/benchmarks.md, twenty-sixth session). Written as adds of slices the
sum is elementwise, and XLA fuses it into whatever reads it: the
residual add, the norm's reduction, SiLU(gate) * up.
"""

from __future__ import annotations

import jax

__all__ = ["sum_splits"]


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
