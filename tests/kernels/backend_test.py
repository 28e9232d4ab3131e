"""`pallas_kernels._backend`'s helpers for the Mosaic GPU kernels."""

from __future__ import annotations

import dataclasses

from pallas_kernels import _backend


def test_ref_type_declares_read_only_refs():
  """`ref_type(write=False)` for a kernel input handed to inline PTX: JAX
  0.12.1's `RefType` records a written ref as an effect, which
  `plgpu.kernel` refuses on an input; earlier JAX has no such field and
  gets the plain `RefType` (the lowering tests lower every kernel)."""
  fields = {f.name for f in dataclasses.fields(_backend.plgpu.RefType)}
  read_only, written = _backend.ref_type(write=False), _backend.ref_type()
  assert read_only.transforms == written.transforms == ()
  if "write" in fields:
    assert read_only.read and not read_only.write
    assert written.read and written.write
  else:
    assert read_only == written
  assert _backend.ref_type(("t",), write=False).transforms == ("t",)
