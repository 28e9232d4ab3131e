"""The causal language-model loss over the target tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["token_nll", "causal_lm_loss"]


def token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
  """Summed negative log-likelihood of the target tokens, and their count.

  Position `t - 1` predicts token `t`; token `t` counts when
  `loss_mask[..., t]` is True (column 0 never does). The log-softmax is
  taken in float32 whatever the logits' dtype.

  Args:
    logits: `[..., T, vocab]`.
    input_ids: int `[..., T]`.
    loss_mask: bool `[..., T]`.

  Returns:
    `(nll_sum, count)`: float32 and int32 scalars.
  """
  logp = jax.nn.log_softmax(logits[..., :-1, :].astype(jnp.float32), axis=-1)
  target = input_ids[..., 1:]
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  mask = jnp.asarray(loss_mask[..., 1:], bool)
  return (jnp.sum(jnp.where(mask, nll, 0.0)),
          jnp.sum(mask, dtype=jnp.int32))


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array,
                   loss_mask: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy over the target tokens (float32).

  Args:
    logits: `[..., T, vocab]` (any float dtype; the log-softmax is float32).
    input_ids: int `[..., T]`.
    loss_mask: bool `[..., T]`: which tokens are predicted (column 0 is
      ignored: nothing predicts it).

  Returns:
    The mean negative log-likelihood per target token (0 when there is
    none).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbnb.train import causal_lm_loss
    >>> logits = jnp.zeros((1, 3, 4))          # uniform over 4 tokens
    >>> ids = jnp.array([[0, 1, 2]])
    >>> float(causal_lm_loss(logits, ids, jnp.array([[0, 1, 1]], bool)))
    1.3862943649291992
  """
  nll, count = token_nll(logits, input_ids, loss_mask)
  return nll / jnp.maximum(count, 1).astype(jnp.float32)
