"""Perplexity of a causal language model over a long token sequence.

The sequence is cut into windows of `window` tokens that start every `stride`
tokens (HuggingFace's "perplexity of fixed-length models" convention). Each
token is scored exactly once: the first window scores all its tokens but the
first; later windows score only the tokens after the previous window's end,
so with `stride < window` every scored token sees at least
`window - stride` tokens of context. `stride == window` (the default) gives
non-overlapping windows.

The forward pass is jit-compiled once for a fixed `[batch_size, window]`
shape; the last, shorter window is padded on the right (causal attention
never looks right, and padded positions are not scored). The NLL is summed
exactly in float32 per window and accumulated in float64 on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxbnb._src.quant import validation

__all__ = ["PerplexityResult", "perplexity", "evaluate_text",
           "window_spans"]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
  """Outcome of `perplexity`.

  Attributes:
    perplexity: `exp(nll_sum / num_tokens)`.
    nll_sum: summed negative log-likelihood (nats) of the scored tokens.
    num_tokens: number of scored (predicted) tokens.
    num_windows: number of forward windows.
    seconds: wall time, compilation included.
  """

  perplexity: float
  nll_sum: float
  num_tokens: int
  num_windows: int
  seconds: float = 0.0

  @property
  def nll(self) -> float:
    """Mean negative log-likelihood per scored token."""
    return self.nll_sum / self.num_tokens


def window_spans(num_tokens: int, window: int,
                 stride: int) -> list[tuple[int, int, int]]:
  """`(begin, end, first_scored)` for each window (absolute positions).

  Tokens `first_scored .. end - 1` are scored in the window `begin .. end-1`.
  A window's first token has no context in it, so it is never scored: with
  non-overlapping windows each window scores `window - 1` tokens.

  Example:
    >>> window_spans(10, 4, 4)
    [(0, 4, 1), (4, 8, 5), (8, 10, 9)]
    >>> window_spans(10, 4, 2)
    [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
  """
  spans, prev_end = [], 0
  for begin in range(0, num_tokens, stride):
    end = min(begin + window, num_tokens)
    spans.append((begin, end, max(prev_end, begin + 1)))
    prev_end = end
    if end == num_tokens:
      break
  return spans


@functools.lru_cache(maxsize=8)
def _nll_fn(graphdef):
  """jitted (state, ids [B, W], scored [B, W]) -> (nll sum, count) per row."""

  @jax.jit
  def fn(state, ids, real, scored):
    model = nnx.merge(graphdef, state)
    logits, _ = model(ids, attention_mask=real)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = ids[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    mask = scored[:, 1:]
    return jnp.sum(jnp.where(mask, nll, 0.0), axis=1), jnp.sum(mask, axis=1)

  return fn


def perplexity(model, token_ids: Sequence[int] | np.ndarray, *,
               window: int = 1024, stride: int | None = None,
               batch_size: int = 1, progress: bool = True,
               pad_token_id: int = 0) -> PerplexityResult:
  """Perplexity of `model` on one long token sequence.

  Args:
    model: a `LlamaForCausalLM` (anything called as
      `logits, _ = model(ids, attention_mask=mask)`).
    token_ids: the token ids (1-D; no BOS is added).
    window: tokens per forward pass (the context length).
    stride: distance between window starts; None means `window`
      (non-overlapping windows). Must be in `1..window`.
    batch_size: windows per forward pass.
    progress: show a tqdm progress bar.
    pad_token_id: id used to pad the last window (never scored).

  Returns:
    A `PerplexityResult`.

  Raises:
    ValueError: for fewer than 2 tokens or a bad window/stride/batch size.
    TypeError: `window`, `stride`, `batch_size` or `pad_token_id` is not an
      int.

  Example:
    >>> from flax import nnx
    >>> from jaxbnb.models import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=1, num_attention_heads=4)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> r = perplexity(model, list(range(40)), window=16, progress=False)
    >>> r.num_windows, r.num_tokens
    (3, 37)
  """
  ids = np.asarray(token_ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"perplexity: `token_ids` must be a 1-D sequence of "
                     f"ints, got shape {ids.shape} dtype {ids.dtype}")
  if ids.size < 2:
    raise ValueError(f"perplexity: `token_ids` needs at least 2 tokens, got "
                     f"{ids.size}")
  for name, value in (("window", window), ("stride", stride),
                      ("batch_size", batch_size), ("pad_token_id",
                                                   pad_token_id)):
    if (value is not None or name != "stride") and (
        validation.as_int(value) is None):
      raise TypeError(f"perplexity: `{name}` must be an int, got "
                      f"{value!r}")
  window, batch_size = int(window), int(batch_size)
  pad_token_id = int(pad_token_id)
  stride = window if stride is None else int(stride)
  if window < 2:
    raise ValueError(f"perplexity: `window` must be >= 2, got {window}")
  if not 1 <= stride <= window:
    raise ValueError(f"perplexity: `stride` must be in 1..window={window}, "
                     f"got {stride}")
  if batch_size < 1:
    raise ValueError(f"perplexity: `batch_size` must be >= 1, got "
                     f"{batch_size}")
  vocab = getattr(getattr(model, "config", None), "vocab_size", None)
  if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
    raise ValueError(f"perplexity: token ids must be in 0..{vocab - 1}, got "
                     f"min {ids.min()} max {ids.max()}")
  if vocab is not None and not 0 <= pad_token_id < vocab:
    # the padding is never scored, but an id the embedding cannot look up
    # gives NaN rows that reach every position through attention
    raise ValueError(f"perplexity: `pad_token_id` must be a token id in "
                     f"0..{vocab - 1}, got {pad_token_id}")
  t0 = time.perf_counter()
  spans = window_spans(ids.size, window, stride)
  width = min(window, ids.size)
  graphdef, state = nnx.split(model)
  fn = _nll_fn(graphdef)
  nll_sum, count = 0.0, 0
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(spans), desc="perplexity", unit="window")
  for start in range(0, len(spans), batch_size):
    chunk = spans[start:start + batch_size]
    x = np.full((batch_size, width), pad_token_id, np.int32)
    real = np.zeros((batch_size, width), np.int32)
    scored = np.zeros((batch_size, width), bool)
    for row, (b, e, first) in enumerate(chunk):
      x[row, :e - b] = ids[b:e]
      real[row, :e - b] = 1
      scored[row, first - b:e - b] = True
    sums, counts = fn(state, jnp.asarray(x), jnp.asarray(real),
                      jnp.asarray(scored))
    sums, counts = jax.device_get((sums, counts))
    nll_sum += float(np.sum(sums.astype(np.float64)))
    count += int(np.sum(counts))
    if bar is not None:
      bar.update(len(chunk))
      bar.set_postfix(ppl=f"{math.exp(nll_sum / max(count, 1)):.3f}")
  if bar is not None:
    bar.close()
  return PerplexityResult(perplexity=math.exp(nll_sum / count),
                          nll_sum=nll_sum, num_tokens=count,
                          num_windows=len(spans),
                          seconds=time.perf_counter() - t0)


def evaluate_text(model, tokenizer, text: str, *,
                  max_tokens: int | None = None, **kwargs) -> PerplexityResult:
  """Tokenizes `text` (no special tokens) and returns its `perplexity`.

  Args:
    model: a `LlamaForCausalLM`.
    tokenizer: a transformers tokenizer (see `load_tokenizer`).
    text: the text.
    max_tokens: keep only the first `max_tokens` tokens.
    **kwargs: `perplexity` options (window, stride, batch_size, progress).

  Returns:
    A `PerplexityResult`.
  """
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  if max_tokens is not None:
    if max_tokens < 2:
      raise ValueError(f"evaluate_text: `max_tokens` must be >= 2, got "
                       f"{max_tokens}")
    ids = ids[:max_tokens]
  return perplexity(model, ids, **kwargs)
