"""Tokenizers for jaxbnb models: a HF folder or the metadata of a GGUF file.

A HF folder goes through `transformers.AutoTokenizer` (local files only). A
GGUF file carries its tokenizer as metadata (`tokenizer.ggml.*`); for
byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: GPT-2, SmolLM,
Llama 3, Qwen2, ...) we build the equivalent `tokenizers` BPE model with a
ByteLevel pre-tokenizer and decoder, mark the control tokens as special, and
wrap it in a `transformers.PreTrainedTokenizerFast` with the file's
bos/eos/pad/unk tokens and chat template. Save it with `save_pretrained`.
"""

from __future__ import annotations

import functools
import os

__all__ = ["load_tokenizer"]

# How each `tokenizer.ggml.pre` splits text before BPE. None: GPT-2's own
# regex (the ByteLevel pre-tokenizer with use_regex=True).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {
    None: None,
    "default": None,
    "gpt2": None,
    "gpt-2": None,
    "smollm": None,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}
_CONTROL = 3  # llama.cpp token types: 1 normal, 3 control, 4 user-defined.
_USER_DEFINED = 4



def _quiet_transformers() -> None:
  # jaxbnb uses transformers for tokenizers only; its "PyTorch was not
  # found" advisory is noise here (a user's own setting wins).
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

def load_tokenizer(path: str | os.PathLike):
  """Loads the tokenizer of a HF model folder or a GGUF file.

  Args:
    path: a HF model folder (with `tokenizer.json` or the slow tokenizer's
      files) or a `.gguf` file.

  Returns:
    A `transformers.PreTrainedTokenizerFast`. For a GGUF file it has the
    file's `bos_token`/`eos_token`/`pad_token`/`unk_token` and
    `chat_template`, and adds no BOS (`tokenizer.ggml.add_bos_token`).

  Raises:
    FileNotFoundError: `path` does not exist.
    NotImplementedError: a GGUF tokenizer that is not byte-level BPE
      (`tokenizer.ggml.model` other than "gpt2"), or an unknown
      `tokenizer.ggml.pre` split.
    ValueError: a GGUF file without tokenizer metadata, or a folder without
      tokenizer files.

  Example:
    >>> from jaxbnb._src.io.gguf_source import smollm2_gguf_path
    >>> tok = load_tokenizer(smollm2_gguf_path())  # doctest: +SKIP
    >>> tok.apply_chat_template(
    ...     [{"role": "user", "content": "Hi"}], add_generation_prompt=True,
    ...     tokenize=False).endswith("<|im_start|>assistant\\n")
    ... # doctest: +SKIP
    True
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer path {path!r} does not exist")
  if os.path.isdir(path):
    return _load_hf(path)
  if path.endswith(".gguf") or _is_gguf(path):
    return _load_gguf(path)
  raise ValueError(
      f"tokenizer path {path!r}: expected a HF model folder or a .gguf file")


def _is_gguf(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def _load_hf(path: str):
  _quiet_transformers()
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top

  try:
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(
        f"cannot load a tokenizer from folder {path!r}: {e}") from e


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> printable character map (as in `bytes_to_unicode`)."""
  keep = (list(range(ord("!"), ord("~") + 1))
          + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
  chars = list(keep)
  extra = 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + extra)
      extra += 1
  return {b: chr(c) for b, c in zip(keep, chars)}


def _load_gguf(path: str):
  # pylint: disable=g-import-not-at-top
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
  from tokenizers import pre_tokenizers, processors
  _quiet_transformers()
  from transformers import PreTrainedTokenizerFast

  from jaxbnb._src.io.gguf_source import open_reader, read_metadata
  # pylint: enable=g-import-not-at-top

  meta = read_metadata(open_reader(path))
  kind = meta.get("tokenizer.ggml.model")
  if kind is None or "tokenizer.ggml.tokens" not in meta:
    raise ValueError(f"GGUF file {path!r} has no tokenizer metadata "
                     "(tokenizer.ggml.model / tokenizer.ggml.tokens)")
  if kind != "gpt2":
    raise NotImplementedError(
        f"GGUF file {path!r}: tokenizer.ggml.model is {kind!r}; only byte-"
        "level BPE ('gpt2') tokenizers can be built from GGUF metadata. Use "
        "the model's HF tokenizer folder instead.")
  pre = meta.get("tokenizer.ggml.pre")
  if pre not in _PRE_SPLITS:
    raise NotImplementedError(
        f"GGUF file {path!r}: tokenizer.ggml.pre is {pre!r}; supported: "
        f"{sorted(k for k in _PRE_SPLITS if k)}")
  tokens = [str(t) for t in meta["tokenizer.ggml.tokens"]]
  types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
  merges = meta.get("tokenizer.ggml.merges")
  if merges is None:
    raise ValueError(f"GGUF file {path!r} has no tokenizer.ggml.merges")

  alphabet = _byte_alphabet()
  letters = set(alphabet.values())

  def spelled(token: str) -> str:
    # Byte-level vocabularies spell every token in the byte alphabet; a token
    # that is not (rare llama.cpp spelling) is re-spelled from its UTF-8.
    if set(token) <= letters:
      return token
    return "".join(alphabet[b] for b in token.encode("utf-8"))

  vocab = {}
  for i, (token, kind_) in enumerate(zip(tokens, types)):
    key = token if kind_ in (_CONTROL, _USER_DEFINED) else spelled(token)
    vocab.setdefault(key, i)
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                     byte_fallback=False)
  backend = Tokenizer(model)
  split = _PRE_SPLITS[pre]
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                     use_regex=True)
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
  backend.decoder = decoders.ByteLevel()
  backend.add_special_tokens([
      AddedToken(t, special=True, normalized=False)
      for t, k in zip(tokens, types) if k == _CONTROL])
  backend.add_tokens([
      AddedToken(t, special=False, normalized=False)
      for t, k in zip(tokens, types) if k == _USER_DEFINED])

  def token(key: str):
    idx = meta.get(f"tokenizer.ggml.{key}")
    return tokens[int(idx)] if idx is not None and int(idx) < len(tokens) \
        else None

  special = {
      "bos_token": token("bos_token_id"),
      "eos_token": token("eos_token_id"),
      "pad_token": token("padding_token_id"),
      "unk_token": token("unknown_token_id"),
  }
  bos = special["bos_token"]
  if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
    bos_id = vocab.get(bos, tokens.index(bos))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, bos_id)])
  tok = PreTrainedTokenizerFast(
      tokenizer_object=backend,
      clean_up_tokenization_spaces=False,
      **{k: v for k, v in special.items() if v is not None})
  template = meta.get("tokenizer.chat_template")
  if template:
    tok.chat_template = str(template)
  tok.name_or_path = path
  return tok
