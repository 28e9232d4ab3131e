"""`jaxbnb bench decode --mesh`: a random model built on the devices.

The same code path as `--shape llama-3.1-405b --mesh tensor=2 --quant nf4`
on two GPUs, at the tiny shape on the 8 virtual CPU devices.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxbnb import convert
from jaxbnb._src.tools import bench_decode
from jaxbnb._src.tools import cli

TINY = bench_decode.SHAPES["tiny"]


def test_random_model_is_made_shard_by_shard():
  mesh = convert.parse_mesh("tensor=2", jax.devices()[:2])
  before = {id(a) for a in jax.live_arrays()}
  model = bench_decode.random_model(TINY, "jax-nf4-dq", mesh=mesh)
  up = model.model.layers[0].mlp.up_proj.weight.get_value()
  # Packed bytes and absmax codes split by output rows, as
  # from_pretrained(..., mesh=) splits them; each device holds half.
  for leaf in (up.data, up.quant_state.absmax):
    assert leaf.sharding.spec[0] == "tensor"
    assert [s.data.shape[0] for s in leaf.addressable_shards] == [
        leaf.shape[0] // 2] * 2
  assert up.quant_state.nested_absmax.sharding.is_fully_replicated
  embed = model.model.embed_tokens.weight[...]
  assert embed.dtype == np.dtype("bfloat16")
  assert embed.sharding.spec[0] == "tensor"
  # The build left no float array of a quantized weight's shape behind
  # (none is ever made: every leaf is created in its stored form).
  linear_shapes = {tuple(m.weight.get_value().shape)
                   for _, m in model.named_linears()
                   if not isinstance(m.weight, nnx.Param)}
  floats = [a for a in jax.live_arrays()
            if id(a) not in before and a.ndim == 2
            and tuple(a.shape) in linear_shapes
            and np.issubdtype(a.dtype, np.floating)]
  assert not floats, [a.shape for a in floats]


def test_bench_decode_on_a_mesh(tmp_path, capsys):
  out = tmp_path / "tp.json"
  assert cli.main(["bench", "decode", "--shape", "tiny", "--quant", "nf4",
                   "--mesh", "data=4,tensor=2", "--batch", "4", "--steps",
                   "2", "--prompt-len", "8", "--reps", "1", "--json",
                   str(out)]) == 0
  assert "| jax-nf4 | 4 |" in capsys.readouterr().out
  doc = json.loads(out.read_text())
  assert doc["impl"] == "jax-nf4" and doc["devices"] == 8
  assert doc["mesh"] == {"data": 4, "tensor": 2}
  # The command line's compilation cache (here the tests' own folder).
  assert doc["compilation_cache"] == jax.config.jax_compilation_cache_dir
  (row,) = doc["rows"]
  assert row["batch"] == 4 and row["tokens_per_s"] > 0
  # The floor counts one device's bytes: the step's over the tensor size.
  whole = bench_decode.decode_bytes(TINY, 4, 8 + 2 / 2, "nf4")
  assert row["floor_bytes"] == pytest.approx(whole / 2)


@pytest.mark.parametrize("argv,needle", [
    (["--impl", "torch-bf16", "--mesh", "tensor=8"], "--mesh: only jaxbnb"),
    (["--quant", "nf4", "--impl", "jax-bf16"], "--quant nf4 is --impl"),
    ([], "one of --impl or --quant"),
    (["--quant", "nf4", "--mesh", "tensor=3"], "--mesh: the axis sizes"),
])
def test_bench_decode_bad_options(argv, needle, capsys):
  assert cli.main(["bench", "decode", "--shape", "tiny", *argv]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxbnb bench: error: ") and needle in err, err
