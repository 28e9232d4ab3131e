"""Text generation for `LlamaForCausalLM`: jitted prefill and decode loop.

`generate` takes token ids, `generate_text` takes strings and a tokenizer.
Both go through a `Generator`, which splits the model once (`nnx.split`),
compiles a prefill function and a decode-chunk function per shape, and keeps
them across calls. Prompts are LEFT-padded into one batch; the prefill
samples the first new token, and the decode runs `chunk_size` steps per call
inside one jitted `lax.while_loop`, leaving early when every row is done. The
KV cache is donated, so decoding updates it in place.

Host round-trips: one per chunk (32 tokens by default; 4 when streaming), and
the next chunk is dispatched before the host reads the previous one, so the
device does not wait on Python between chunks.

A model whose weights live on a device mesh (`from_pretrained(...,
mesh=mesh)`) decodes tensor-parallel with no change to the call: the KV
cache is split by key/value heads over the "tensor" axis (its rows over
"data" when the batch divides), quantized linears run on their own rows on
each device (`models/tensor_parallel.py`), and GSPMD partitions the rest.
Greedy decoding gives the tokens of the single-device model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from jaxbnb._src.models import decode_kernel
from jaxbnb._src.models import sampling
from jaxbnb._src.models import tensor_parallel
from jaxbnb._src.models.kv_cache import KVCache
from jaxbnb._src.quant import dispatch

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "Generator",
    "generate",
    "generate_text",
]

_PROMPT_BUCKET = 32  # prompt lengths are padded up to a multiple of this
_LENGTH_BUCKET = 128  # cache lengths are rounded up to a multiple of this
_STOP_BUCKET = 4  # the stop-id list is padded (with -1) to a multiple of this


def _onto_mesh(state, mesh):
  """`state` with every array that is not on `mesh` (e.g. adapters added
  on one device after a sharded load) replicated onto it."""
  replicated = NamedSharding(mesh, PartitionSpec())

  def put(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
      return x
    return jax.device_put(x, replicated)
  return jax.tree.map(put, state)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


_INT32_MAX = 2**31 - 1  # token ids and counts travel as int32


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
  """How to generate (frozen; `dataclasses.replace` or `generate(**kw)`).

  Examples:
    >>> cfg = GenerationConfig(max_new_tokens=8, do_sample=True, top_p=0.9)
    >>> cfg.top_p, cfg.stop_token_ids
    (0.9, None)
    >>> GenerationConfig(top_k=-1)
    Traceback (most recent call last):
    ...
    ValueError: GenerationConfig: `top_k` must be an int in [0, 2147483647] (0: off), got -1.

  Attributes:
    max_new_tokens: most new tokens per prompt (>= 1).
    do_sample: sample (True) or take the most likely token (False: greedy).
    temperature: > 0; divides the logits when sampling.
    top_k: sample among the `top_k` most likely tokens (0: off).
    top_p: then among the smallest set with probability >= `top_p`.
    repetition_penalty: > 0; Hugging Face's CTRL penalty on tokens of the
      prompt and output (1.0: off).
    seed: seed of the per-row random keys.
    stop_token_ids: tokens that end a row (excluded from its output). None:
      the model config's `eos_token_id`; `()`: never stop early.
    pad_token_id: what finished rows emit and prompts are padded with.
    max_length: cache slots per row (padded prompt + new tokens); None rounds
      prompt + `max_new_tokens` up to a multiple of 128.
  """

  max_new_tokens: int = 256
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  seed: int = 0
  stop_token_ids: tuple[int, ...] | None = None
  pad_token_id: int = 0
  max_length: int | None = None

  def __post_init__(self):
    def fail(field, want):
      raise ValueError(f"GenerationConfig: `{field}` must be {want}, got "
                       f"{getattr(self, field)!r}.")

    if (not _is_int(self.max_new_tokens)
        or not 1 <= self.max_new_tokens <= _INT32_MAX):
      fail("max_new_tokens", f"an int in [1, {_INT32_MAX}]")
    if not isinstance(self.do_sample, (bool, np.bool_)):
      fail("do_sample", "a bool")
    if (isinstance(self.temperature, bool)
        or not isinstance(self.temperature, (int, float, np.floating))
        or not math.isfinite(self.temperature)):
      fail("temperature", "a finite float")
    if self.do_sample and self.temperature <= 0:
      fail("temperature", "> 0 when do_sample=True (use do_sample=False for "
           "greedy)")
    if not _is_int(self.top_k) or not 0 <= self.top_k <= _INT32_MAX:
      fail("top_k", f"an int in [0, {_INT32_MAX}] (0: off)")
    if (isinstance(self.top_p, bool)
        or not isinstance(self.top_p, (int, float, np.floating))
        or not 0.0 <= self.top_p <= 1.0):
      fail("top_p", "a float in [0, 1]")
    if (isinstance(self.repetition_penalty, bool)
        or not isinstance(self.repetition_penalty, (int, float, np.floating))
        or not self.repetition_penalty > 0
        or not math.isfinite(self.repetition_penalty)):
      fail("repetition_penalty", "a finite float > 0")
    if not _is_int(self.seed) or not -2**63 <= self.seed < 2**63:
      fail("seed", "an int in [-2**63, 2**63)")
    if (not _is_int(self.pad_token_id)
        or not 0 <= self.pad_token_id <= _INT32_MAX):
      fail("pad_token_id", f"an int in [0, {_INT32_MAX}]")
    if self.max_length is not None and (
        not _is_int(self.max_length)
        or not 2 <= self.max_length <= _INT32_MAX):
      fail("max_length", f"an int in [2, {_INT32_MAX}] or None")
    stop = self.stop_token_ids
    if stop is not None:
      if _is_int(stop):
        stop = (stop,)
      if (not isinstance(stop, (list, tuple))
          or not all(_is_int(s) and 0 <= s <= _INT32_MAX for s in stop)):
        fail("stop_token_ids", f"a sequence of ints in [0, {_INT32_MAX}] or "
             "None")
      object.__setattr__(self, "stop_token_ids", tuple(int(s) for s in stop))


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """What `generate` returns.

  Attributes:
    sequences: the new tokens of each prompt (a stop token is not included).
    prompt_tokens: real prompt tokens, all rows.
    new_tokens: real new tokens, all rows (padding of finished rows is not
      counted).
    prefill_seconds: the prefill, which also picks the first new token.
    decode_seconds: the decode steps after it (host time until the last
      token is on the host).
    tokens_per_second: decode throughput: new tokens made by decode steps
      (`new_tokens` minus the first token of each row) per decode second.
    compile_seconds: time spent compiling in this call (0 when cached).
    texts: the decoded outputs (`generate_text(..., return_result=True)`).
  """

  sequences: list[list[int]]
  prompt_tokens: int
  new_tokens: int
  prefill_seconds: float
  decode_seconds: float
  tokens_per_second: float
  compile_seconds: float = 0.0
  texts: list[str] | None = None


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
  if isinstance(prompts, (np.ndarray, jax.Array)):
    prompts = np.asarray(prompts).tolist()
  if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
    raise TypeError("generate: `prompts` must be a sequence of token-id "
                    f"sequences, got {type(prompts).__name__}.")
  if not prompts:
    raise ValueError("generate: `prompts` is empty.")
  if all(_is_int(t) for t in prompts):
    raise TypeError("generate: `prompts` must be a sequence of token-id "
                    "sequences (a batch); wrap a single prompt as [ids].")
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, (np.ndarray, jax.Array)):
      p = np.asarray(p).tolist()
    if isinstance(p, (str, bytes)) or not isinstance(p, Sequence) or not all(
        _is_int(t) for t in p):
      raise TypeError(f"generate: `prompts[{i}]` must be a sequence of ints, "
                      f"got {type(p).__name__}.")
    if not p:
      raise ValueError(f"generate: `prompts[{i}]` is empty.")
    bad = [int(t) for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f"generate: `prompts[{i}]` has token ids outside "
                       f"[0, {vocab_size}): {bad[:5]}.")
    out.append([int(t) for t in p])
  return out


class Generator:
  """Compiled generation for one model; reuse it across calls.

  The model is split once (`nnx.split`): the graph is static and the state
  is a jit argument, so nothing is baked into the compiled code. Functions
  are compiled per (batch, padded prompt length, cache length, chunk size,
  sampling mode, stop-list length) and cached; `num_compiles` counts them.
  Call `update(model)` after changing the model's weights.

  Examples:
    >>> from flax import nnx
    >>> from jaxbnb.models import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4,
    ...                   num_key_value_heads=2)
    >>> gen = Generator(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    >>> out = gen.generate([[1, 2, 3], [4, 5]], max_new_tokens=5,
    ...                    stop_token_ids=())
    >>> [len(s) for s in out.sequences], gen.num_compiles
    ([5, 5], 2)
    >>> out = gen.generate([[7, 8, 9, 10], [1]], max_new_tokens=5,
    ...                    stop_token_ids=(), do_sample=False)
    >>> gen.num_compiles  # same shape buckets: nothing new to compile
    2

  Args:
    model: a `LlamaForCausalLM` (float or 4-bit), on one device or sharded
      on a mesh.
    chunk_size: decode steps per device call.
    stream_chunk_size: decode steps per call when streaming.
    tensor_axis: the mesh axis of tensor parallelism when the weights are
      sharded (used where the mesh has it).
    data_axis: the mesh axis batch rows are split over (where the mesh has
      it and the batch divides).

  Raises:
    ValueError: for a bad `chunk_size`, or a tensor axis whose size does
      not divide the model's key/value heads.
  """

  def __init__(self, model, *, chunk_size: int = 32,
               stream_chunk_size: int = 4, tensor_axis: str | None = "tensor",
               data_axis: str | None = "data"):
    for name, v in (("chunk_size", chunk_size),
                    ("stream_chunk_size", stream_chunk_size)):
      if not _is_int(v) or v < 1:
        raise ValueError(f"Generator: `{name}` must be an int >= 1, got "
                         f"{v!r}.")
    self.chunk_size = int(chunk_size)
    self.stream_chunk_size = int(stream_chunk_size)
    self._compiled: dict[tuple, Any] = {}
    self.num_compiles = 0
    self.graphdef = None
    self.tensor_axis, self.data_axis = tensor_axis, data_axis
    self.tp = None
    self.update(model)

  def update(self, model) -> None:
    """Takes the model's current weights (recompiles only if its structure
    changed)."""
    for attr in ("config", "dtype", "model"):
      if not hasattr(model, attr):
        raise TypeError("Generator: `model` must be a LlamaForCausalLM, got "
                        f"{type(model).__name__}.")
    graphdef, state = nnx.split(model)
    tp = tensor_parallel.from_arrays(state, axis=self.tensor_axis,
                                     data_axis=self.data_axis)
    if tp is not None:
      tp.check(model.config)
      state = tensor_parallel.row_parallel(_onto_mesh(state, tp.mesh), tp)
    if graphdef != self.graphdef or tp != self.tp:
      self._compiled.clear()
    self.graphdef, self.state, self.tp = graphdef, state, tp
    self._state_sig = tuple((x.shape, str(x.dtype))
                            for x in jax.tree.leaves(state))
    self.config = model.config
    self.dtype = model.dtype

  # ---------------------------------------------------------------- traced

  def _shard_cache(self, cache: KVCache) -> KVCache:
    """The cache constrained to its mesh layout (heads over the tensor
    axis, rows over the data axis); unchanged on one device."""
    tp = self.tp
    if tp is None:
      return cache
    kv = tp.cache_sharding(cache.batch)
    rows = lambda a: jax.lax.with_sharding_constraint(  # noqa: E731
        a, tp.rows_sharding(cache.batch, a.ndim))
    return dataclasses.replace(
        cache, k=jax.lax.with_sharding_constraint(cache.k, kv),
        v=jax.lax.with_sharding_constraint(cache.v, kv),
        mask=rows(cache.mask), positions=rows(cache.positions))

  def _on_every_host(self, *arrays):
    """`arrays` replicated on the mesh, so that every process can read
    them (the host reads tokens and counts; they are a few bytes)."""
    if self.tp is None:
      return arrays
    rep = NamedSharding(self.tp.mesh, PartitionSpec())
    return tuple(jax.lax.with_sharding_constraint(a, rep) for a in arrays)

  def _prefill_fn(self, max_len, do_sample, penalize, state, ids, mask, keys,
                  params, stop_ids):
    with tensor_parallel.activate(self.tp):
      return self._prefill_body(max_len, do_sample, penalize, state, ids,
                                mask, keys, params, stop_ids)

  def _prefill_body(self, max_len, do_sample, penalize, state, ids, mask,
                    keys, params, stop_ids):
    model = nnx.merge(self.graphdef, state)
    batch = ids.shape[0]
    cache = self._shard_cache(
        KVCache.init(self.config, batch, max_len, self.dtype))
    x, cache = model.model(ids, None, cache, mask)
    cache = self._shard_cache(cache)
    logits = model.logits(x[:, -1])
    seen = None
    if penalize:
      seen = jnp.zeros((batch, self.config.vocab_size), bool)
      rows = jnp.arange(batch)[:, None]
      seen = seen.at[rows, ids].max(mask.astype(bool))
    tok = self._pick(logits, keys, 0, params, do_sample, seen)
    is_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    emit = ~is_stop
    count = emit.astype(jnp.int32)
    done = is_stop | (count >= params["max_new_tokens"])
    first = jnp.where(emit, tok, params["pad"])
    if penalize:
      seen = seen.at[jnp.arange(batch), tok].set(True)
    first, done, count = self._on_every_host(first, done, count)
    carry = dict(cache=cache, last=first, done=done, count=count,
                 step=jnp.ones((), jnp.int32), keys=keys, seen=seen)
    if self.config.rope_type == "dynamic":
      # transformers keeps feeding finished rows (pad, mask 1), so their
      # positions, and the batch's max that sets the NTK base, keep growing.
      carry["rope_pos"] = cache.positions
    return carry, first

  def _pick(self, logits, keys, step, params, do_sample, seen):
    if seen is not None:
      logits = sampling.apply_repetition_penalty(logits, seen,
                                                 params["repetition_penalty"])
    if not do_sample:
      return sampling.greedy(logits)
    return sampling.sample(
        logits, sampling.step_keys(keys, step), temperature=params[
            "temperature"], top_k=params["top_k"], top_p=params["top_p"])

  def _step(self, model, carry, params, stop_ids, do_sample):
    """One decode step for every row (finished rows emit pad)."""
    done = carry["done"]
    positions = None
    if "rope_pos" in carry:  # finished rows' (masked) tokens keep counting
      positions = jnp.where(done, carry["rope_pos"],
                            carry["cache"].positions)[:, None]
    logits, cache = model(carry["last"][:, None], positions,
                          cache=carry["cache"], attention_mask=~done[:, None])
    cache = self._shard_cache(cache)
    seen = carry["seen"]
    tok = self._pick(logits[:, 0], carry["keys"], carry["step"], params,
                     do_sample, seen)
    is_stop = jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)
    emit = ~done & ~is_stop
    count = carry["count"] + emit.astype(jnp.int32)
    out = jnp.where(emit, tok, params["pad"])
    if seen is not None:
      seen = seen.at[jnp.arange(tok.shape[0]), tok].max(emit)
    new = dict(cache=cache, last=out, count=count, step=carry["step"] + 1,
               done=done | is_stop | (count >= params["max_new_tokens"]),
               keys=carry["keys"], seen=seen)
    if "rope_pos" in carry:
      new["rope_pos"] = carry["rope_pos"] + 1
    return new, out

  def _chunk_fn(self, chunk, do_sample, state, carry, params, stop_ids):
    with tensor_parallel.activate(self.tp):
      return self._chunk_body(chunk, do_sample, state, carry, params,
                              stop_ids)

  def _chunk_body(self, chunk, do_sample, state, carry, params, stop_ids):
    model = nnx.merge(self.graphdef, state)
    batch = carry["last"].shape[0]
    buf = jnp.full((batch, chunk), params["pad"], jnp.int32)

    def cond(c):
      i, carry, _ = c
      return (i < chunk) & ~jnp.all(carry["done"])

    def body(c):
      i, carry, buf = c
      carry, out = self._step(model, carry, params, stop_ids, do_sample)
      return i + 1, carry, buf.at[:, i].set(out)

    _, carry, buf = jax.lax.while_loop(cond, body,
                                       (jnp.zeros((), jnp.int32), carry, buf))
    buf, count, all_done = self._on_every_host(buf, carry["count"],
                                               jnp.all(carry["done"]))
    return carry, buf, count, all_done

  def _bench_fn(self, steps, state, carry):
    model = nnx.merge(self.graphdef, state)

    def body(_, c):
      logits, cache = model(c["last"][:, None], cache=c["cache"])
      return dict(c, cache=self._shard_cache(cache),
                  last=sampling.greedy(logits[:, 0]))

    with tensor_parallel.activate(self.tp):
      return jax.lax.fori_loop(0, steps, body, carry)

  # ----------------------------------------------------------- compilation

  def _get(self, key, fn, *args):
    """The compiled `fn` for `key`, compiling it for `args` on a miss.

    The kernel mode and `JAXBNB_ATTENTION` are part of the key: they
    decide, at trace time, which ops the program holds
    (`jaxbnb.kernel_mode`, models/decode_kernel.py).
    """
    key = (self._state_sig, dispatch.get_kernel_mode(),
           decode_kernel.attention_choice(), *key)
    hit = self._compiled.get(key)
    if hit is not None:
      return hit, 0.0
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    self._compiled[key] = compiled
    self.num_compiles += 1
    return compiled, time.perf_counter() - t0

  def _prefill(self, max_len, do_sample, penalize, *args):
    key = ("prefill", max_len, do_sample, penalize,
           *[(a.shape, a.dtype) for a in jax.tree.leaves(args[1:])])
    fn = jax.jit(functools.partial(self._prefill_fn, max_len, do_sample,
                                   penalize))
    return self._get(key, fn, *args)

  def _chunk(self, chunk, do_sample, *args):
    key = ("chunk", chunk, do_sample,
           *[(a.shape, a.dtype) for a in jax.tree.leaves(args[1:])])
    fn = jax.jit(functools.partial(self._chunk_fn, chunk, do_sample),
                 donate_argnums=(1,))
    return self._get(key, fn, *args)

  # ------------------------------------------------------------------ API

  def _prepare(self, prompts, config, overrides):
    config = config or GenerationConfig()
    if not isinstance(config, GenerationConfig):
      raise TypeError("generate: `config` must be a GenerationConfig or None, "
                      f"got {type(config).__name__}.")
    fields = {f.name for f in dataclasses.fields(GenerationConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise TypeError(f"generate: unknown generation options {unknown}; "
                      f"known: {sorted(fields)}.")
    config = dataclasses.replace(config, **overrides)
    prompts = _check_prompts(prompts, self.config.vocab_size)
    if config.pad_token_id >= self.config.vocab_size:
      # Every prompt is left-padded to a bucket: an id the embedding cannot
      # look up would give NaN rows that reach all logits.
      raise ValueError(
          f"generate: `pad_token_id` must be a token id in [0, "
          f"{self.config.vocab_size}), got {config.pad_token_id}.")
    longest = max(map(len, prompts))
    new = config.max_new_tokens
    prompt_len = _round_up(longest, _PROMPT_BUCKET)
    if config.max_length is None:
      max_len = _round_up(prompt_len + new, _LENGTH_BUCKET)
    else:
      max_len = config.max_length
      if longest + new > max_len:
        raise ValueError(
            f"generate: `max_length`={max_len} is too small for a "
            f"{longest}-token prompt plus max_new_tokens={new}.")
      prompt_len = min(prompt_len, max_len - new)
    return config, prompts, prompt_len, max_len

  def generate(self, prompts: Sequence[Sequence[int]],
               config: GenerationConfig | None = None, *,
               stream: Callable[[list[list[int]]], None] | None = None,
               **overrides) -> GenerationResult:
    """Generates new tokens for each prompt; see `generate`."""
    config, prompts, prompt_len, max_len = self._prepare(prompts, config,
                                                         overrides)
    batch = len(prompts)
    pad = config.pad_token_id
    ids = np.full((batch, prompt_len), pad, np.int32)
    mask = np.zeros((batch, prompt_len), bool)
    for b, p in enumerate(prompts):
      ids[b, prompt_len - len(p):] = p
      mask[b, prompt_len - len(p):] = True
    stop = config.stop_token_ids
    if stop is None:
      stop = tuple(self.config.eos_token_id)
    stop_ids = np.full(_round_up(len(stop), _STOP_BUCKET) or _STOP_BUCKET, -1,
                       np.int32)
    stop_ids[:len(stop)] = stop
    params = dict(
        temperature=jnp.float32(config.temperature),
        top_k=jnp.int32(config.top_k), top_p=jnp.float32(config.top_p),
        repetition_penalty=jnp.float32(config.repetition_penalty),
        max_new_tokens=jnp.int32(config.max_new_tokens), pad=jnp.int32(pad))
    do_sample = bool(config.do_sample)
    penalize = config.repetition_penalty != 1.0
    keys = sampling.row_keys(config.seed, batch)
    ids, mask, stop_ids = map(jnp.asarray, (ids, mask, stop_ids))

    prefill, compile_s = self._prefill(max_len, do_sample, penalize,
                                       self.state, ids, mask, keys, params,
                                       stop_ids)
    t0 = time.perf_counter()
    carry, first = prefill(self.state, ids, mask, keys, params, stop_ids)
    first = np.asarray(first)  # waits for the prefill
    counts = np.asarray(carry["count"])
    all_done = bool(np.all(np.asarray(carry["done"])))
    prefill_s = time.perf_counter() - t0
    chunk = self.stream_chunk_size if stream else self.chunk_size
    decode, c_s = self._chunk(chunk, do_sample, self.state, carry, params,
                              stop_ids)
    compile_s += c_s

    pieces = [first[:, None]]
    shown = np.zeros(batch, np.int64)

    def emit(counts):
      if stream is None:
        return
      toks = np.concatenate(pieces, axis=1)
      deltas = [toks[b, shown[b]:counts[b]].tolist() for b in range(batch)]
      shown[:] = counts
      if any(deltas):
        stream(deltas)

    emit(counts)
    t1 = time.perf_counter()
    max_chunks = -(-(config.max_new_tokens - 1) // chunk)
    pending = None
    if not all_done and max_chunks:
      pending = decode(self.state, carry, params, stop_ids)
    launched = 1 if pending is not None else 0
    while pending is not None:
      carry, buf, count_dev, done_dev = pending
      pending = None
      if launched < max_chunks:  # keep the device busy while we read
        pending = decode(self.state, carry, params, stop_ids)
        launched += 1
      pieces.append(np.asarray(buf))
      counts = np.asarray(count_dev)
      emit(counts)
      if bool(done_dev):
        pending = None  # a chunk launched after the end exits at once
    t2 = time.perf_counter()

    toks = np.concatenate(pieces, axis=1)
    sequences = [toks[b, :counts[b]].tolist() for b in range(batch)]
    new_tokens = int(sum(counts))
    decode_s = max(t2 - t1, 0.0)
    decode_tokens = int(sum(max(int(c) - 1, 0) for c in counts))
    return GenerationResult(
        sequences=sequences, prompt_tokens=sum(map(len, prompts)),
        new_tokens=new_tokens, prefill_seconds=prefill_s,
        decode_seconds=decode_s,
        tokens_per_second=decode_tokens / decode_s if decode_s > 0 else 0.0,
        compile_seconds=compile_s)

  def benchmark_decode(self, *, batch: int, prompt_len: int, steps: int,
                       reps: int = 3, seed: int = 0) -> dict[str, Any]:
    """Times `steps` greedy decode steps with no stop checks or host syncs.

    A random prompt of `prompt_len` tokens per row is prefilled, then one
    jitted `fori_loop` runs the decode steps (model call + argmax, the cache
    donated). The first run compiles and warms up; `reps` timed runs follow,
    each on a fresh prefill (excluded from the decode time).

    Examples:
      >>> from flax import nnx
      >>> from jaxbnb.models import LlamaConfig, LlamaForCausalLM
      >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32,
      ...                   intermediate_size=64, num_hidden_layers=1,
      ...                   num_attention_heads=4)
      >>> gen = Generator(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
      >>> r = gen.benchmark_decode(batch=2, prompt_len=8, steps=4, reps=2)
      >>> r["batch"], r["steps"], r["tokens_per_s"] > 0
      (2, 4, True)

    Args:
      batch: rows.
      prompt_len: prompt tokens per row (cache holds prompt + steps).
      steps: decode steps per timed run.
      reps: timed runs (the median is reported).
      seed: seed of the random prompt.

    Returns:
      A dict: `batch`, `steps`, `prompt_len`, `max_len`, `prefill_s`
      (median), `decode_s` (median), `decode_samples_s`, `tokens_per_s`
      (`batch * steps / decode_s`), `ms_per_step`, `compile_s`.
    """
    for name, v in (("batch", batch), ("prompt_len", prompt_len),
                    ("steps", steps), ("reps", reps)):
      if not _is_int(v) or v < 1:
        raise ValueError(f"benchmark_decode: `{name}` must be an int >= 1, "
                         f"got {v!r}.")
    max_len = _round_up(prompt_len + steps, _LENGTH_BUCKET)
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(0, self.config.vocab_size,
                                   (batch, prompt_len)), jnp.int32)
    mask = jnp.ones((batch, prompt_len), bool)
    keys = sampling.row_keys(seed, batch)
    params = dict(
        temperature=jnp.float32(1), top_k=jnp.int32(0), top_p=jnp.float32(1),
        repetition_penalty=jnp.float32(1),
        max_new_tokens=jnp.int32(steps + 1), pad=jnp.int32(0))
    stop_ids = jnp.full((_STOP_BUCKET,), -1, jnp.int32)
    args = (self.state, ids, mask, keys, params, stop_ids)
    prefill, compile_s = self._prefill(max_len, False, False, *args)
    carry, _ = prefill(*args)
    fn = jax.jit(functools.partial(self._bench_fn, steps),
                 donate_argnums=(1,))
    bench, c_s = self._get(("bench", steps, batch, prompt_len, max_len), fn,
                           self.state, carry)
    compile_s += c_s
    jax.block_until_ready(bench(self.state, carry))  # warm-up
    prefills, decodes = [], []
    for _ in range(reps):
      t0 = time.perf_counter()
      carry, _ = prefill(*args)
      jax.block_until_ready(carry)
      t1 = time.perf_counter()
      jax.block_until_ready(bench(self.state, carry))
      t2 = time.perf_counter()
      prefills.append(t1 - t0)
      decodes.append(t2 - t1)
    decode_s = statistics.median(decodes)
    return {"batch": batch, "steps": steps, "prompt_len": prompt_len,
            "max_len": max_len, "prefill_s": statistics.median(prefills),
            "decode_s": decode_s, "decode_samples_s": decodes,
            "tokens_per_s": batch * steps / decode_s,
            "ms_per_step": 1e3 * decode_s / steps, "compile_s": compile_s}


_GENERATORS: "weakref.WeakKeyDictionary[Any, Generator]" = (
    weakref.WeakKeyDictionary())


def _generator_for(model) -> Generator:
  if isinstance(model, Generator):
    return model
  gen = _GENERATORS.get(model)
  if gen is None:
    gen = _GENERATORS[model] = Generator(model)
  else:
    gen.update(model)
  return gen


def generate(model, prompts: Sequence[Sequence[int]],
             config: GenerationConfig | None = None, *,
             stream: Callable[[list[list[int]]], None] | None = None,
             **overrides) -> GenerationResult:
  """Generates new tokens for a batch of token-id prompts.

  Prompts may differ in length (they are left-padded; each row gets the
  tokens it would get alone). A row ends at a stop token (not included) or
  after `max_new_tokens`. Compiled functions are cached per model (a
  `Generator` kept alongside it), so a second call with the same shapes does
  not recompile.

  Examples:
    >>> from flax import nnx
    >>> from jaxbnb.models import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...                   num_hidden_layers=2, num_attention_heads=4)
    >>> model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    >>> out = generate(model, [[1, 2, 3]], max_new_tokens=4,
    ...                stop_token_ids=())
    >>> len(out.sequences[0]), out.new_tokens, out.prompt_tokens
    (4, 4, 3)
    >>> again = generate(model, [[1, 2, 3]], max_new_tokens=4,
    ...                  stop_token_ids=())
    >>> again.sequences == out.sequences, again.compile_seconds
    (True, 0.0)

  Args:
    model: a `LlamaForCausalLM` (or a `Generator`).
    prompts: token-id sequences (non-empty), one per row.
    config: a `GenerationConfig`; None uses the defaults.
    stream: called with the new tokens of every row (`list[list[int]]`, one
      list per prompt, possibly empty) as they are made.
    **overrides: `GenerationConfig` fields replacing those of `config`.

  Returns:
    A `GenerationResult`.

  Raises:
    TypeError: for malformed prompts or an unknown option.
    ValueError: for empty prompts, out-of-vocabulary ids, a `max_length` too
      small, or an invalid option value.
  """
  return _generator_for(model).generate(prompts, config, stream=stream,
                                        **overrides)


class _TextStream:
  """Turns a growing token list into text deltas without broken characters.

  Decodes a window of recent tokens and emits only text that is complete: a
  trailing U+FFFD means a multi-byte character is split across tokens.
  """

  def __init__(self, tokenizer, sink):
    self.tokenizer, self.sink = tokenizer, sink
    self.tokens: list[int] = []
    self.prefix = 0  # window start
    self.read = 0  # tokens already turned into emitted text

  def _decode(self, toks):
    return self.tokenizer.decode(toks, skip_special_tokens=True)

  def push(self, new: list[int]) -> None:
    # Token by token: a chunk may end inside a multi-byte character (two
    # tokens per character, chunks of an odd size), but some token before
    # it ends one, and the text up to there is sent now.
    deltas = []
    for token in new:
      self.tokens.append(token)
      before = self._decode(self.tokens[self.prefix:self.read])
      text = self._decode(self.tokens[self.prefix:])
      if len(text) > len(before) and not text.endswith("\ufffd"):
        deltas.append(text[len(before):])
        self.prefix, self.read = self.read, len(self.tokens)
    if deltas:
      self.sink("".join(deltas))

  def flush(self) -> None:
    before = self._decode(self.tokens[self.prefix:self.read])
    text = self._decode(self.tokens[self.prefix:])
    if len(text) > len(before):
      self.sink(text[len(before):])
    self.prefix = self.read = len(self.tokens)


def generate_text(model, tokenizer, prompts: str | Sequence[str], *,
                  chat: bool = True, system: str | None = None,
                  stream: Callable[[str], None] | None = None,
                  return_result: bool = False,
                  config: GenerationConfig | None = None,
                  **gen_kwargs) -> list[str] | GenerationResult:
  """Generates text for string prompts with a Hugging Face tokenizer.

  Args:
    model: a `LlamaForCausalLM` (or a `Generator`).
    tokenizer: a transformers tokenizer (see `load_tokenizer`).
    prompts: one string or a list of them.
    chat: wrap each prompt as a user message with the tokenizer's chat
      template (`add_generation_prompt=True`); False tokenizes it as is.
    system: an optional system message (chat only).
    stream: called with text deltas as they are made (one prompt only);
      multi-byte characters are never split.
    return_result: return the `GenerationResult` (with `texts`) instead of
      the list of strings.
    config: a `GenerationConfig`.
    **gen_kwargs: `GenerationConfig` fields. By default the stop tokens are
      the model's EOS ids plus the tokenizer's, and the pad id is the
      tokenizer's.

  Returns:
    The generated text of each prompt (special tokens skipped), or the
    `GenerationResult` when `return_result` is True.

  Raises:
    ValueError: for streaming more than one prompt, or `system` without chat.
  """
  single = isinstance(prompts, str)
  prompts = [prompts] if single else list(prompts)
  if not prompts or not all(isinstance(p, str) for p in prompts):
    raise TypeError("generate_text: `prompts` must be a string or a "
                    "non-empty list of strings.")
  if stream is not None and len(prompts) != 1:
    raise ValueError("generate_text: `stream` needs exactly one prompt, got "
                     f"{len(prompts)}.")
  if system is not None and not chat:
    raise ValueError("generate_text: `system` needs chat=True.")
  gen = _generator_for(model)
  if "stop_token_ids" not in gen_kwargs and (
      config is None or config.stop_token_ids is None):
    stop = list(gen.config.eos_token_id)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in stop:
      stop.append(int(eos))
    gen_kwargs["stop_token_ids"] = tuple(stop)
  if "pad_token_id" not in gen_kwargs and config is None:
    pad = tokenizer.pad_token_id
    if pad is None:
      pad = tokenizer.eos_token_id
    if pad is not None:
      gen_kwargs["pad_token_id"] = int(pad)
  ids = []
  for p in prompts:
    if chat:
      messages = ([{"role": "system", "content": system}] if system else [])
      messages.append({"role": "user", "content": p})
      text = tokenizer.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=True)
      ids.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    else:
      ids.append(list(tokenizer(p)["input_ids"]))
  text_stream = None
  token_stream = None
  if stream is not None:
    text_stream = _TextStream(tokenizer, stream)
    token_stream = lambda deltas: text_stream.push(deltas[0])  # noqa: E731
  result = gen.generate(ids, config, stream=token_stream, **gen_kwargs)
  if text_stream is not None:
    text_stream.flush()
  texts = [tokenizer.decode(s, skip_special_tokens=True)
           for s in result.sequences]
  if return_result:
    return dataclasses.replace(result, texts=texts)
  return texts
