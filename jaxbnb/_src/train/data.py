"""Training data: text packed into sequences, chat and prompt/completion
records with the prompt masked, a held-out split, the batch order.

Everything becomes a `TokenizedData`: int32 `input_ids [N, T]` with two
bool masks, `attention_mask` (real tokens; padding is on the right) and
`loss_mask` (the tokens the loss predicts). Column 0 is never a target (no
token comes before it).

* Plain text (a `.txt` file, a list of strings, or `{"text": ...}` JSONL
  records): each document is encoded, followed by the EOS token, the
  documents are concatenated and cut into sequences of `seq_len` tokens
  (the last one padded). Every real token but the first of a sequence is a
  target.
* Chat records `{"messages": [{"role": ..., "content": ...}, ...]}`: the
  conversation goes through the tokenizer's chat template; only the tokens
  of the assistant turns are targets (the template's text from the end of
  the assistant header to the end of the turn, end-of-turn token
  included). One record per sequence, truncated or padded to `seq_len`.
* Prompt/completion records `{"prompt": ..., "completion": ...}`: prompt
  tokens, then completion tokens and EOS; only the completion and EOS are
  targets.

The tokenizer needs `encode(text, add_special_tokens=False)` and an
`eos_token_id`; chat records also need `apply_chat_template(messages,
tokenize=False, add_generation_prompt=...)` (a `transformers` tokenizer
from `jaxbnb.convert.load_tokenizer` has all three).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["TokenizedData", "read_data", "pack_texts", "encode_records",
           "prepare_data", "batch_indices", "batch_arrays"]

_ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedData:
  """Token sequences with their attention and loss masks.

  Attributes:
    input_ids: int32 `[N, T]` token ids (padding on the right).
    attention_mask: bool `[N, T]`, True for real tokens.
    loss_mask: bool `[N, T]`, True for the tokens the loss predicts (never
      column 0, never padding).

  Examples:
    >>> import numpy as np
    >>> from jaxbnb.train import TokenizedData
    >>> ids = np.arange(12).reshape(3, 4)
    >>> data = TokenizedData(ids, np.ones((3, 4), bool), np.ones((3, 4), bool))
    >>> len(data), data.num_targets, bool(data.loss_mask[:, 0].any())
    (3, 9, False)
    >>> train, held_out = data.split(0.3)
    >>> len(train), len(held_out)
    (2, 1)
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray

  def __post_init__(self):
    ids = np.asarray(self.input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError("TokenizedData: `input_ids` must be an int array "
                       f"[N, T], got shape {ids.shape} dtype {ids.dtype}.")
    attn = np.asarray(self.attention_mask, bool)
    loss = np.array(self.loss_mask, bool)
    for name, m in (("attention_mask", attn), ("loss_mask", loss)):
      if m.shape != ids.shape:
        raise ValueError(f"TokenizedData: `{name}` must have the shape of "
                         f"`input_ids` {ids.shape}, got {m.shape}.")
    loss[:, :1] = False
    loss &= attn
    object.__setattr__(self, "input_ids", ids.astype(np.int32))
    object.__setattr__(self, "attention_mask", attn)
    object.__setattr__(self, "loss_mask", loss)

  def __len__(self) -> int:
    return self.input_ids.shape[0]

  @property
  def seq_len(self) -> int:
    """Tokens per sequence, T."""
    return self.input_ids.shape[1]

  @property
  def num_tokens(self) -> int:
    """Real (non-padding) tokens."""
    return int(self.attention_mask.sum())

  @property
  def num_targets(self) -> int:
    """Tokens the loss predicts."""
    return int(self.loss_mask.sum())

  def take(self, index: Any) -> "TokenizedData":
    """The sequences at `index` (an int array or a slice)."""
    return TokenizedData(self.input_ids[index], self.attention_mask[index],
                         self.loss_mask[index])

  def split(self, fraction: float
            ) -> tuple["TokenizedData", "TokenizedData | None"]:
    """`(train, held_out)`: the last `ceil(fraction * N)` sequences held out.

    The held-out sequences are the end of the data (for packed text: the
    end of the text), so no training sequence overlaps them.

    Raises:
      ValueError: `fraction` not in [0, 1), or too few sequences to hold
        any out and keep one for training.
    """
    if not 0 <= fraction < 1:
      raise ValueError(f"eval split must be in [0, 1), got {fraction!r}.")
    if fraction == 0:
      return self, None
    n = len(self)
    k = math.ceil(fraction * n)
    if n - k < 1:
      raise ValueError(
          f"the data gives {n} sequence(s) of {self.seq_len} tokens: too "
          f"few to hold out {fraction:g} for evaluation and train on the "
          "rest (use more data, a shorter seq_len or eval split 0).")
    return self.take(slice(0, n - k)), self.take(slice(n - k, n))

  def fingerprint(self) -> str:
    """A SHA-256 of the ids and masks (a checkpoint resumes on the same
    data only)."""
    h = hashlib.sha256()
    for a in (self.input_ids, self.attention_mask, self.loss_mask):
      h.update(str(a.shape).encode())
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------
# reading files


def _is_jsonl(path: str) -> bool:
  return path.lower().endswith(".jsonl")


def _check_record(rec: Any, where: str) -> str:
  """The kind of a record ("text", "messages", "prompt"), or raises."""
  if not isinstance(rec, Mapping):
    raise ValueError(f"{where}: a record must be a JSON object, got "
                     f"{type(rec).__name__}.")
  if "messages" in rec:
    msgs = rec["messages"]
    if not isinstance(msgs, Sequence) or isinstance(msgs, str) or not msgs:
      raise ValueError(f"{where}: `messages` must be a non-empty list.")
    for m in msgs:
      if (not isinstance(m, Mapping) or not isinstance(m.get("role"), str)
          or not isinstance(m.get("content"), str)):
        raise ValueError(f"{where}: each message must be an object with "
                         "string `role` and `content`, got "
                         f"{json.dumps(m)[:80]}.")
      if m["role"] not in _ROLES:
        raise ValueError(f"{where}: unknown role {m['role']!r} (expected "
                         f"one of {list(_ROLES)}).")
    if not any(m["role"] == "assistant" for m in msgs):
      raise ValueError(f"{where}: no assistant message (nothing to train "
                       "on).")
    return "messages"
  if "prompt" in rec or "completion" in rec:
    for key in ("prompt", "completion"):
      if not isinstance(rec.get(key), str):
        raise ValueError(f"{where}: `prompt` and `completion` must both be "
                         "strings.")
    if not rec["completion"]:
      raise ValueError(f"{where}: empty `completion` (nothing to train "
                       "on).")
    return "prompt"
  if "text" in rec:
    if not isinstance(rec["text"], str):
      raise ValueError(f"{where}: `text` must be a string.")
    return "text"
  raise ValueError(f"{where}: expected a `messages`, `prompt`/`completion` "
                   f"or `text` record, got keys {sorted(rec)[:6]}.")


def read_data(path: str | os.PathLike) -> list[str] | list[dict[str, Any]]:
  """Reads a training data file.

  A `.jsonl` file holds one JSON object per line (blank lines skipped):
  all `{"messages": [...]}`, all `{"prompt": ..., "completion": ...}`, or
  all `{"text": ...}` (documents, returned as strings). Any other file is
  UTF-8 text, one document.

  Args:
    path: the file.

  Returns:
    A list of documents (strings) or of records (dicts).

  Raises:
    FileNotFoundError: `path` is not a file.
    ValueError: the file is empty, only whitespace or not UTF-8, a line is
      not JSON, a record is malformed, or records of different kinds are
      mixed (the message names the line).

  Examples:
    >>> import tempfile, os
    >>> from jaxbnb.train import read_data
    >>> with tempfile.TemporaryDirectory() as d:
    ...   p = os.path.join(d, "chat.jsonl")
    ...   with open(p, "w") as f:
    ...     _ = f.write('{"prompt": "2+2=", "completion": "4"}\\n')
    ...   read_data(p)
    [{'prompt': '2+2=', 'completion': '4'}]
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data file {path!r} does not exist or is not "
                            "a file.")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw:
    raise ValueError(f"data file {path!r} is empty.")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(
        f"data file {path!r} is not UTF-8 text (byte 0x{raw[e.start]:02x} at "
        f"offset {e.start}; convert it, e.g. with iconv -t UTF-8).") from e
  if text.startswith("\ufeff"):
    text = text[1:]
  if not text.strip():
    raise ValueError(f"data file {path!r} holds only whitespace.")
  if not _is_jsonl(path):
    return [text]
  records, kind = [], None
  for i, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    where = f"data file {path!r} line {i}"
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where} is not valid JSON: {e.msg}.") from e
    k = _check_record(rec, where)
    if kind is not None and k != kind:
      raise ValueError(f"{where}: a {k!r} record among {kind!r} records; "
                       "use one kind per file.")
    kind = k
    records.append(rec)
  if kind == "text":
    return [r["text"] for r in records]
  return records


# ---------------------------------------------------------------------------
# tokenizing


def _eos(tokenizer) -> int:
  eos = getattr(tokenizer, "eos_token_id", None)
  if isinstance(eos, (list, tuple)):
    eos = eos[0] if eos else None
  if eos is None:
    raise ValueError("the tokenizer has no eos_token_id (needed between "
                     "documents and after completions).")
  return int(eos)


def _pad(tokenizer) -> int:
  pad = getattr(tokenizer, "pad_token_id", None)
  return _eos(tokenizer) if pad is None else int(pad)


def _encode(tokenizer, text: str) -> list[int]:
  return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


def _rows(seqs: list[tuple[list[int], list[bool]]], seq_len: int,
          pad: int) -> TokenizedData:
  n = len(seqs)
  ids = np.full((n, seq_len), pad, np.int32)
  attn = np.zeros((n, seq_len), bool)
  loss = np.zeros((n, seq_len), bool)
  for i, (tokens, targets) in enumerate(seqs):
    t = len(tokens)
    ids[i, :t] = tokens
    attn[i, :t] = True
    loss[i, :t] = targets
  return TokenizedData(ids, attn, loss)


def pack_texts(tokenizer, texts: Sequence[str], seq_len: int
               ) -> TokenizedData:
  """Encodes documents, joins them with EOS and cuts `seq_len` sequences.

  Every real token except the first of each sequence is a target; the last
  sequence is padded (and kept when it has at least 2 tokens).

  Args:
    tokenizer: see the module docstring.
    texts: the documents.
    seq_len: tokens per sequence.

  Returns:
    The `TokenizedData`.

  Raises:
    ValueError: no text, or fewer than 2 tokens in all.
  """
  if isinstance(texts, str):
    texts = [texts]
  if not texts:
    raise ValueError("no documents to train on.")
  eos, pad = _eos(tokenizer), _pad(tokenizer)
  stream: list[int] = []
  for doc in texts:
    stream.extend(_encode(tokenizer, doc))
    stream.append(eos)
  seqs = []
  for start in range(0, len(stream), seq_len):
    chunk = stream[start:start + seq_len]
    if len(chunk) >= 2:
      seqs.append((chunk, [True] * len(chunk)))
  if not seqs:
    raise ValueError(f"the text gives {len(stream)} token(s): too few to "
                     "train on.")
  return _rows(seqs, seq_len, pad)


def _chat_template(tokenizer):
  if not getattr(tokenizer, "chat_template", None) or not hasattr(
      tokenizer, "apply_chat_template"):
    raise ValueError("`messages` records need a tokenizer with a chat "
                     "template; use prompt/completion records instead.")
  return lambda msgs, gen: tokenizer.apply_chat_template(
      list(msgs), tokenize=False, add_generation_prompt=gen)


def _chat_tokens(tokenizer, render, messages, where: str
                 ) -> tuple[list[int], list[bool]]:
  ids = _encode(tokenizer, render(messages, False))
  targets = [False] * len(ids)
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    head = _encode(tokenizer, render(messages[:i], True))
    turn = _encode(tokenizer, render(messages[:i + 1], False))
    if turn[:len(head)] != head or ids[:len(turn)] != turn:
      raise ValueError(
          f"{where}: the chat template does not render a conversation as "
          "the continuation of its beginning, so the assistant tokens "
          "cannot be located; use prompt/completion records instead.")
    for t in range(len(head), len(turn)):
      targets[t] = True
  return ids, targets


def encode_records(tokenizer, records: Sequence[Mapping[str, Any]],
                   seq_len: int) -> TokenizedData:
  """Encodes chat or prompt/completion records, one per sequence.

  Only assistant (or completion + EOS) tokens are targets. A record longer
  than `seq_len` is truncated; records left with no target token are
  dropped.

  Args:
    tokenizer: see the module docstring.
    records: `{"messages": [...]}` or `{"prompt": ..., "completion": ...}`
      dicts, all of one kind.
    seq_len: tokens per sequence.

  Returns:
    The `TokenizedData`.

  Raises:
    ValueError: a malformed record, a tokenizer without a chat template
      for `messages`, or no record with a target token within `seq_len`.

  Examples:
    >>> from jaxbnb.train import encode_records
    >>> class Chars:  # a character-level tokenizer, EOS = 0
    ...   eos_token_id = 0
    ...   def encode(self, text, add_special_tokens=False):
    ...     return [ord(c) for c in text]
    >>> data = encode_records(Chars(), [{"prompt": "ab", "completion": "c"}],
    ...                       seq_len=6)
    >>> data.input_ids.tolist(), data.loss_mask.astype(int).tolist()
    ([[97, 98, 99, 0, 0, 0]], [[0, 0, 1, 1, 0, 0]])
  """
  if not records:
    raise ValueError("no records to train on.")
  eos, pad = _eos(tokenizer), _pad(tokenizer)
  render = None
  seqs = []
  for i, rec in enumerate(records):
    where = f"record {i}"
    kind = _check_record(rec, where)
    if kind == "messages":
      render = render or _chat_template(tokenizer)
      ids, targets = _chat_tokens(tokenizer, render, rec["messages"], where)
    elif kind == "prompt":
      p = _encode(tokenizer, rec["prompt"])
      c = _encode(tokenizer, rec["completion"]) + [eos]
      ids, targets = p + c, [False] * len(p) + [True] * len(c)
    else:
      raise ValueError(f"{where}: a `text` record; pass documents to "
                       "pack_texts.")
    ids, targets = ids[:seq_len], targets[:seq_len]
    if any(targets[1:]):
      seqs.append((ids, targets))
  if not seqs:
    raise ValueError(f"none of the {len(records)} record(s) has a target "
                     f"token within seq_len={seq_len}.")
  return _rows(seqs, seq_len, pad)


def prepare_data(tokenizer, data: Any, seq_len: int) -> TokenizedData:
  """Any supported data as a `TokenizedData`.

  Args:
    tokenizer: see the module docstring.
    data: a file path (`read_data`), a list of documents, a list of
      records, or a `TokenizedData` (its `seq_len` must match).
    seq_len: tokens per sequence.

  Returns:
    The `TokenizedData`.

  Raises:
    ValueError: unusable data (see `read_data`, `pack_texts`,
      `encode_records`).
    FileNotFoundError: a path that is not a file.
  """
  if isinstance(data, TokenizedData):
    if data.seq_len != seq_len:
      raise ValueError(f"the TokenizedData has sequences of {data.seq_len} "
                       f"tokens, the config seq_len={seq_len}.")
    return data
  if isinstance(data, (str, os.PathLike)):
    data = read_data(data)
  if not isinstance(data, Sequence) or not data:
    raise ValueError("data must be a file path, a non-empty list of "
                     "documents or records, or a TokenizedData; got "
                     f"{type(data).__name__}.")
  if all(isinstance(d, str) for d in data):
    if not any(d.strip() for d in data):
      raise ValueError("the documents hold only whitespace.")
    return pack_texts(tokenizer, data, seq_len)
  if all(isinstance(d, Mapping) for d in data):
    if all(_check_record(d, f"record {i}") == "text"
           for i, d in enumerate(data)):
      return pack_texts(tokenizer, [d["text"] for d in data], seq_len)
    return encode_records(tokenizer, data, seq_len)
  raise ValueError("data must be all strings (documents) or all dicts "
                   "(records).")


# ---------------------------------------------------------------------------
# the batch order


def batch_indices(num: int, position: int, count: int, seed: int
                  ) -> np.ndarray:
  """Indices of the `count` sequences after `position` in the stream.

  The stream visits the `num` sequences in a new random order each epoch
  (`np.random.default_rng((seed, epoch)).permutation(num)`), so it depends
  only on `seed` and the position: a resumed run reads exactly what the
  uninterrupted run would have.

  Examples:
    >>> from jaxbnb.train import batch_indices
    >>> a = batch_indices(5, 0, 10, seed=0)
    >>> sorted(a[:5].tolist()) == sorted(a[5:].tolist()) == [0, 1, 2, 3, 4]
    True
    >>> bool((batch_indices(5, 3, 4, seed=0) == a[3:7]).all())
    True
  """
  out = np.empty(count, np.int64)
  i = 0
  while i < count:
    epoch, offset = divmod(position + i, num)
    perm = np.random.default_rng((seed, epoch)).permutation(num)
    take = min(count - i, num - offset)
    out[i:i + take] = perm[offset:offset + take]
    i += take
  return out


def batch_arrays(data: TokenizedData, index: np.ndarray, shape: tuple[int, ...]
                 ) -> dict[str, np.ndarray]:
  """`input_ids`, `attention_mask`, `loss_mask` of `index`, reshaped to
  `shape + (seq_len,)`."""
  part = data.take(index)
  full = tuple(shape) + (data.seq_len,)
  return {"input_ids": part.input_ids.reshape(full),
          "attention_mask": part.attention_mask.reshape(full),
          "loss_mask": part.loss_mask.reshape(full)}
