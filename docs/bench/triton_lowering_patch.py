"""Two attributes Pallas' Triton lowering does not set, patched in for the
eighth session's GEMV probes (private JAX functions; jax 0.11.2).

    import triton_lowering_patch as tlp   # docs/bench on sys.path
    tlp.LOOP_STAGES[0] = 3   # every scf.for lowered now: tt.num_stages = 3
    tlp.MAX_REGISTERS[0] = 48  # every Triton module lowered now: ttg.maxnreg

Lowering happens when the caller's jit compiles, so set the value before
the first call of a new jit (and `jax.clear_caches()` between settings);
0 leaves the attribute off.
"""
from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering as _lowering

LOOP_STAGES = [0]
MAX_REGISTERS = [0]


def _i32(v):
  return ir.IntegerAttr.get(ir.IntegerType.get_signless(32), v)


_for_loop = _lowering._lower_jaxpr_to_for_loop  # pylint: disable=protected-access
_module = _lowering.lower_jaxpr_to_triton_module


def _patched_for_loop(ctx, *args, **kwargs):
  results = _for_loop(ctx, *args, **kwargs)
  if LOOP_STAGES[0] and results:
    results[0].owner.attributes["tt.num_stages"] = _i32(LOOP_STAGES[0])
  return results


def _patched_module(*args, **kwargs):
  result = _module(*args, **kwargs)
  if MAX_REGISTERS[0]:
    result.module.operation.attributes["ttg.maxnreg"] = _i32(MAX_REGISTERS[0])
  return result


_lowering._lower_jaxpr_to_for_loop = _patched_for_loop  # pylint: disable=protected-access
_lowering.lower_jaxpr_to_triton_module = _patched_module
