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

__all__ = ["environment", "fmt", "format_table", "log", "markdown_table",
           "read_json", "write_json"]


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


def read_json(paths: Iterable[str | os.PathLike]) -> list[Any]:
  """Reads JSON result documents, one per path, in order."""
  docs = []
  for path in paths:
    with open(path) as f:
      docs.append(json.load(f))
  return docs
