"""JAX's persistent compilation cache for the `jaxbnb` command line.

An 8B model's decode and prefill programs take 16-21 s to compile on an
H100 (one to two and a half minutes before each kernel was lowered
once a program, `pallas_kernels.lowering`), and each `jaxbnb generate`,
`eval` or `bench` process compiled them again. The command line turns on JAX's
persistent compilation cache (`jax_compilation_cache_dir`), so a program
compiled once is read back by the next run on the same machine, JAX and
jaxbnb version (JAX keys each entry by the program, the compile options,
the backend and its version).

`JAXBNB_COMPILATION_CACHE` picks the folder: unset, `~/.cache/jaxbnb/jax`
(`$XDG_CACHE_HOME/jaxbnb/jax` where that is set); a path, that folder;
`off` (or `0`, `false`, `no`, `none`), no cache. A cache folder set for
JAX itself (`JAX_COMPILATION_CACHE_DIR`, `jax.config`) wins over all of
these. The library alone never turns the cache on: that is the program's
choice.

Not in a run of several processes on the CPU (`--num-processes`, gloo's
collectives): there, with JAX 0.12.1, a process that reads a program back
from the cache waits forever in the program's first collective, so such a
run compiles every program itself. A folder set for JAX itself is left
as it is there, with a warning on stderr.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import sys

import jax

__all__ = ["ENV", "OFF", "default_dir", "enable"]

ENV = "JAXBNB_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no", "none")


def default_dir(environ: Mapping[str, str] | None = None) -> str:
  """`$XDG_CACHE_HOME/jaxbnb/jax`, else `~/.cache/jaxbnb/jax`.

  Examples:
    >>> from jaxbnb._src.tools import compile_cache
    >>> compile_cache.default_dir({"XDG_CACHE_HOME": "/var/cache"})
    '/var/cache/jaxbnb/jax'
  """
  environ = os.environ if environ is None else environ
  base = environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxbnb", "jax")


def _can_make(path: str) -> bool:
  """Whether this user can write `path`, or make it: the nearest folder
  that exists on the way up is writable. Nothing is made here (JAX makes
  the folder at its first compile), so a command that compiles nothing
  leaves no folder behind."""
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      return False
    probe = parent
  return os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)


def _multi_process_cpu() -> bool:
  """Whether this is one of several processes of a CPU run (see the module
  docstring: the cache would hang it)."""
  return jax.process_count() > 1 and jax.default_backend() == "cpu"


def enable(environ: Mapping[str, str] | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache, unless it is on already
  or `JAXBNB_COMPILATION_CACHE` says off.

  Examples:
    >>> import jax
    >>> from jaxbnb._src.tools import compile_cache
    >>> d = compile_cache.enable({"JAXBNB_COMPILATION_CACHE": "off"})
    >>> d is None or d == jax.config.jax_compilation_cache_dir  # JAX's own
    True

  Args:
    environ: the environment (default: `os.environ`).

  Returns:
    The cache folder in use, or None where there is none (also in a run of
    several processes on the CPU, which the cache would hang).

  Raises:
    ValueError: if `JAXBNB_COMPILATION_CACHE` names a file, or a folder
      this user cannot make or write. (The default folder, unwritable,
      leaves the cache off with a warning on stderr.)
  """
  environ = os.environ if environ is None else environ
  current = jax.config.jax_compilation_cache_dir
  if current:
    if _multi_process_cpu():
      print(f"warning: JAX's compilation cache is on ({current}) in a run "
            "of several processes on the CPU, where a process that reads a "
            "program back from it can wait forever (JAX 0.12.1); unset "
            "JAX_COMPILATION_CACHE_DIR (or jax_compilation_cache_dir) for "
            "such runs", file=sys.stderr)
    return current
  value = environ.get(ENV, "").strip()
  if value.lower() in OFF:
    return None
  if _multi_process_cpu():
    return None
  path = os.path.abspath(os.path.expanduser(value or default_dir(environ)))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(
        f"environment variable {ENV}: expected a folder for JAX's "
        f"compilation cache (or 'off'), got {value!r}, a file")
  if not _can_make(path):
    if value:
      raise ValueError(
          f"environment variable {ENV}: expected a folder this user can "
          f"write (or 'off'), got {value!r}")
    # The default folder only: run without the cache rather than fail.
    print(f"warning: cannot write {path}; compiling without JAX's "
          f"persistent cache (set {ENV} to a writable folder, or 'off')",
          file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path
