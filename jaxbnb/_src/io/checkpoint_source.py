"""Lazy, one-tensor-at-a-time readers of model checkpoints.

A `CheckpointSource` gives the HF `config.json` of a model and its tensors by
HF name, reading only the tensor asked for. `open_checkpoint` picks the reader:

  * an HF folder with `model.safetensors` or sharded
    `model.safetensors.index.json` (`SafetensorsSource`, no torch needed:
    `safetensors.safe_open(..., framework="numpy")`, bf16 as
    `ml_dtypes.bfloat16`);
  * an HF folder with only `pytorch_model.bin` (or its index): read with
    `torch.load(weights_only=True)` when torch is installed (`TorchBinSource`);
  * a `.gguf` file (`GGUFSource`).

torch is imported inside the functions that read `.bin` files only: it is
optional and heavy, and jaxbnb never needs it otherwise.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Protocol, runtime_checkable

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from jaxbnb._src.io import gguf_source
from jaxbnb._src.io import paths

__all__ = [
    "CheckpointSource",
    "SafetensorsSource",
    "TorchBinSource",
    "open_checkpoint",
    "write_safetensors",
    "SAFETENSORS_DTYPES",
]

# safetensors dtype tag -> numpy / ml_dtypes dtype.
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}


@runtime_checkable
class CheckpointSource(Protocol):
  """What `from_pretrained` needs from a checkpoint.

  Attributes:
    path: the folder or file the checkpoint was opened from.
    config: the HF `config.json` contents.
    quantization_config: `config["quantization_config"]` or None.
  """

  path: str
  config: dict[str, Any]

  @property
  def quantization_config(self) -> dict[str, Any] | None:
    ...

  def names(self) -> list[str]:
    """All tensor names (HF names), in checkpoint order."""
    ...

  def shape(self, name: str) -> tuple[int, ...]:
    ...

  def dtype(self, name: str) -> np.dtype:
    ...

  def load(self, name: str) -> np.ndarray:
    """Reads one tensor (and nothing else) into host memory."""
    ...

  def describe(self, name: str) -> str:
    """Where the tensor lives, e.g. `"model-00001-of-00002.safetensors:w"`."""
    ...


def _read_json(path: str, what: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"{what} {path!r} must hold a JSON object, got "
                     f"{type(data).__name__}.")
  return data


def _read_folder_config(folder: str) -> tuple[dict, dict | None]:
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(
        f"Checkpoint folder {folder!r} has no config.json (expected "
        f"{cfg_path!r})."
    )
  config = _read_json(cfg_path, "config")
  gen_path = os.path.join(folder, "generation_config.json")
  gen = _read_json(gen_path, "generation config") if os.path.isfile(
      gen_path) else None
  return config, gen


class _FolderSource:
  """Shared parts of the HF-folder readers."""

  path: str
  config: dict[str, Any]
  generation_config: dict[str, Any] | None
  _where: dict[str, str]  # tensor name -> file path

  @property
  def quantization_config(self) -> dict[str, Any] | None:
    qc = self.config.get("quantization_config")
    return dict(qc) if isinstance(qc, dict) else None

  def names(self) -> list[str]:
    return list(self._where)

  def files(self) -> list[str]:
    """The weight files, in order of first appearance."""
    return list(dict.fromkeys(self._where.values()))

  def describe(self, name: str) -> str:
    return f"{os.path.basename(self._file(name))}:{name}"

  def _file(self, name: str) -> str:
    try:
      return self._where[name]
    except KeyError:
      raise KeyError(
          f"Checkpoint {self.path!r} has no tensor {name!r}."
      ) from None

  def nbytes(self, name: str) -> int:
    return math.prod(self.shape(name)) * self.dtype(name).itemsize

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.path!r}, {len(self._where)} "
            f"tensors in {len(self.files())} file(s))")


class SafetensorsSource(_FolderSource):
  """An HF folder with `model.safetensors` or a sharded index.

  Files are opened with `safetensors.safe_open` (which validates the header
  and that the file is as long as the header says) and tensors are read
  lazily, one at a time, as numpy arrays (no torch); bf16 comes back as
  `ml_dtypes.bfloat16`.

  Examples:
    >>> import os, tempfile, numpy as np
    >>> d = tempfile.mkdtemp()
    >>> _ = open(os.path.join(d, "config.json"), "w").write("{}")
    >>> _ = write_safetensors(os.path.join(d, "model.safetensors"),
    ...                       {"w": np.ones((2, 3), np.float32)})
    >>> src = SafetensorsSource(d)
    >>> src.names(), src.shape("w"), src.load("w").sum()
    (['w'], (2, 3), np.float32(6.0))
  """

  def __init__(self, path: str | os.PathLike):
    folder = os.fspath(path)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"Checkpoint folder {folder!r} does not exist.")
    self.path = folder
    self.config, self.generation_config = _read_folder_config(folder)
    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    self._where = {}
    self._info: dict[str, tuple[str, tuple[int, ...]]] = {}
    self._handles: dict[str, Any] = {}
    if os.path.isfile(index):
      weight_map = _read_json(index, "safetensors index").get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index!r} has no 'weight_map' object.")
      by_file: dict[str, list[str]] = {}
      for name, fname in weight_map.items():
        by_file.setdefault(fname, []).append(name)
      for fname, names in by_file.items():
        fpath = os.path.join(folder, fname)
        if not os.path.isfile(fpath):
          raise FileNotFoundError(
              f"{index!r} maps {len(names)} tensor(s) (e.g. {names[0]!r}) to "
              f"shard {fname!r}, but {fpath!r} does not exist."
          )
        header = self._open(fpath)
        for name in names:
          if name not in header:
            raise ValueError(
                f"{index!r} maps tensor {name!r} to {fname!r}, but that "
                "shard does not contain it."
            )
          self._where[name] = fpath
          self._info[name] = header[name]
    elif os.path.isfile(single):
      for name, info in self._open(single).items():
        self._where[name] = single
        self._info[name] = info
    else:
      raise FileNotFoundError(
          f"Checkpoint folder {folder!r} has neither model.safetensors nor "
          "model.safetensors.index.json."
      )

  def _open(self, fpath: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Opens one file; returns `{name: (dtype tag, shape)}` in file order."""
    try:
      try:
        # pread: each get_tensor reads its bytes into a fresh array. The
        # default mmap keeps every page read mapped while the file is open,
        # so peak RSS grows to the checkpoint's size (measured: +544 MiB
        # reading a 512 MiB file tensor by tensor, +32 MiB with pread).
        handle = safetensors.safe_open(fpath, framework="numpy",
                                       backend="pread")
      except TypeError:  # safetensors before `backend` existed: mmap only
        handle = safetensors.safe_open(fpath, framework="numpy")
    except safetensors.SafetensorError as e:
      # safetensors checks the header and that the data it describes fits
      # the file exactly; its message does not name the file.
      raise ValueError(
          f"{fpath!r} is truncated or not a safetensors file (re-download "
          f"or re-save the checkpoint): {e}") from e
    header = {}
    for name in handle.offset_keys():
      view = handle.get_slice(name)
      tag = view.get_dtype()
      if tag not in SAFETENSORS_DTYPES:
        raise ValueError(
            f"{fpath!r}:{name}: unsupported safetensors dtype {tag!r}; known: "
            f"{sorted(SAFETENSORS_DTYPES)}."
        )
      header[name] = (tag, tuple(int(d) for d in view.get_shape()))
    self._handles[fpath] = handle
    return header

  def shape(self, name: str) -> tuple[int, ...]:
    self._file(name)
    return self._info[name][1]

  def dtype(self, name: str) -> np.dtype:
    self._file(name)
    return SAFETENSORS_DTYPES[self._info[name][0]]

  def load_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """`load(name)[index]`, reading only that part of the file (float8
    tensors, which safetensors cannot slice, are read whole)."""
    fpath = self._file(name)
    if self._info[name][0] in _RAW_TAGS:
      return self.load(name)[tuple(index)]
    try:
      return np.asarray(self._handles[fpath].get_slice(name)[tuple(index)])
    except Exception as e:  # safetensors' own error types vary
      raise ValueError(f"Could not read {self.describe(name)}[{index}]: "
                       f"{e}") from e

  def load(self, name: str) -> np.ndarray:
    fpath = self._file(name)
    tag, shape = self._info[name]
    try:
      if tag in _RAW_TAGS:
        return _read_raw(fpath, name, SAFETENSORS_DTYPES[tag], shape)
      return np.asarray(self._handles[fpath].get_tensor(name))
    except (OSError, safetensors.SafetensorError) as e:
      raise ValueError(f"Could not read {self.describe(name)}: {e}") from e


# safetensors (0.8.0) cannot give these as numpy or flax arrays: get_tensor
# raises "AttributeError: module 'numpy' has no attribute 'float8_e4m3fn'"
# (it looks the type up on numpy; only ml_dtypes defines it). They are read
# as raw bytes at the offset the header gives, from a file safe_open has
# already validated.
_RAW_TAGS = ("F8_E4M3", "F8_E5M2")


def _read_raw(fpath: str, name: str, dt: np.dtype,
              shape: tuple[int, ...]) -> np.ndarray:
  with open(fpath, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    begin, end = json.loads(f.read(n))[name]["data_offsets"]
    f.seek(8 + n + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, dtype=dt).reshape(shape).copy()


def _torch_to_numpy(torch, t) -> np.ndarray:
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


class TorchBinSource(_FolderSource):
  """An HF folder with only `pytorch_model.bin` (or its sharded index).

  Needs torch; the files are opened with `torch.load(weights_only=True,
  mmap=True)` so tensors are still converted one at a time.
  """

  def __init__(self, path: str | os.PathLike):
    folder = os.fspath(path)
    self.path = folder
    self.config, self.generation_config = _read_folder_config(folder)
    single = os.path.join(folder, "pytorch_model.bin")
    index = os.path.join(folder, "pytorch_model.bin.index.json")
    if os.path.isfile(index):
      weight_map = _read_json(index, "pytorch index").get("weight_map") or {}
      files = {n: os.path.join(folder, f) for n, f in weight_map.items()}
    else:
      files = None
    first = single if files is None else next(iter(files.values()), single)
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ImportError(
          f"{first!r} is a PyTorch pickle checkpoint; reading it needs torch "
          "(`pip install torch`), or convert the folder to safetensors "
          "(e.g. `transformers` `save_pretrained(..., safe_serialization="
          "True)`)."
      ) from None
    self._torch = torch
    self._states: dict[str, dict] = {}
    self._where = {}
    for fpath in ([single] if files is None else list(dict.fromkeys(
        files.values()))):
      if not os.path.isfile(fpath):
        raise FileNotFoundError(f"PyTorch checkpoint shard {fpath!r} is "
                                "missing.")
      state = torch.load(fpath, map_location="cpu", weights_only=True,
                         mmap=True)
      self._states[fpath] = state
      for name in state:
        self._where[name] = fpath

  def _tensor(self, name: str):
    return self._states[self._file(name)][name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._tensor(name).shape)

  def dtype(self, name: str) -> np.dtype:
    t = self._tensor(name)
    if t.dtype == self._torch.bfloat16:
      return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_torch_to_numpy(self._torch, t.flatten()[:0]).dtype)

  def load(self, name: str) -> np.ndarray:
    return np.array(_torch_to_numpy(self._torch, self._tensor(name)))


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> int:
  """Writes numpy arrays (bf16 via ml_dtypes) as a safetensors file.

  Written with `safetensors.numpy.save_file` (which orders the tensors by
  dtype alignment, then name) to a temporary file beside `path`, renamed
  into place once complete.

  Args:
    path: output file.
    tensors: name -> array.
    metadata: `__metadata__` strings (default `{"format": "pt"}`, which
      transformers expects).

  Returns:
    The number of tensor bytes written.

  Raises:
    TypeError: a tensor of a dtype safetensors cannot store.
  """
  known = set(SAFETENSORS_DTYPES.values())
  arrays = {}
  for name, arr in tensors.items():
    arr = np.asarray(arr)
    if arr.dtype not in known:
      raise TypeError(f"write_safetensors: tensor {name!r} has unsupported "
                      f"dtype {arr.dtype}.")
    arrays[name] = np.ascontiguousarray(arr).reshape(arr.shape)  # keeps 0-d
  meta = dict(metadata or {"format": "pt"})
  paths.write_file_atomic(
      path, lambda tmp: safetensors.numpy.save_file(arrays, tmp, meta))
  return sum(a.nbytes for a in arrays.values())


def open_checkpoint(path: str | os.PathLike) -> CheckpointSource:
  """Opens a checkpoint for lazy, per-tensor reading.

  Args:
    path: an HF model folder (`config.json` plus `model.safetensors`, a
      sharded `model.safetensors.index.json`, or `pytorch_model.bin`), or a
      `.gguf` file.

  Returns:
    A `CheckpointSource`.

  Raises:
    FileNotFoundError: if the path, its config.json or its weight files are
      missing (the message names the path).
    ImportError: for a `pytorch_model.bin`-only folder without torch.
    ValueError: for a malformed or truncated file.

  Examples:
    >>> from jaxbnb import convert
    >>> convert.open_checkpoint("/does/not/exist")
    Traceback (most recent call last):
    ...
    FileNotFoundError: Checkpoint path '/does/not/exist' does not exist.
  """
  if isinstance(path, CheckpointSource) and not isinstance(path, (str,
                                                                  os.PathLike)):
    return path
  p = os.fspath(path)
  if not os.path.exists(p):
    raise FileNotFoundError(f"Checkpoint path {p!r} does not exist.")
  if os.path.isfile(p):
    if p.lower().endswith(".gguf"):
      return gguf_source.GGUFSource(p)
    if os.path.basename(p) in ("config.json", "model.safetensors",
                               "model.safetensors.index.json"):
      return open_checkpoint(os.path.dirname(p) or ".")
    raise ValueError(
        f"Checkpoint path {p!r} is a file; expected an HF model folder or a "
        ".gguf file."
    )
  has = lambda f: os.path.isfile(os.path.join(p, f))
  if has("model.safetensors") or has("model.safetensors.index.json"):
    return SafetensorsSource(p)
  if has("pytorch_model.bin") or has("pytorch_model.bin.index.json"):
    return TorchBinSource(p)
  _read_folder_config(p)  # a missing config.json is reported first
  raise FileNotFoundError(
      f"Checkpoint folder {p!r} has no weights: expected model.safetensors, "
      "model.safetensors.index.json or pytorch_model.bin."
  )
