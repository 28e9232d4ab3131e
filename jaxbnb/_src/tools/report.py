"""Reporting helpers of the `jaxbnb bench` commands.

Progress lines on stderr, number formatting, text and markdown tables, the
environment block every result document carries, and JSON files written
atomically.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import datetime
import json
import math
import os
import platform
import sys
from typing import Any

import jax
import jaxlib

import jaxbnb
from jaxbnb._src.io import paths as io_paths

__all__ = ["check_output", "check_plot", "environment", "fmt",
           "format_table", "log", "markdown_table", "read_json",
           "read_results", "result_kind", "save_figure", "write_json",
           "write_text"]


def log(msg: str) -> None:
  """Prints a progress line on stderr (stdout carries the results)."""
  print(msg, file=sys.stderr, flush=True)


def fmt(value: float | None, suffix: str = "") -> str:
  """Formats a measurement: 3 significant digits, thousands separated.

  Examples:
    >>> fmt(0.01234), fmt(42.42, "%"), fmt(12345.6), fmt(None)
    ('0.0123', '42.4%', '12,346', '-')
  """
  if value is None or not math.isfinite(value):
    return "-"
  if value >= 1000:
    return f"{value:,.0f}{suffix}"
  return f"{value:.3g}{suffix}" if value < 10 else f"{value:.1f}{suffix}"


def format_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]
                 ) -> str:
  """Aligned text table: the first column left-aligned, the rest right.

  Examples:
    >>> print(format_table(["a", "bb"], [["x", 1], ["yyy", 22]]))
    a    bb
    x     1
    yyy  22
  """
  cells = [[str(c) for c in r] for r in [headers, *rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  return "\n".join(
      "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths))).rstrip()
      for r in cells)


def markdown_table(headers: Sequence[Any], rows: Iterable[Sequence[Any]]
                   ) -> list[str]:
  """Lines of a markdown table: the first column left-aligned, the rest right.

  Examples:
    >>> print("\\n".join(markdown_table(["a", "b"], [["x", 1]])))
    | a | b |
    | --- | ---: |
    | x | 1 |
  """
  lines = ["| " + " | ".join(str(h) for h in headers) + " |",
           "|" + "|".join([" --- "] + [" ---: "] * (len(headers) - 1)) + "|"]
  return lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def environment() -> dict[str, Any]:
  """Where and with what a benchmark ran: date, device and versions.

  Returns:
    `date_utc` (ISO 8601, seconds), `device_kind` and `platform` of the
    first JAX device, and the `jax`, `jaxlib`, `jaxbnb` and `python`
    versions (keys ending in `_version`).
  """
  dev = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "device_kind": dev.device_kind, "platform": dev.platform,
      "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__,
      "jaxbnb_version": jaxbnb.__version__,
      "python_version": platform.python_version(),
  }


def write_json(doc: Any, path: str | os.PathLike) -> None:
  """Writes `doc` as indented JSON, atomically, creating parent folders.

  Args:
    doc: a JSON-serializable document.
    path: the file to write; a reader never sees it half-written.
  """
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(doc, f, indent=1)

  io_paths.write_file_atomic(path, write)


def write_text(text: str, path: str | os.PathLike) -> None:
  """Writes `text` to `path` (UTF-8) atomically, creating parent folders."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(tmp: str) -> None:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)

  io_paths.write_file_atomic(path, write)


def check_output(path: str | os.PathLike | None, flag: str) -> None:
  """Refuses, before any measurement, an output file that cannot be written.

  The writers (`write_json`, `write_text`, `save_figure`) create missing
  parent folders; a path that is a folder, or under a file, or in a folder
  where no file can be created (permissions, a read-only file system)
  fails here, naming `flag`.

  Args:
    path: the output file, or None (nothing to write).
    flag: the command-line flag that gave it, e.g. "--json".

  Raises:
    ValueError: naming `flag`, the path and why.
  """
  if path is None:
    return
  path = os.fspath(path)
  if (os.path.isdir(path) or not os.path.basename(path)
      or path.endswith(("/", os.sep))):
    raise ValueError(f"argument {flag}: expected a file to write, got the "
                     f"folder {path!r}")
  try:
    io_paths.check_writable(path)
  except OSError as e:
    reason = e.strerror or type(e).__name__
    raise ValueError(f"argument {flag}: cannot write {path!r}: {reason}: "
                     f"{e.filename!r}") from e


def _image_formats() -> dict[str, str]:
  try:
    from matplotlib import backend_bases  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("--plot needs matplotlib (pip install matplotlib)."
                      ) from e
  return backend_bases.FigureCanvasBase.get_supported_filetypes()


def check_plot(path: str | os.PathLike | None, flag: str = "--plot") -> None:
  """Refuses, before anything is written, a plot path matplotlib cannot
  save: no image extension (`.png`, `.svg`, `.pdf`, ...) or an unknown one,
  and what `check_output` refuses.

  Raises:
    ValueError: naming `flag`, the path and the extensions expected.
    ImportError: matplotlib is not installed.
  """
  if path is None:
    return
  path = os.fspath(path)
  formats = _image_formats()
  ext = os.path.splitext(path)[1]
  if ext.lstrip(".").lower() not in formats:
    raise ValueError(
        f"argument {flag}: expected an image file name ending in one of "
        f"{', '.join('.' + f for f in sorted(formats))} (the format), got "
        f"{path!r}")
  check_output(path, flag)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
  """Saves a matplotlib figure to `path` atomically, in the format its
  extension names (see `check_plot`), creating parent folders."""
  path = os.fspath(path)
  fmt_ = os.path.splitext(path)[1].lstrip(".").lower()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  io_paths.write_file_atomic(
      path, lambda tmp: fig.savefig(tmp, format=fmt_, **kwargs))


def read_json(paths: Iterable[str | os.PathLike]) -> list[Any]:
  """Reads JSON result documents, one per path, in order."""
  docs = []
  for path in paths:
    with open(path) as f:
      docs.append(json.load(f))
  return docs


def result_kind(doc: Any) -> str | None:
  """The `jaxbnb bench` subcommand that wrote `doc`, or None.

  Examples:
    >>> result_kind({"kind": "decode"}), result_kind({"meta": {
    ...     "benchmark": "quant"}}), result_kind([1])
    ('decode', 'quant', None)
  """
  if not isinstance(doc, dict):
    return None
  kind = doc.get("kind")
  meta = doc.get("meta")
  if kind is None and isinstance(meta, dict):
    kind = meta.get("benchmark")
  return kind if isinstance(kind, str) else None


def read_results(paths: Iterable[str | os.PathLike],
                 expected: Sequence[str], flag: str = "--inputs"
                 ) -> list[Any]:
  """Reads `jaxbnb bench` JSON documents of the `expected` kinds.

  Args:
    paths: the JSON files, read in order.
    expected: the subcommands whose results are taken, e.g. ("decode",).
    flag: the flag that named the files, for the messages.

  Returns:
    The documents.

  Raises:
    ValueError: naming `flag` and the file, for a file that is not JSON
      or holds another benchmark's results (which one, if recognizable).
    OSError: a file that cannot be read.
  """
  want = " or ".join(f"`bench {k}`" for k in expected)
  docs = []
  for path in paths:
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
      try:
        doc = json.load(f)
      except ValueError as e:
        raise ValueError(f"argument {flag}: {path!r} is not JSON ({e}); "
                         f"expected the results of {want}") from e
    kind = result_kind(doc)
    if kind not in expected:
      what = (f"the results of `bench {kind}`" if kind else
              "no jaxbnb benchmark results")
      raise ValueError(f"argument {flag}: {path!r} holds {what}; expected "
                       f"the results of {want}")
    docs.append(doc)
  return docs
