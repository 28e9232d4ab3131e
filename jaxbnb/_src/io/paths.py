"""Safe output paths: atomic writes that never destroy a model's source.

Every saver (`save_pretrained`, `save_checkpoint`, `write_safetensors`)
writes into a fresh temporary folder or file beside its destination and
renames it into place, so a failure leaves the old files as they were.
Folders and files get the usual permissions (`0o777 & ~umask` and
`0o666 & ~umask`, as `os.makedirs` and `open`; `tempfile.mkdtemp` would
give 0700, safetensors 0600).

`from_pretrained` records the checkpoint a model came from
(`record_source`); a saver refuses a destination that is, contains or lies
inside that checkpoint (`check_destination`), which would otherwise replace
the original weights by the converted ones.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import weakref
from typing import Any, Callable

from jaxbnb._src.io import processes

__all__ = ["record_source", "source_of", "check_destination",
           "check_writable", "write_folder_atomic", "write_file_atomic"]

# model -> the checkpoint path it was loaded from. A side table rather than
# an attribute: a Python attribute of an nnx.Module becomes part of its
# graphdef, so models loaded from different paths would compile separately
# and print the path in their repr.
_SOURCES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def record_source(model: Any, path: str | os.PathLike) -> None:
  """Remembers that `model` was loaded from the checkpoint at `path`."""
  _SOURCES[model] = os.path.realpath(os.fspath(path))


def source_of(model: Any) -> str | None:
  """The checkpoint `model` was loaded from (`record_source`), or None."""
  return _SOURCES.get(model)


def _within(path: str, folder: str) -> bool:
  return os.path.commonpath([path, folder]) == folder


def check_destination(dst: str | os.PathLike, source: str | None,
                      fn: str) -> None:
  """Refuses a destination that is, contains or lies inside `source`.

  Args:
    dst: where `fn` is about to write.
    source: the checkpoint (folder or file) the model was loaded from, or
      None (nothing to protect).
    fn: the caller's name, for the message.

  Raises:
    ValueError: naming both paths.

  Examples:
    >>> check_destination("/m/out", "/m/src", "save")
    >>> check_destination("/m/src/q", "/m/src", "save")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: save: the destination '/m/src/q' lies inside '/m/src', ...
  """
  if source is None:
    return
  d = os.path.realpath(os.fspath(dst))
  s = os.path.realpath(source)
  if d == s:
    where = "is"
  elif _within(d, s):
    where = "lies inside"
  elif _within(s, d):
    where = "contains"
  else:
    return
  raise ValueError(
      f"{fn}: the destination {d!r} {where} {s!r}, the checkpoint the model "
      "was loaded from; writing there could destroy it. Choose another "
      "folder.")


def _fresh_name(parent: str, prefix: str) -> str:
  return os.path.join(parent, f"{prefix}{secrets.token_hex(4)}")


def _make_folder(parent: str, prefix: str) -> str:
  """A new empty folder in `parent`, mode `0o777 & ~umask`."""
  while True:
    path = _fresh_name(parent, prefix)
    try:
      os.mkdir(path)  # mode 0o777, less the umask
      return path
    except FileExistsError:
      continue


def check_writable(target: str | os.PathLike) -> None:
  """Checks, before any long work, that a folder can be written at `target`.

  Creates (and removes) a temporary folder where `write_folder_atomic`
  would make its own: beside `target`, or, when `target`'s parent does not
  exist yet, in its nearest existing ancestor (`write_folder_atomic`
  creates the missing parents).

  Raises:
    OSError: the folder cannot be created (a read-only file system, no
      permission, a parent that is a file); its `filename` is the folder
      that refused.
  """
  parent = os.path.dirname(os.path.realpath(os.fspath(target)))
  while not os.path.exists(parent):
    up = os.path.dirname(parent)
    if up == parent:
      break
    parent = up
  if not os.path.isdir(parent):
    raise NotADirectoryError(20, "Not a directory", parent)
  try:
    probe = _make_folder(parent, f".{os.path.basename(target)}.probe-")
  except OSError as e:
    raise type(e)(e.errno, e.strerror, parent) from e
  os.rmdir(probe)


def _check_parents(target: str, fn: str) -> None:
  """The nearest existing folder above `target` must be a folder."""
  parent = os.path.dirname(target)
  while parent and not os.path.exists(parent):
    up = os.path.dirname(parent)
    if up == parent:
      return
    parent = up
  if parent and not os.path.isdir(parent):
    raise ValueError(f"{fn}: cannot write the folder {target!r}: "
                     f"{parent!r} is a file, not a folder.")


def write_folder_atomic(target: str | os.PathLike,
                        write: Callable[[str], None], *, overwrite: bool,
                        fn: str, source: str | None = None,
                        keep: Callable[[str], bool] | None = None,
                        collective: bool = False) -> str:
  """Writes a folder with `write(tmp)`, then renames it to `target`.

  `write` fills a new folder beside `target` (same parent, so the renames
  stay on one file system). An existing `target` is swapped out only once
  `write` has succeeded, and deleted after the swap; on any error the
  temporary folder is removed and `target` is untouched.

  With several processes (`jax.distributed`) every process calls this, for
  one folder on a file system they share: they agree on the temporary
  folder, process 0 creates and renames it, and `write` runs on process 0
  only, or on every process with `collective=True` (orbax, which writes
  each process's shards). An error in any process is an error in all.

  Args:
    target: the output folder.
    write: fills the folder whose path it gets.
    overwrite: allow replacing a non-empty `target`.
    fn: the caller's name, for messages.
    source: the checkpoint the model was loaded from (see
      `check_destination`), or None.
    keep: entries of an existing `target` to carry over into the new folder
      (e.g. tokenizer files) where `write` wrote none of that name; None
      keeps nothing.
    collective: with several processes, call `write` on every process.

  Returns:
    The absolute path written.

  Raises:
    ValueError: `target` or a folder above it is a file, or `target`
      overlaps `source`.
    FileExistsError: `target` is a non-empty folder and `overwrite` is False.
    RuntimeError: another process failed to write its part.
  """
  target = os.path.realpath(os.fspath(target))
  check_destination(target, source, fn)
  exists = os.path.exists(target)
  if exists and not os.path.isdir(target):
    raise ValueError(f"{fn}: {target!r} exists and is not a folder.")
  _check_parents(target, fn)
  if exists and os.listdir(target) and not overwrite:
    raise FileExistsError(
        f"{fn}: {target!r} already exists and is not empty; pass "
        "overwrite=True (--overwrite on the command line) to replace it.")
  if processes.several():
    return _write_folder_together(target, write, exists, keep, collective,
                                  fn)
  parent, base = os.path.split(target)
  os.makedirs(parent, exist_ok=True)
  tmp = _make_folder(parent, f".{base}.tmp-")
  try:
    write(tmp)
    _swap_in(tmp, target, exists, keep)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return target


def _swap_in(tmp: str, target: str, exists: bool,
             keep: Callable[[str], bool] | None) -> None:
  """Renames the written `tmp` to `target`, replacing an existing one."""
  if not exists:
    os.rename(tmp, target)
    return
  parent, base = os.path.split(target)
  os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
  for entry in os.listdir(target):
    # What `write` put in `tmp` wins over the old folder's file of that name.
    if (keep is not None and keep(entry)
        and not os.path.lexists(os.path.join(tmp, entry))):
      src_p, dst_p = os.path.join(target, entry), os.path.join(tmp, entry)
      if os.path.isdir(src_p) and not os.path.islink(src_p):
        shutil.copytree(src_p, dst_p, symlinks=True)
      else:
        shutil.copy2(src_p, dst_p, follow_symlinks=False)
  old = _fresh_name(parent, f".{base}.old-")
  os.rename(target, old)
  try:
    os.rename(tmp, target)
  except BaseException:
    os.rename(old, target)
    raise
  shutil.rmtree(old, ignore_errors=True)


def _write_folder_together(target: str, write: Callable[[str], None],
                           exists: bool, keep: Callable[[str], bool] | None,
                           collective: bool, fn: str) -> str:
  """`write_folder_atomic` for several processes (see there)."""
  parent, base = os.path.split(target)
  tmp = os.path.join(parent, f".{base}.tmp-{processes.shared_token()}")
  primary = processes.is_primary()
  # Every process has checked `target` before process 0 changes anything.
  processes.sync(f"{fn}:checked:{tmp}")
  error = None
  try:
    if primary:
      os.makedirs(parent, exist_ok=True)
      os.mkdir(tmp)
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if processes.all_succeeded(error is None):
    try:
      if primary or collective:
        write(tmp)
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if processes.all_succeeded(error is None) and primary:
      try:
        _swap_in(tmp, target, exists, keep)
      except Exception as e:  # pylint: disable=broad-except
        error = e
  ok = processes.all_succeeded(error is None)
  if not ok and primary:
    shutil.rmtree(tmp, ignore_errors=True)
  processes.sync(f"{fn}:done:{tmp}")
  if error is not None:
    raise error
  if not ok:
    raise RuntimeError(
        f"{fn}: another process failed while writing {target!r} (its own "
        "error says why); nothing was written.")
  return target


def write_file_atomic(path: str | os.PathLike,
                      write: Callable[[str], Any]) -> Any:
  """Calls `write(tmp)` on a temporary name beside `path`, then renames.

  Returns what `write` returns; on an error the temporary file is removed
  and an existing `path` is untouched.
  """
  path = os.fspath(path)
  parent, base = os.path.split(os.path.abspath(path))
  while True:
    tmp = _fresh_name(parent, f".{base}.tmp-")
    try:
      os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
      break
    except FileExistsError:
      continue
  try:
    # The mode a new file gets (0o666 & ~umask). Writers that replace the
    # file (safetensors writes its own temporary file, mode 0600, and
    # renames it) lose it, so it is restored.
    mode = stat.S_IMODE(os.stat(tmp).st_mode)
    out = write(tmp)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise
  return out
