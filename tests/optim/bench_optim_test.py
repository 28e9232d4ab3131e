"""CPU smoke test of `jaxbnb bench optim`."""

from __future__ import annotations

import json
import math

from jaxbnb._src.tools import bench_optim
from jaxbnb._src.tools import cli


def test_bench_optim_quick(tmp_path, capsys):
  out = tmp_path / "optim.json"
  assert cli.main(["bench", "optim", "--quick", "--sizes", "16K",
                   "--json", str(out)]) == 0
  text = capsys.readouterr().out
  assert "| 16K |" in text and "paged_adamw8bit" in text
  doc = json.loads(out.read_text())
  assert doc["meta"]["benchmark"] == "optim"
  assert doc["meta"]["copy_bandwidth_gbs"] > 0
  [row] = doc["results"]
  assert row["numel"] == 16384 and not row["errors"], row["errors"]
  cols = row["columns"]
  assert set(cols) == {"optax-adamw", "adamw8bit", "adamw8bit-fused",
                       "paged_adamw8bit"}
  for c in cols.values():
    assert c["median_us"] > 0 and math.isfinite(c["median_us"])
    assert c["floor_us"] > 0
  # fp32 AdamW: 2 x 4 B/param; 8-bit: 2 x 1 B/param + 2 absmax per 256.
  assert cols["optax-adamw"]["state_bytes"] >= 8 * 16384
  eight = 2 * 16384 + 2 * 4 * 16384 // 256
  assert eight <= cols["adamw8bit"]["state_bytes"] <= eight + 64
  assert cols["adamw8bit"]["state_bytes_host"] == 0
  assert (cols["adamw8bit-fused"]["state_bytes"]
          == cols["adamw8bit"]["state_bytes"])
  assert "adamw8bit-fused" in text
  assert cols["paged_adamw8bit"]["state_bytes_host"] == eight
  assert cols["paged_adamw8bit"]["state_bytes"] <= 64  # only the count


def test_sizes_and_llama_tree():
  assert bench_optim.parse_sizes("16M,llama-1b") == ["16M", "llama-1b"]
  assert sum(math.prod(s) for s in bench_optim.tree_shapes(
      "64M").values()) == 64 * 2**20
  shapes = bench_optim.tree_shapes("llama-1b")
  assert shapes["embed"] == (128256, 2048)
  assert shapes["layer15.k"] == (512, 2048)
  assert shapes["layer00.down"] == (2048, 8192)
  assert len(shapes) == 2 + 16 * 9
