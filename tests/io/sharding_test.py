"""from_pretrained(..., mesh=mesh): parameters sharded by ShardingRules.

The checks need 8 devices, and the pytest process may already have started
JAX with one, so they run in one subprocess on 8 virtual CPU devices
(`--xla_force_host_platform_device_count=8`) that prints JSON results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxbnb import convert
from jaxbnb._src.io import sharding as sharding_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P
sys.path.insert(0, "tests/io")
import common
from jaxbnb import convert, models
from jaxbnb._src.io import sharding as sl
from jaxbnb._src.quant import weights
from jaxbnb._src.io import checkpoint_source as cs

WHOLE = []  # tensors read whole from a safetensors file
_load = cs.SafetensorsSource.load
def _recording_load(self, name):
    WHOLE.append(name)
    return _load(self, name)
cs.SafetensorsSource.load = _recording_load

devs = np.array(jax.devices())
assert len(devs) == 8, devs
MESHES = {
    "fsdp2_tensor4": Mesh(devs.reshape(2, 4), ("fsdp", "tensor")),
    "tensor8": Mesh(devs, ("tensor",)),
    "data2_tensor4": Mesh(devs.reshape(2, 4), ("data", "tensor")),
}
CASES = {  # variant, from_pretrained kwargs
    "float32": ("orig", dict(param_dtype="float32")),
    "nf4": ("orig", dict(param_dtype="float32", quantization=
            models.QuantizationConfig.nf4(double_quant=False,
                                          compute_dtype="float32"))),
    "nf4_dq": ("orig", dict(param_dtype="float32", quantization=
               models.QuantizationConfig.nf4(compute_dtype="float32"))),
    "prequantized_nf4_dq": ("nf4_dq_bf16", {}),
}
ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)))
rules = sl.ShardingRules()
out = {}

def expected_shard(shape, spec, mesh):
    return [d // int(np.prod([mesh.shape[a] for a in
                              ((e,) if isinstance(e, str) else (e or ()))]))
            for d, e in zip(shape, tuple(spec) + (None,) * len(shape))]

for cname, (variant, kw) in CASES.items():
    ref = common.load(variant, **kw)
    ref_vars = dict(ref.iter_variables())
    ref_logits = common.logits(ref, ids)
    for mname, mesh in MESHES.items():
        WHOLE.clear()
        model = convert.from_pretrained(common.golden(variant), progress=False,
                                        mesh=mesh, **kw)
        # Row tensors of a quantized linear read whole (the big ones).
        whole_rows = sorted({n for n in WHOLE if n.endswith(
            ("proj.weight", "proj.weight.absmax", "proj.SCB"))})
        bad = []
        n_sharded = 0
        for name, var in model.iter_variables():
            value = var.get_value()
            if isinstance(value, weights.QuantizedArray):
                specs = jax.tree.leaves(
                    sl.quantized_specs(rules, name, value, mesh),
                    is_leaf=lambda x: isinstance(x, P))
            else:
                specs = [rules.spec(name, value.shape, mesh)]
            leaves = jax.tree.leaves(value)
            want_leaves = jax.tree.leaves(ref_vars[name].get_value())
            assert len(specs) == len(leaves) == len(want_leaves), name
            for leaf, spec, want in zip(leaves, specs, want_leaves):
                want = np.asarray(want)
                if leaf.sharding.spec != spec:
                    bad.append(f"{name}: spec {leaf.sharding.spec} != {spec}")
                n_sharded += any(e is not None for e in spec)
                exp = expected_shard(leaf.shape, spec, mesh)
                for s in leaf.addressable_shards:
                    got = np.asarray(s.data)
                    if list(got.shape) != exp:
                        bad.append(f"{name}: shard {got.shape} != {exp}")
                    if got.tobytes() != want[s.index].tobytes():
                        bad.append(f"{name}: shard {s.index} differs")
        logits = common.logits(model, ids)
        rel = float(np.max(np.abs(logits - ref_logits)) /
                    np.max(np.abs(ref_logits)))
        out[f"{cname}/{mname}"] = dict(bad=bad[:5], n_sharded=n_sharded,
                                       rel=rel, whole_rows=whole_rows[:5])

# More stored formats, on one mesh: 4-bit packed into bfloat16 storage (two
# bytes an element), and a transformers int8 checkpoint saved here.
import tempfile
int8_dir = tempfile.mkdtemp()
int8_kw = dict(param_dtype="float32", quantization=models.QuantizationConfig(
    load_in_8bit=True, llm_int8_threshold=6.0))
convert.save_pretrained(common.load("orig", **int8_kw), int8_dir)
for cname, folder, kw in (
        ("prequantized_nf4_bf16storage", common.golden("nf4_bf16storage_tied"),
         {}),
        ("prequantized_int8", int8_dir, dict(param_dtype="float32"))):
    mesh = MESHES["tensor8"]
    ref = convert.from_pretrained(folder, progress=False, **kw)
    ref_vars = dict(ref.iter_variables())
    WHOLE.clear()
    model = convert.from_pretrained(folder, progress=False, mesh=mesh, **kw)
    whole_rows = sorted({n for n in WHOLE if n.endswith(
        ("proj.weight", "proj.weight.absmax", "proj.SCB"))})
    bad = []
    for name, var in model.iter_variables():
        for leaf, want in zip(jax.tree.leaves(var.get_value()),
                              jax.tree.leaves(ref_vars[name].get_value())):
            want = np.asarray(want)
            for sh in leaf.addressable_shards:
                if np.asarray(sh.data).tobytes() != want[sh.index].tobytes():
                    bad.append(f"{name}: shard {sh.index} differs")
    out[cname] = dict(bad=bad[:5], whole_rows=whole_rows[:5])

def error(**kw):
    try:
        convert.from_pretrained(common.golden("orig"), progress=False, **kw)
    except ValueError as e:
        return str(e)
    return None

out["err_divide"] = error(mesh=Mesh(devs[:3], ("tensor",)))
out["err_unknown_axis"] = error(mesh=MESHES["tensor8"],
                                sharding=sl.ShardingRules(tensor="model"))
out["err_override_axis"] = error(
    mesh=MESHES["tensor8"], sharding={"overrides": {"lm_head": ("model",)}})
out["err_block"] = error(mesh=MESHES["tensor8"], quantization=
                         models.QuantizationConfig(
                             load_in_4bit=True, bnb_4bit_blocksize=2048))
# A nested_absmax one entry too long, loaded row shard by row shard: every
# shard sees the whole tensor's (so from_dict can only ask for "at least"),
# and the shard path checks it against the whole tensor's block count.
import tempfile
with tempfile.TemporaryDirectory() as tmp:
    tensors = common.read_all(common.golden("nf4_dq_bf16"))
    key = "model.layers.0.self_attn.q_proj.weight.nested_absmax"
    tensors[key] = np.concatenate([tensors[key], np.ones(1, np.float32)])
    bad = common.copy_checkpoint("nf4_dq_bf16", tmp + "/long",
                                 tensors=tensors)
    try:
        convert.from_pretrained(bad, progress=False,
                                mesh=MESHES["tensor8"])
        out["err_nested_long"] = None
    except ValueError as e:
        out["err_nested_long"] = str(e)
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True,
                        text=True, cwd=_ROOT, env=env, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("mesh", ["fsdp2_tensor4", "tensor8",
                                  "data2_tensor4"])
@pytest.mark.parametrize("case", ["float32", "nf4", "nf4_dq",
                                  "prequantized_nf4_dq"])
def test_sharded_load_matches_single_device(results, case, mesh):
  r = results[f"{case}/{mesh}"]
  # Every leaf's sharding is the rule's spec, every device's shard has the
  # expected shape and holds exactly the bytes of that slice of the
  # single-device model (so per-row-shard 4-bit quantization gives the
  # whole tensor's bytes).
  assert r["bad"] == [], r["bad"]
  assert r["n_sharded"] > 0
  # The weights are bit-identical; only GSPMD's order of summation differs
  # (partial sums over shards plus all-reduces), a few float32 ulps per
  # reduction: 1e-5 of the largest logit leaves ample room. (A bfloat16
  # checkpoint computes in bfloat16, whose ulp is 2**-8: 1e-2.)
  tol = 1e-2 if case == "prequantized_nf4_dq" else 1e-5
  assert r["rel"] <= tol, r["rel"]
  # Each device's rows are read as slices: no process reads a projection
  # (float rows, packed bytes, absmax codes) whole; with double
  # quantization only the float32 absmax of every shard is joined.
  assert r["whole_rows"] == [], r["whole_rows"]


@pytest.mark.parametrize("case", ["prequantized_nf4_bf16storage",
                                  "prequantized_int8"])
def test_prequantized_rows_are_read_as_slices(results, case):
  """bitsandbytes 4-bit (bfloat16 storage) and transformers int8 folders:
  every shard holds the single-device bytes, and no process reads a
  projection's row tensors whole."""
  r = results[case]
  assert r["bad"] == [], r["bad"]
  assert r["whole_rows"] == [], r["whole_rows"]


def test_axis_that_does_not_divide_names_axis_parameter_dimension(results):
  msg = results["err_divide"]
  assert msg is not None
  assert "'tensor'" in msg and "size 3" in msg, msg
  assert "lm_head.weight" in msg and "dimension 0 (size 128)" in msg, msg


def test_unknown_axis_names_are_errors(results):
  assert "'model'" in (results["err_unknown_axis"] or ""), results
  assert "'model'" in (results["err_override_axis"] or ""), results
  assert "lm_head" in results["err_override_axis"]


def test_row_shard_cutting_a_4bit_block_is_an_error(results):
  msg = results["err_block"] or ""
  assert "k_proj" in msg and "blocksize 2048" in msg, msg
  assert "'tensor'" in msg, msg


def test_too_long_nested_absmax_of_a_sharded_weight_is_an_error(results):
  msg = results["err_nested_long"] or ""
  assert "layers.0.self_attn.q_proj.weight.nested_absmax" in msg, msg
  assert "expected" in msg and "entries" in msg, msg


def _mesh1(names):
  return Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(names)), names)


def test_default_rules():
  mesh = _mesh1(("data", "fsdp", "tensor"))
  rules = convert.ShardingRules()
  layer = "model.layers.0."
  assert rules.spec(layer + "self_attn.q_proj.weight", (128, 64),
                    mesh) == P("tensor", "fsdp")
  assert rules.spec(layer + "mlp.up_proj.weight", (256, 128),
                    mesh) == P("tensor", "fsdp")
  assert rules.spec(layer + "self_attn.o_proj.weight", (128, 128),
                    mesh) == P("fsdp", "tensor")
  assert rules.spec(layer + "mlp.down_proj.weight", (128, 256),
                    mesh) == P("fsdp", "tensor")
  assert rules.spec("model.embed_tokens.weight", (1000, 64),
                    mesh) == P("tensor", "fsdp")
  assert rules.spec("lm_head.weight", (1000, 64), mesh) == P("tensor", "fsdp")
  assert rules.spec(layer + "input_layernorm.weight", (64,), mesh) == P()
  assert rules.spec(layer + "self_attn.q_proj.bias", (128,),
                    mesh) == P("tensor")
  # FSDP alone: the largest dimension.
  fsdp = _mesh1(("fsdp",))
  assert rules.spec(layer + "mlp.down_proj.weight", (128, 256),
                    fsdp) == P(None, "fsdp")
  assert rules.spec(layer + "mlp.up_proj.weight", (256, 128),
                    fsdp) == P("fsdp")
  # Custom axis names and overrides.
  custom = convert.ShardingRules(tensor="model",
                                 overrides=(("lm_head", P(None, "model")),))
  mm = _mesh1(("model",))
  assert custom.spec("lm_head.weight", (10, 64), mm) == P(None, "model")
  assert custom.spec(layer + "mlp.up_proj.weight", (256, 128),
                     mm) == P("model")


def test_4bit_rows_split_over_fsdp_and_tensor():
  from jaxbnb._src.quant import weights  # pylint: disable=g-import-not-at-top
  mesh = _mesh1(("fsdp", "tensor"))
  w = weights.Params4bit.from_float(np.ones((64, 128), np.float32),
                                    compress_statistics=True)
  specs = sharding_lib.quantized_specs(
      sharding_lib.ShardingRules(), "model.layers.0.mlp.down_proj.weight", w,
      mesh)
  assert specs.data == P(("fsdp", "tensor"), None)
  assert specs.quant_state.absmax == P(("fsdp", "tensor"))
  assert specs.quant_state.nested_absmax == P()
  assert specs.quant_state.offset == P()


def test_sharding_without_mesh_is_an_error():
  with pytest.raises(ValueError, match="needs a `mesh`"):
    convert.from_pretrained("unused", sharding=convert.ShardingRules())
