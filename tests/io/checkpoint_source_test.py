"""Tests of the lazy checkpoint readers (jaxbnb/_src/io/checkpoint_source.py)."""

import importlib.util
import json
import os

import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy

from jaxbnb._src.io import checkpoint_source as cs
from tests.io import common


def _folder(tmp_path, tensors, config=None, name="model.safetensors"):
  (tmp_path / "config.json").write_text(json.dumps(config or {}))
  cs.write_safetensors(str(tmp_path / name), tensors)
  return str(tmp_path)


def test_reads_files_written_by_safetensors(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
      "f32": rng.standard_normal((3, 5)).astype(np.float32),
      "f16": rng.standard_normal((4,)).astype(np.float16),
      "u8": rng.integers(0, 255, (7, 1)).astype(np.uint8),
      "i8": rng.integers(-128, 127, (2, 2)).astype(np.int8),
      "scalar": np.asarray(3, np.int64),
  }
  (tmp_path / "config.json").write_text("{}")
  safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
  src = cs.open_checkpoint(tmp_path)
  assert isinstance(src, cs.SafetensorsSource)
  assert isinstance(src, cs.CheckpointSource)
  assert sorted(src.names()) == sorted(tensors)
  for name, want in tensors.items():
    got = src.load(name)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    assert src.shape(name) == want.shape and src.dtype(name) == want.dtype
    np.testing.assert_array_equal(got, want)
  assert src.describe("u8") == "model.safetensors:u8"


def test_bfloat16_matches_safetensors_flax():
  folder = common.golden("orig")
  src = cs.open_checkpoint(folder)
  path = os.path.join(folder, "model.safetensors")
  name = "model.embed_tokens.weight"
  got = src.load(name)
  assert got.dtype == ml_dtypes.bfloat16
  want = np.asarray(safetensors.flax.load_file(path)[name])
  assert want.dtype == got.dtype
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_written_files_load_with_safetensors(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
             "b": np.ones((3,), ml_dtypes.bfloat16),
             "c": np.asarray(7, np.uint8)}
  path = str(tmp_path / "x.safetensors")
  cs.write_safetensors(path, tensors)
  loaded = safetensors.flax.load_file(path)
  for k, v in tensors.items():
    assert loaded[k].shape == v.shape and loaded[k].dtype == v.dtype
    np.testing.assert_array_equal(np.asarray(loaded[k]), v)


def test_sharded_index(tmp_path):
  a = np.arange(4, dtype=np.float32)
  b = np.arange(6, dtype=np.float16).reshape(2, 3)
  cs.write_safetensors(str(tmp_path / "s1.safetensors"), {"a": a})
  cs.write_safetensors(str(tmp_path / "s2.safetensors"), {"b": b})
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {"a": "s1.safetensors",
                                      "b": "s2.safetensors"}}))
  src = cs.open_checkpoint(tmp_path)
  np.testing.assert_array_equal(src.load("b"), b)
  assert src.describe("b") == "s2.safetensors:b"
  assert [os.path.basename(f) for f in src.files()] == ["s1.safetensors",
                                                         "s2.safetensors"]


def test_missing_shard_names_shard_and_tensor(tmp_path):
  cs.write_safetensors(str(tmp_path / "s1.safetensors"),
                       {"a": np.zeros(2, np.float32)})
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"a": "s1.safetensors", "w.b": "s2.safetensors"}}))
  with pytest.raises(FileNotFoundError, match=r"s2\.safetensors.*") as e:
    cs.open_checkpoint(tmp_path)
  assert "'w.b'" in str(e.value)


def test_index_tensor_absent_from_shard(tmp_path):
  cs.write_safetensors(str(tmp_path / "s1.safetensors"),
                       {"a": np.zeros(2, np.float32)})
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"a": "s1.safetensors", "zz": "s1.safetensors"}}))
  with pytest.raises(ValueError, match="'zz'.*does not contain"):
    cs.open_checkpoint(tmp_path)


def test_truncated_shard(tmp_path):
  folder = _folder(tmp_path, {"w": np.ones((64, 64), np.float32)})
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(ValueError, match="model.safetensors.*truncated"):
    cs.open_checkpoint(folder)


def test_garbage_file(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors").write_bytes(b"\xff" * 5)
  with pytest.raises(ValueError, match="not a safetensors file"):
    cs.open_checkpoint(tmp_path)


def test_missing_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope"):
    cs.open_checkpoint(tmp_path / "nope")
  cs.write_safetensors(str(tmp_path / "model.safetensors"),
                       {"a": np.zeros(1, np.float32)})
  with pytest.raises(FileNotFoundError, match="config.json"):
    cs.open_checkpoint(tmp_path)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no weights"):
    cs.open_checkpoint(empty)


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None,
                    reason="torch is installed")
def test_pytorch_bin_without_torch(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
  with pytest.raises(ImportError, match="pytorch_model.bin.*torch"):
    cs.open_checkpoint(tmp_path)


def test_gguf_dispatch(tmp_path, monkeypatch):
  from jaxbnb._src.io import gguf_source  # pylint: disable=g-import-not-at-top

  seen = []

  class Fake:

    def __init__(self, path):
      seen.append(path)

  monkeypatch.setattr(gguf_source, "GGUFSource", Fake)
  path = tmp_path / "m.gguf"
  path.write_bytes(b"GGUF")
  assert isinstance(cs.open_checkpoint(path), Fake)
  assert seen == [str(path)]


def test_float8_round_trip(tmp_path):
  tensors = {
      "e4m3": np.asarray([[0.5, -1.0, 448.0]], ml_dtypes.float8_e4m3fn),
      "e5m2": np.asarray([0.25, -2.0], ml_dtypes.float8_e5m2),
      "f32": np.arange(3, dtype=np.float32),
  }
  src = cs.open_checkpoint(_folder(tmp_path, tensors))
  for name, want in tensors.items():
    got = src.load(name)
    assert got.dtype == want.dtype and src.dtype(name) == want.dtype, name
    assert got.tobytes() == want.tobytes(), name


def test_unsupported_dtype_names_file_and_tensor(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  safetensors.numpy.save_file({"c": np.ones(2, np.complex64)},
                              str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"model\.safetensors'?:c: unsupported"):
    cs.open_checkpoint(tmp_path)


def test_write_is_atomic(tmp_path, monkeypatch):
  path = tmp_path / "x.safetensors"
  cs.write_safetensors(str(path), {"a": np.ones(3, np.float32)})
  before = path.read_bytes()

  def broken(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", broken)
  with pytest.raises(OSError, match="disk full"):
    cs.write_safetensors(str(path), {"a": np.zeros(3, np.float32)})
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == ["x.safetensors"]
  with pytest.raises(TypeError, match="'o'.*unsupported dtype"):
    cs.write_safetensors(str(path), {"o": np.asarray(["x"], object)})
