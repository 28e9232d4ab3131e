"""Tokenizers for jaxbnb models: a HF folder or the metadata of a GGUF file.

A HF folder goes through `transformers.AutoTokenizer` (local files only). A
GGUF file carries its tokenizer as metadata (`tokenizer.ggml.*`), which
transformers' own GGUF conversion (`convert_gguf_tokenizer`, what
`AutoTokenizer.from_pretrained(folder, gguf_file=name)` uses) turns into a
fast tokenizer: byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2, ...),
SentencePiece and Unigram vocabularies, control tokens marked special, and
the file's bos/eos/pad/unk tokens, BOS/EOS flags and chat template.

`AutoTokenizer.from_pretrained(..., gguf_file=...)` itself is not called:
its GGUF metadata reader imports torch (transformers 5.24:
`transformers/integrations/gguf/reader.py` starts with `import torch`), which
jaxbnb does not need. The metadata comes from the `gguf` package instead (as
the weights do, `GGUFSource`), and the conversion is transformers'.

transformers and tokenizers belong to the Hugging Face extra (`pip install
'jaxbnb[hf]'`); they are imported (through `extras.require`) only when a
tokenizer is loaded.
"""

from __future__ import annotations

import os

from jaxbnb._src.io import extras
from jaxbnb._src.io import gguf_source

__all__ = ["load_tokenizer"]

_FEATURE = "loading a tokenizer"
# `tokenizer.ggml.*` id keys -> the tokenizer's special-token arguments.
_SPECIAL_IDS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def _transformers():
  # jaxbnb uses transformers for tokenizers only; its "PyTorch was not
  # found" advisory is noise here (a user's own setting wins).
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  extras.require("tokenizers", _FEATURE)  # transformers imports it lazily
  return extras.require("transformers", _FEATURE)


def load_tokenizer(path: str | os.PathLike):
  """Loads the tokenizer of a HF model folder or a GGUF file.

  Args:
    path: a HF model folder (with `tokenizer.json` or the slow tokenizer's
      files) or a `.gguf` file.

  Returns:
    A `transformers` fast tokenizer. For a GGUF file it has the file's
    `bos_token`/`eos_token`/`pad_token`/`unk_token` and `chat_template`,
    and adds a BOS only where `tokenizer.ggml.add_bos_token` says so.

  Raises:
    FileNotFoundError: `path` does not exist.
    ImportError: transformers is not installed (`pip install
      'jaxbnb[hf]'`).
    NotImplementedError: a GGUF tokenizer model transformers cannot
      convert (`tokenizer.ggml.model`).
    ValueError: a GGUF file without tokenizer metadata, or a folder without
      tokenizer files.

  Example:
    >>> from jaxbnb import convert
    >>> tok = convert.load_tokenizer(
    ...     convert.smollm2_gguf_path())  # doctest: +SKIP
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
  transformers = _transformers()
  try:
    return transformers.AutoTokenizer.from_pretrained(path,
                                                      local_files_only=True)
  except (OSError, ValueError) as e:
    raise ValueError(
        f"cannot load a tokenizer from folder {path!r}: {e}") from e


def _load_gguf(path: str):
  transformers = _transformers()
  try:
    mapping = extras.require(
        "transformers.integrations.gguf.gguf_tokenizer_mapping", _FEATURE)
  except ImportError as e:
    raise ImportError(
        f"GGUF tokenizers need transformers' GGUF conversion "
        "(transformers.integrations.gguf, tested with transformers 5.24); "
        f"transformers {transformers.__version__} lacks it: "
        f"pip install -U 'jaxbnb[hf]'") from e
  meta = gguf_source.read_metadata(gguf_source.open_reader(path))
  if "tokenizer.ggml.model" not in meta or "tokenizer.ggml.tokens" not in meta:
    raise ValueError(f"GGUF file {path!r} has no tokenizer metadata "
                     "(tokenizer.ggml.model / tokenizer.ggml.tokens)")
  # The grouping of transformers' `get_gguf_tokenizer`, on our metadata.
  groups = {
      group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
              if f"tokenizer.{key}" in meta}
      for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()}
  spec, init = groups["tokenizer"], groups["tokenizer_config"]
  if spec.get("tokenizer_type") == "llama":
    # As transformers: llama.cpp adds BOS to a SentencePiece vocabulary
    # whose file does not say otherwise.
    init.setdefault("add_bos_token", True)
  elif spec.get("tokenizer_type") == "gemma4":
    init["add_bos_token"] = False  # its chat template writes <bos> itself
  tokens = spec["tokens"]
  for arg, key in _SPECIAL_IDS.items():
    idx = meta.get(f"tokenizer.ggml.{key}")
    if idx is not None and 0 <= int(idx) < len(tokens):
      init[arg] = tokens[int(idx)]
  try:
    backend, extra = mapping.convert_gguf_tokenizer(
        meta["general.architecture"], spec)
  except ValueError as e:  # "Cannot build a tokenizer ... stating ..."
    raise NotImplementedError(
        f"GGUF file {path!r}: tokenizer.ggml.model is "
        f"{spec.get('tokenizer_type')!r}, which transformers cannot convert: "
        f"{e} Use the model's HF tokenizer folder instead.") from e
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend, clean_up_tokenization_spaces=False,
      **init, **extra)
  tok.name_or_path = path
  return tok
