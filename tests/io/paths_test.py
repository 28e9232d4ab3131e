"""Atomic, source-safe output folders (jaxbnb/_src/io/paths.py)."""

import os

import pytest

from jaxbnb._src.io import paths


def _write(files):
  def write(folder):
    for name, text in files.items():
      with open(os.path.join(folder, name), "w") as f:
        f.write(text)
  return write


def test_check_destination(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  paths.check_destination(tmp_path / "other", str(src), "f")
  paths.check_destination(tmp_path / "src2", str(src), "f")  # a prefix only
  paths.check_destination(src, None, "f")
  for dst, where in ((src, "is"), (src / "a" / "b", "lies inside"),
                     (tmp_path, "contains")):
    with pytest.raises(ValueError, match=f"f: the destination .* {where} "):
      paths.check_destination(dst, str(src), "f")
  link = tmp_path / "link"
  link.symlink_to(src)
  with pytest.raises(ValueError, match=" is "):
    paths.check_destination(link, str(src), "f")


def test_write_folder_atomic(tmp_path):
  target = tmp_path / "out"
  paths.write_folder_atomic(target, _write({"a": "1"}), overwrite=False,
                            fn="f")
  assert os.listdir(target) == ["a"]
  with pytest.raises(FileExistsError, match="overwrite=True"):
    paths.write_folder_atomic(target, _write({"a": "2"}), overwrite=False,
                              fn="f")
  (target / "keep").write_text("k")
  paths.write_folder_atomic(target, _write({"a": "2"}), overwrite=True,
                            fn="f", keep=lambda e: e == "keep")
  assert sorted(os.listdir(target)) == ["a", "keep"]
  assert (target / "a").read_text() == "2"

  def fail(folder):
    _write({"a": "3"})(folder)
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError, match="boom"):
    paths.write_folder_atomic(target, fail, overwrite=True, fn="f")
  assert (target / "a").read_text() == "2"
  assert os.listdir(tmp_path) == ["out"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="not a folder"):
    paths.write_folder_atomic(tmp_path / "file", _write({}), overwrite=True,
                              fn="f")


@pytest.mark.parametrize("below", [("out",), ("a", "b", "out")])
def test_write_folder_atomic_under_a_file_names_the_file(tmp_path, below):
  """A file where a parent folder should be: the documented ValueError
  (not makedirs' FileExistsError), and nothing written."""
  blocker = tmp_path / "file"
  blocker.write_text("x")
  target = blocker.joinpath(*below)
  with pytest.raises(ValueError,
                     match=r"f: cannot write the folder .*file.* is a file"):
    paths.write_folder_atomic(target, _write({"a": "1"}), overwrite=True,
                              fn="f")
  assert sorted(os.listdir(tmp_path)) == ["file"]
  assert blocker.read_text() == "x"
