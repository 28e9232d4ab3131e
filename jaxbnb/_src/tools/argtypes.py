"""argparse `type=` converters shared by the `jaxbnb` subcommands.

A bad value fails while the command line is parsed, so argparse prints the
usage and one line `jaxbnb <command>: error: argument --flag: <message>` and
exits with status 2, before any model is loaded.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import math
from typing import Any

from jaxbnb._src.quant import validation

__all__ = ["blocksize_4bit", "from_parser", "int_list", "number", "one_of"]


def from_parser(parse: Callable[..., Any], *extra: Any) -> Callable[[str], Any]:
  """An argparse `type` that calls `parse(text, *extra)`.

  `parse`'s `ValueError` becomes an `argparse.ArgumentTypeError` carrying the
  same message, which argparse prints after the flag's name.

  Args:
    parse: a parser of one command-line string that raises `ValueError` with
      a message saying what was expected.
    *extra: more positional arguments for `parse`.

  Returns:
    The converter; its `__name__` is `parse`'s.

  Examples:
    >>> to_int = from_parser(int)
    >>> to_int("12")
    12
  """
  def convert(text):
    try:
      return parse(text, *extra)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  convert.__name__ = getattr(parse, "__name__", "value")
  return convert


def _bounds_text(lo, hi, lo_open, hi_open) -> str:
  if hi is None:
    return f"{'>' if lo_open else '>='} {lo}"
  if lo is None:
    return f"{'<' if hi_open else '<='} {hi}"
  return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def number(kind: type = float, lo: float | None = None,
           hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[str], Any]:
  """An argparse `type` for an `int` or finite `float` within bounds.

  Args:
    kind: `int` or `float`.
    lo: the lower bound, or None for none.
    hi: the upper bound, or None for none.
    lo_open: excludes `lo` itself.
    hi_open: excludes `hi` itself.

  Returns:
    The converter; it raises `argparse.ArgumentTypeError` with a message such
    as "expected a number in (0, 1], got '1.5'".

  Examples:
    >>> number(float, 0, 1, lo_open=True)("0.9")
    0.9
    >>> number(int, 1)("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected an integer >= 1, got '0'
  """
  what = "an integer" if kind is int else "a number"
  if lo is not None or hi is not None:
    what += " " + _bounds_text(lo, hi, lo_open, hi_open)

  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      value = None
    ok = value is not None and math.isfinite(value)
    if ok and lo is not None:
      ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
      ok = value < hi if hi_open else value <= hi
    if not ok:
      raise ValueError(f"expected {what}, got {text!r}")
    return value
  parse.__name__ = kind.__name__
  return from_parser(parse)


def int_list(lo: int = 1, example: str = "1,8") -> Callable[[str], list[int]]:
  """An argparse `type` for comma-separated integers >= `lo`.

  Args:
    lo: the smallest value allowed.
    example: a valid value, quoted in the error message.

  Returns:
    The converter.

  Examples:
    >>> int_list()("1, 8,32")
    [1, 8, 32]
  """
  def parse(text):
    values = []
    for item in text.split(","):
      try:
        value = int(item.strip())
      except ValueError:
        value = None
      if value is None or value < lo:
        raise ValueError(f"expected comma-separated integers >= {lo} such as "
                         f"{example!r}, got {text!r}")
      values.append(value)
    return values
  parse.__name__ = "int_list"
  return from_parser(parse)


def one_of(values, kind: type = int) -> Callable[[str], Any]:
  """An argparse `type` for one of `values` (e.g. the 4-bit block sizes).

  Unlike `choices=`, the message names the flag's value and every allowed
  one in one line.

  Args:
    values: the allowed values, of type `kind`.
    kind: what the text converts to.

  Returns:
    The converter.

  Examples:
    >>> one_of((32, 64, 128))("64")
    64
    >>> one_of((32, 64, 128))("48")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: expected one of 32, 64, 128, got '48'
  """
  allowed = tuple(values)

  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value not in allowed:
      raise ValueError(f"expected one of {', '.join(map(str, allowed))}, "
                       f"got {text!r}")
    return value
  parse.__name__ = kind.__name__
  return from_parser(parse)


def blocksize_4bit() -> Callable[[str], int]:
  """An argparse `type` for a 4-bit block size jaxbnb quantizes with.

  Examples:
    >>> blocksize_4bit()("128")
    128
  """
  return one_of(validation.BLOCKSIZES_4BIT)
