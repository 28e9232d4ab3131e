"""The command line's small workflows: --version, quant-demo's printed
numbers, bench decode --help and a CPU bench matmul run with --no-bnb."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbnb
from jaxbnb._src.quant import codebooks
from jaxbnb._src.tools import bench_matmul
from jaxbnb._src.tools import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _run(argv):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  return subprocess.run(argv, capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=120, check=False)


@pytest.mark.parametrize("how", ["console", "module"])
def test_version(how):
  if how == "console":
    exe = os.path.join(os.path.dirname(sys.executable), "jaxbnb")
    if not os.path.exists(exe):
      pytest.fail(f"no console script {exe}: pip install -e . installs it",
                  pytrace=False)
    argv = [exe, "--version"]
  else:
    argv = [sys.executable, "-m", "jaxbnb", "--version"]
  r = _run(argv)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == f"jaxbnb {jaxbnb.__version__}", r.stdout
  assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*", jaxbnb.__version__)


ROWS, COLS, BLOCK, SEED = 256, 512, 64, 3


def test_quant_demo_numbers_are_consistent(capsys):
  assert cli.main(["quant-demo", "--rows", str(ROWS), "--cols", str(COLS),
                   "--seed", str(SEED)]) == 0
  out = capsys.readouterr().out
  rows = {}
  for line in out.splitlines():
    m = re.fullmatch(r"(bfloat16|nf4|fp4)( \+ double quant)?\s+([\d,]+)\s+"
                     r"([\d.]+)\s+([\d.e+-]+)\s+([\d.]+)\s*(\S*)", line)
    if m:
      rows[m[1] + ("+dq" if m[2] else "")] = (
          int(m[3].replace(",", "")), float(m[4]), float(m[5]), float(m[6]))
  assert sorted(rows) == ["bfloat16", "fp4", "fp4+dq", "nf4", "nf4+dq"], out

  # Bytes: the real packed size, counted here from the format, not from
  # jaxbnb's memory_footprint. Two 4-bit codes per byte; one float32 absmax
  # per block and the 16-entry float32 code table; with double quant one
  # uint8 absmax per block, a float32 absmax per 256 of them, the 256-entry
  # float32 nested table and the float32 offset.
  n = ROWS * COLS
  blocks = n // BLOCK
  single = n // 2 + 4 * blocks + 4 * 16
  double = n // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256 + 4 + 4 * 16
  base = 2 * n
  assert rows["bfloat16"][:2] == (base, 1.0)
  for fmt in ("nf4", "fp4"):
    assert rows[fmt][0] == single, (fmt, rows[fmt], single)
    assert rows[fmt + "+dq"][0] == double, (fmt, rows[fmt + "+dq"], double)
    for k in (fmt, fmt + "+dq"):
      assert abs(rows[k][1] - rows[k][0] / base) <= 5e-4, rows[k]

  # Errors: the same weight as the demo (seeded), recomputed here.
  w = (jax.random.normal(jax.random.key(SEED), (ROWS, COLS), jnp.float32)
       / jnp.sqrt(COLS)).astype(jnp.bfloat16)
  w = np.asarray(w, np.float32)
  absmax = np.abs(w.reshape(-1, BLOCK)).max(1)
  mean_w = np.abs(w).mean()
  for fmt in ("nf4", "fp4"):
    code = np.sort(np.asarray(codebooks.code_for(fmt), np.float64))
    # Round to the nearest code: each |err| <= half the widest gap times the
    # block's absmax, (+ the bf16 rounding of the dequantized value, 2**-9
    # relative); so the mean is within that times the mean absmax. Double
    # quant rounds the absmax too (8-bit, < 1% here).
    half_gap = np.diff(code).max() / 2
    bound = (half_gap + 2.0 ** -9) * absmax.mean()
    for k, slack in ((fmt, 1.0), (fmt + "+dq", 1.01)):
      _, _, err, rel = rows[k]
      assert 0 < err <= bound * slack, (k, err, bound)
      # rel err is mean|err| / mean|w| (both printed rounded to 3 digits).
      assert abs(rel - err / mean_w) <= 0.01 * rel + 1e-4, (k, rel,
                                                              err / mean_w)
  assert rows["nf4"][2] < rows["fp4"][2]  # NF4 fits normal weights better
  m = re.search(r"relative error ([\d.]+) vs the bfloat16 matmul", out)
  # The matmul error is a weighted average of the weight errors: about the
  # weight's relative error, well below the worst-case bound.
  assert m and 0 < float(m[1]) <= 2 * rows["nf4+dq"][3], out


def test_bench_decode_help(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "decode", "--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: jaxbnb bench decode")
  for flag in ("--impl", "--shape", "--batch", "--steps", "--json"):
    assert flag in out, flag
  for impl in ("jax-bf16", "jax-nf4-dq", "torch-bnb-nf4"):
    assert impl in out, impl


def test_bench_matmul_quick_no_bnb_json(tmp_path, capsys):
  path = tmp_path / "mm.json"
  assert cli.main(["bench", "matmul", "--quick", "--no-bnb", "--shapes",
                   "64x128", "--m", "2", "--out", str(path)]) == 0
  capsys.readouterr()
  doc = json.loads(path.read_text())
  assert sorted(doc) == ["meta", "results"]
  meta = doc["meta"]
  assert meta["benchmark"] == "matmul"
  assert meta["bnb_skipped"], meta  # --no-bnb (or no GPU) says why
  assert meta["args"]["no_bnb"] is True
  assert meta["args"]["shapes"] == [[64, 128]]
  [r] = doc["results"]
  assert (r["shape"], r["m"]) == ("64x128", 2)
  assert set(r["us"]) == set(bench_matmul.MATMUL_COLUMNS)
  assert r["us"]["bnb"] is None and r["us"]["torch-bf16"] is None, r["us"]
  for col in ("jaxbnb", "jaxbnb-ref", "xla-bf16"):
    assert r["us"][col] > 0 and math.isfinite(r["us"][col]), (col, r)
  assert r["bytes_4bit"] == bench_matmul.matmul_bytes(2, 64, 128)


def test_bench_matmul_takes_a_models_shapes(tmp_path, capsys):
  """`--model` times the distinct shapes of a model's linear layers (here
  SmolLM2-135M's q/o, k/v, gate/up and down), in layer order; it excludes
  `--shapes`, and an unknown name is refused naming the flag."""
  path = tmp_path / "mm.json"
  assert cli.main(["bench", "matmul", "--quick", "--no-bnb", "--no-ref",
                   "--model", "smollm2-135m", "--m", "1", "--reps", "1",
                   "--out", str(path)]) == 0
  capsys.readouterr()
  doc = json.loads(path.read_text())
  assert [r["shape"] for r in doc["results"]] == [
      "576x576", "192x576", "1536x576", "576x1536"]
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "matmul", "--model", "smollm2-135m", "--shapes",
              "64x128"])
  assert e.value.code == 2
  assert "not allowed with argument" in capsys.readouterr().err
  with pytest.raises(SystemExit, match="--model: .*no-such-model"):
    cli.main(["bench", "matmul", "--quick", "--no-bnb", "--model",
              "no-such-model"])
