"""The command line's persistent compilation cache (`compile_cache`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import jax
import pytest

from jaxbnb._src.tools import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


@contextlib.contextmanager
def _no_jax_cache_dir():
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", None)
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", old)


def test_default_folder_follows_xdg_and_home(tmp_path):
  assert compile_cache.default_dir({"XDG_CACHE_HOME": str(tmp_path)}) == (
      os.path.join(str(tmp_path), "jaxbnb", "jax"))
  assert compile_cache.default_dir({}).endswith(
      os.path.join(".cache", "jaxbnb", "jax"))


@pytest.mark.parametrize("value", ["off", "0", "False", " no ", "none"])
def test_off_leaves_the_cache_off(value):
  with _no_jax_cache_dir():
    assert compile_cache.enable({compile_cache.ENV: value}) is None
    assert not jax.config.jax_compilation_cache_dir


def test_a_path_or_the_default_turns_it_on(tmp_path):
  with _no_jax_cache_dir():
    got = compile_cache.enable({compile_cache.ENV: str(tmp_path / "c")})
    assert got == str(tmp_path / "c")
    assert jax.config.jax_compilation_cache_dir == got
    # Not made until something compiles (JAX makes it then): a command
    # that compiles nothing leaves no folder behind.
    assert not (tmp_path / "c").exists()
  with _no_jax_cache_dir():
    got = compile_cache.enable({"XDG_CACHE_HOME": str(tmp_path)})
    assert got == os.path.join(str(tmp_path), "jaxbnb", "jax")


def test_jaxs_own_setting_wins(tmp_path):
  with _no_jax_cache_dir():
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert compile_cache.enable({compile_cache.ENV: "off"}) == str(
        tmp_path / "mine")
    assert compile_cache.enable({compile_cache.ENV: str(tmp_path / "x")}) == (
        str(tmp_path / "mine"))


def test_a_file_is_an_error_naming_the_variable(tmp_path):
  f = tmp_path / "f"
  f.write_text("x")
  with _no_jax_cache_dir():
    with pytest.raises(ValueError, match=r"JAXBNB_COMPILATION_CACHE.*folder"):
      compile_cache.enable({compile_cache.ENV: str(f)})
    assert not jax.config.jax_compilation_cache_dir
    # A folder under a file can never be made.
    with pytest.raises(ValueError, match=r"JAXBNB_COMPILATION_CACHE.*write"):
      compile_cache.enable({compile_cache.ENV: str(f / "sub")})
    assert not jax.config.jax_compilation_cache_dir


def _run_cli(tmp_path, **env):
  base = {k: v for k, v in os.environ.items()
          if not k.startswith(("JAX_COMPILATION_CACHE", "JAXBNB_", "XDG_"))}
  base.update(HOME=str(tmp_path / "home"), PYTHONPATH=ROOT,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **env)
  return subprocess.run(
      [sys.executable, "-m", "jaxbnb", "quant-demo", "--rows", "64",
       "--cols", "128"], env=base, capture_output=True, text=True,
      timeout=300, check=False)


def test_cli_fills_the_default_cache_and_off_writes_nothing(tmp_path):
  """`jaxbnb quant-demo` as a user runs it: its programs land in
  `~/.cache/jaxbnb/jax`; with `JAXBNB_COMPILATION_CACHE=off` nothing is
  written there; a file in its place is a one-line error (status 2)."""
  home_cache = tmp_path / "home" / ".cache" / "jaxbnb" / "jax"
  r = _run_cli(tmp_path, JAXBNB_COMPILATION_CACHE="off")
  assert r.returncode == 0, r.stderr
  assert not home_cache.exists()
  r = _run_cli(tmp_path)
  assert r.returncode == 0, r.stderr
  assert any(home_cache.iterdir())
  (tmp_path / "file").write_text("x")
  r = _run_cli(tmp_path, JAXBNB_COMPILATION_CACHE=str(tmp_path / "file"))
  assert r.returncode == 2
  assert "JAXBNB_COMPILATION_CACHE" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["enable", "default_dir"])
def test_docstring_examples_run(name):
  from tests import helpers  # pylint: disable=g-import-not-at-top
  helpers.assert_docstring_examples_pass(getattr(compile_cache, name), name)


def test_unwritable_folders(tmp_path, capsys, monkeypatch):
  """A folder named by the variable that cannot be written is an error
  naming it; the default folder unwritable leaves the cache off, with one
  warning (not a warning at every compile)."""
  monkeypatch.setattr(compile_cache.os, "access", lambda *a: False)
  with _no_jax_cache_dir():
    with pytest.raises(ValueError, match=r"JAXBNB_COMPILATION_CACHE.*write"):
      compile_cache.enable({compile_cache.ENV: str(tmp_path / "ro")})
    assert compile_cache.enable({"XDG_CACHE_HOME": str(tmp_path)}) is None
    assert not jax.config.jax_compilation_cache_dir
  assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("backend,warned", [("cpu", True), ("gpu", False)])
def test_jax_own_cache_folder_in_several_cpu_processes_warns(
    tmp_path, monkeypatch, capsys, backend, warned):
  """A folder set for JAX itself stays (the user's choice), but one of two
  processes on the CPU says on stderr that it can hang the run, naming
  the folder and how to unset it; on a GPU nothing is said."""
  monkeypatch.setattr(compile_cache.jax, "process_count", lambda: 2)
  monkeypatch.setattr(compile_cache.jax, "default_backend", lambda: backend)
  with _no_jax_cache_dir():
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "own"))
    assert compile_cache.enable({}) == str(tmp_path / "own")
  err = capsys.readouterr().err
  assert ("JAX_COMPILATION_CACHE_DIR" in err
          and str(tmp_path / "own") in err) is warned


@pytest.mark.parametrize("backend,on", [("cpu", False), ("gpu", True)])
def test_several_cpu_processes_run_without_the_cache(tmp_path, monkeypatch,
                                                     backend, on):
  """One of two processes: on the CPU the cache stays off (JAX 0.12.1 hangs
  a process that reads a program back there); on a GPU it is on. (The real
  two-process run: tests/tools/distributed_test.py.)"""
  monkeypatch.setattr(compile_cache.jax, "process_count", lambda: 2)
  monkeypatch.setattr(compile_cache.jax, "default_backend", lambda: backend)
  with _no_jax_cache_dir():
    got = compile_cache.enable({compile_cache.ENV: str(tmp_path / "c")})
    assert (got == str(tmp_path / "c")) is on
    assert bool(jax.config.jax_compilation_cache_dir) is on
