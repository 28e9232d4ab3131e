"""Token sampling: greedy, temperature, top-k, top-p, repetition penalty.

Everything here is pure `jax.numpy` and works under `jax.jit` with the
sampling parameters traced (changing `temperature`, `top_k` or `top_p` does
not recompile). Filters follow Hugging Face's order: temperature, then top-k,
then top-p. Ties are broken deterministically by token id: among equal logits
the lower id ranks first, so `top_k=k` keeps exactly `k` tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "apply_repetition_penalty",
    "greedy",
    "process_logits",
    "row_keys",
    "sample",
    "step_keys",
    "top_k_mask",
    "top_p_mask",
]

_NEG_INF = -jnp.inf


def greedy(logits: jax.Array) -> jax.Array:
  """The most likely token of each row (lowest id among ties).

  Args:
    logits: `[..., vocab]` scores.

  Returns:
    int32 `[...]` token ids.

  Examples:
    >>> import jax.numpy as jnp
    >>> greedy(jnp.array([[0.1, 2.0, 2.0], [3.0, 0.0, 1.0]])).tolist()
    [1, 0]
  """
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _rank_order(logits):
  """Token ids sorted by descending logit (stable: lower id first on ties)."""
  return jnp.argsort(-logits, axis=-1, stable=True)


def _unsort(sorted_values, order):
  """Scatter values given in `order` back to token-id order."""
  inverse = jnp.argsort(order, axis=-1)
  return jnp.take_along_axis(sorted_values, inverse, axis=-1)


def _keep_sorted(sorted_logits, top_k, top_p):
  """Keep-mask over logits already sorted descending (top-k, then top-p)."""
  vocab = sorted_logits.shape[-1]
  rank = jnp.arange(vocab, dtype=jnp.int32)
  top_k = jnp.asarray(top_k, jnp.int32)
  keep = jnp.where(top_k > 0, rank < top_k, True)
  keep = jnp.broadcast_to(keep, sorted_logits.shape)
  # top-p on what top-k left: a token stays if the mass ranked above it is
  # still below top_p (so the kept set is the smallest reaching top_p).
  masked = jnp.where(keep, sorted_logits, _NEG_INF)
  probs = jax.nn.softmax(masked.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  top_p = jnp.asarray(top_p, jnp.float32)
  keep_p = (mass_before < top_p) | (top_p >= 1.0)
  keep_p = keep_p | (rank == 0)  # the top token always survives
  return keep & keep_p


def top_k_mask(logits: jax.Array, top_k) -> jax.Array:
  """Which tokens top-k keeps: the `top_k` highest logits (0 keeps all).

  Args:
    logits: `[..., vocab]` scores.
    top_k: int (may be traced); 0 disables the filter.

  Returns:
    bool `[..., vocab]`, True where the token is kept.

  Examples:
    >>> import jax.numpy as jnp
    >>> top_k_mask(jnp.array([1.0, 3.0, 2.0, 3.0]), 2).tolist()
    [False, True, False, True]
  """
  order = _rank_order(logits)
  rank = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  top_k = jnp.asarray(top_k, jnp.int32)
  keep = jnp.broadcast_to(jnp.where(top_k > 0, rank < top_k, True),
                          logits.shape)
  return _unsort(keep, order)


def top_p_mask(logits: jax.Array, top_p) -> jax.Array:
  """Which tokens nucleus (top-p) sampling keeps.

  The kept set is the smallest set of highest-probability tokens whose total
  probability is at least `top_p`; the most likely token is always kept, and
  `top_p=1` keeps everything.

  Args:
    logits: `[..., vocab]` scores.
    top_p: float in [0, 1] (may be traced).

  Returns:
    bool `[..., vocab]`, True where the token is kept.

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([0.1, 0.5, 0.15, 0.25]))
    >>> top_p_mask(logits, 0.7).tolist()
    [False, True, False, True]
  """
  order = _rank_order(logits)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  return _unsort(_keep_sorted(sorted_logits, 0, top_p), order)


def process_logits(logits: jax.Array, *, temperature=1.0, top_k=0,
                   top_p=1.0) -> jax.Array:
  """Temperature, then top-k, then top-p; removed tokens become `-inf`.

  Args:
    logits: `[..., vocab]` scores.
    temperature: positive float; logits are divided by it.
    top_k: keep the `top_k` most likely tokens (0: off).
    top_p: then keep the smallest nucleus with probability >= `top_p`.

  Returns:
    float32 `[..., vocab]` processed logits.

  Examples:
    >>> import jax.numpy as jnp
    >>> out = process_logits(jnp.array([0.0, 2.0, 1.0]), temperature=2.0,
    ...                      top_k=2)
    >>> out.tolist()
    [-inf, 1.0, 0.5]
  """
  logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
  order = _rank_order(logits)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  keep = _unsort(_keep_sorted(sorted_logits, top_k, top_p), order)
  return jnp.where(keep, logits, _NEG_INF)


def row_keys(seed: int, batch: int) -> jax.Array:
  """One PRNG key per batch row, derived from `seed`.

  Row `i` gets `fold_in(key(seed), i)`, so a row's random stream does not
  depend on the batch size.

  Examples:
    >>> row_keys(0, 3).shape
    (3,)
  """
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(
      jnp.arange(batch, dtype=jnp.uint32))


def step_keys(keys: jax.Array, step) -> jax.Array:
  """The keys for decoding step `step` (may be traced) of each row."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


def sample(logits: jax.Array, keys: jax.Array | None = None, *,
           do_sample: bool = True, temperature=1.0, top_k=0,
           top_p=1.0) -> jax.Array:
  """Picks one token per row.

  Args:
    logits: `[batch, vocab]` scores.
    keys: `[batch]` PRNG keys (see `row_keys`, `step_keys`); unused when
      `do_sample` is False.
    do_sample: static Python bool; False means greedy.
    temperature: positive float (traced).
    top_k: int, 0 disables (traced).
    top_p: float in [0, 1] (traced).

  Returns:
    int32 `[batch]` token ids.

  Examples:
    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[0.0, 5.0, 1.0], [2.0, 0.0, 0.0]])
    >>> sample(logits, do_sample=False).tolist()
    [1, 0]
    >>> sample(logits, row_keys(0, 2), top_k=1).tolist()
    [1, 0]
  """
  if not do_sample:
    return greedy(logits)
  if keys is None:
    raise ValueError("sample: `keys` is required when do_sample=True.")
  processed = process_logits(logits, temperature=temperature, top_k=top_k,
                             top_p=top_p)
  return jax.vmap(jax.random.categorical)(keys, processed).astype(jnp.int32)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array,
                             penalty) -> jax.Array:
  """CTRL-style repetition penalty (as Hugging Face applies it).

  Tokens already seen get their logit divided by `penalty` when positive and
  multiplied by it when negative; `penalty=1` is a no-op.

  Args:
    logits: `[batch, vocab]` scores.
    seen: bool `[batch, vocab]`, True for tokens in the prompt or output.
    penalty: float > 0.

  Returns:
    float32 `[batch, vocab]`.

  Examples:
    >>> import jax.numpy as jnp
    >>> apply_repetition_penalty(jnp.array([[2.0, -2.0, 2.0]]),
    ...                          jnp.array([[True, True, False]]), 2.0).tolist()
    [[1.0, -4.0, 2.0]]
  """
  logits = logits.astype(jnp.float32)
  penalty = jnp.asarray(penalty, jnp.float32)
  penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
  return jnp.where(seen, penalized, logits)
