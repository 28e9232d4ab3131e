"""CPU smoke test of `jaxbnb bench` (matmul, quant, report)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import pathlib
import re
import shlex
import types

import jax
import numpy as np
import pytest

from jaxbnb._src.tools import bench_matmul
from jaxbnb._src.tools import cli
from jaxbnb._src.tools import measure


def _positive_numbers(row, key):
  values = [v for v in row[key].values() if v is not None]
  assert values, (key, row)
  assert all(math.isfinite(v) and v > 0 for v in values), (key, row)


def test_bench_matmul_quant_report(tmp_path, capsys):
  mm, q = tmp_path / "mm.json", tmp_path / "q.json"
  assert cli.main(["bench", "matmul", "--quick", "--shapes", "128x256",
                   "--m", "1,4", "--out", str(mm)]) == 0
  assert cli.main(["bench", "quant", "--quick", "--sizes", "4096",
                   "--out", str(q)]) == 0
  out = capsys.readouterr().out
  assert "128x256" in out and "dequantize" in out

  doc = json.loads(mm.read_text())
  meta = doc["meta"]
  for key in ("device_kind", "date_utc", "jax_version", "jaxlib_version",
              "torch_version", "bitsandbytes_version", "copy_bandwidth_gbs",
              "bf16_peak_tflops", "args"):
    assert key in meta, key
  assert meta["benchmark"] == "matmul" and meta["copy_bandwidth_gbs"] > 0
  assert meta["args"]["shapes"] == [[128, 256]]
  assert [(r["shape"], r["m"]) for r in doc["results"]] == [
      ("128x256", 1), ("128x256", 4)]
  for r in doc["results"]:
    assert set(r["us"]) == set(bench_matmul.MATMUL_COLUMNS)
    for col in ("jaxbnb", "jaxbnb-ref", "xla-bf16"):
      assert r["us"][col] > 0 and math.isfinite(r["us"][col]), (col, r)
      assert r["timing"][col]["n_rot"] >= 2
    assert not r["errors"]
    for key in ("floor_us", "floor_mem_us", "floor_compute_us",
                "speedup_vs_bf16", "pct_of_floor"):
      assert r[key] > 0 and math.isfinite(r[key]), key
    assert r["bytes_4bit"] == bench_matmul.matmul_bytes(r["m"], 128, 256)

  doc = json.loads(q.read_text())
  assert doc["meta"]["benchmark"] == "quant"
  assert {(r["op"], r["double_quant"]) for r in doc["results"]} == {
      ("quantize", False), ("quantize", True), ("dequantize", False),
      ("dequantize", True)}
  for r in doc["results"]:
    assert r["numel"] == 4096 and not r["errors"]
    for key in ("us", "gbs", "pct_copy_bw"):
      _positive_numbers(r, key)
    assert r["floor_us"] > 0

  md, png = tmp_path / "tables.md", tmp_path / "plot.png"
  assert cli.main(["bench", "report", "--inputs", str(mm), str(q),
                   "--md", str(md), "--plot", str(png)]) == 0
  text = md.read_text()
  assert "| shape NxK | M |" in text and "| op | elements |" in text
  assert "copy bandwidth" in text and "128x256" in text
  assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, needle", [
    (["matmul", "--shapes", "12x"], "'12x'"),
    (["matmul", "--m", "1,0"], "'1,0'"),
    (["quant", "--sizes", "2^x"], "'2^x'"),
    (["matmul", "--reps", "0"], "'0'"),
])
def test_bench_bad_args(argv, needle, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert argv[1] in err and needle in err and "expected" in err


def test_parse_helpers():
  assert bench_matmul.parse_shapes("4096x14336") == [(4096, 14336)]
  assert bench_matmul.parse_ints("2^10,3") == [1024, 3]
  for text in ("12x", "x4", "1x2x3", "0x4", ""):
    with pytest.raises(ValueError, match="NxK"):
      bench_matmul.parse_shapes(text)
  # Double quant: a uint8 code per 64 values, fp32 per 256 blocks, a table.
  n = 14336 * 4096
  assert bench_matmul.quant_bytes(n) == (
      n // 2 + n // 64 + n // 64 // 256 * 4 + 1024)
  assert bench_matmul.quant_bytes(n, 64, False) == n // 2 + n // 64 * 4
  assert bench_matmul.n_rotations(1) == 64
  assert bench_matmul.n_rotations(10**12) == 2


def test_bench_qlora_tiny(tmp_path, capsys):
  out = tmp_path / "qlora.json"
  assert cli.main(["bench", "qlora", "--impl", "jax-nf4-dq", "--shape",
                   "tiny", "--layers", "1", "--batch", "1", "--seq", "16",
                   "--warmup", "1", "--steps", "2", "--lora-r", "4",
                   "--json", str(out)]) == 0
  if jax.devices()[0].memory_stats() is None:  # e.g. on a CPU
    err = capsys.readouterr().err
    assert "memory in use unknown" in err and "0.00 GiB" not in err
  doc = json.loads(out.read_text())
  assert doc["kind"] == "qlora" and doc["shape"]["num_hidden_layers"] == 1
  assert len(doc["steps_s"]) == 2 and len(doc["losses"]) == 3
  assert all(math.isfinite(x) for x in doc["losses"])
  assert doc["tokens_per_s"] == pytest.approx(16 / doc["step_s"])
  # r 4 on the 7 projections of the tiny layer (h 128, kv 64, i 256):
  # q and o 128 + 128, k and v 64 + 128, gate, up and down 256 + 128.
  assert doc["adapter_parameters"] == 4 * (2 * (128 + 128) + 2 * (64 + 128)
                                           + 3 * (256 + 128))
  assert doc["estimate_bytes"] == sum(doc["estimate"].values())
  # The adapters train: the loss of a repeated batch goes down.
  assert doc["losses"][-1] < doc["losses"][0]
  assert cli.main(["bench", "qlora-report", "--inputs", str(out)]) == 0
  assert "| jax-nf4-dq | 1x16 |" in capsys.readouterr().out


def test_bench_qlora_estimate_takes_the_runs_optimizer_and_step(tmp_path):
  """`--optimizer adamw` (float32 states, where r 32 makes adapter
  matrices of 4096+ elements that an 8-bit AdamW would keep in 8 bits) and
  `--step jit` (the head's logits of all tokens at once, `train_step`) are
  in the estimate."""
  from jaxbnb import models
  out = tmp_path / "qlora.json"
  assert cli.main(["bench", "qlora", "--impl", "jax-nf4-dq", "--shape",
                   "tiny", "--layers", "1", "--batch", "1", "--seq", "1040",
                   "--warmup", "0", "--steps", "1", "--lora-r", "32",
                   "--optimizer", "adamw", "--step", "jit",
                   "--json", str(out)]) == 0
  doc = json.loads(out.read_text())
  want = models.estimate_training_memory(
      models.LlamaConfig(**doc["shape"]), weights="nf4+dq", batch=1,
      seq=1040, lora_r=32, optimizer="adamw", head_chunk=None)
  assert doc["estimate"] == want.breakdown()
  assert doc["estimate"]["optimizer"] == 8 * doc["adapter_parameters"]
  assert doc["estimate"]["logits"] == 12 * 1040 * 512  # vocabulary 512
  assert doc["estimate_bytes"] == want.total_bytes


def test_bench_qlora_on_a_mesh_equals_one_device(tmp_path, capsys):
  """`--mesh` splits the run as `finetune --mesh` does: same losses."""
  args = ["bench", "qlora", "--impl", "jax-nf4-dq", "--shape", "tiny",
          "--layers", "1", "--batch", "8", "--seq", "16", "--warmup", "0",
          "--steps", "1", "--lora-r", "4", "--optimizer", "adamw8bit"]
  one, mesh = tmp_path / "one.json", tmp_path / "mesh.json"
  assert cli.main(args + ["--json", str(one)]) == 0
  assert cli.main(args + ["--mesh", "data=4,fsdp=2", "--json",
                          str(mesh)]) == 0
  a, b = (json.loads(p.read_text()) for p in (one, mesh))
  assert b["mesh"] == {"data": 4, "fsdp": 2} and b["devices"] == 8
  np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-5)
  assert "| jax-nf4-dq (data=4,fsdp=2) | 8x16 |" in capsys.readouterr().out
  capsys.readouterr()
  assert cli.main(args[:8] + ["--batch", "4", "--mesh", "fsdp=8"]) != 0
  assert "--batch 4 must be a multiple" in capsys.readouterr().err


class _FakeCuda:
  """The parts of `torch.cuda` that `measure.time_torch` uses, on the
  host: events read a counter of finished calls as milliseconds."""

  def __init__(self):
    self.clock = 0.0
    self.graphs = 0
    outer = self

    class Stream:
      def wait_stream(self, other):
        del other

    class Event:
      def __init__(self, enable_timing=False):
        del enable_timing
        self.t = None

      def record(self):
        self.t = outer.clock

      def synchronize(self):
        pass

      def elapsed_time(self, end):
        return end.t - self.t

    class Graph:
      def __init__(self):
        outer.graphs += 1

      def replay(self):
        raise AssertionError("no graph was captured")

    self.Stream, self.Event, self.CUDAGraph = Stream, Event, Graph
    self._current = Stream()

  def current_stream(self):
    return self._current

  def synchronize(self):
    pass

  @contextlib.contextmanager
  def stream(self, s):
    del s
    yield

  @contextlib.contextmanager
  def graph(self, g):
    del g
    yield


def test_time_torch_eager_runs_the_calls_without_a_graph():
  """`eager=` (bnb's quantize, which a graph capture would miss) times
  the calls themselves, says why in the method, and captures no graph."""
  cuda = _FakeCuda()
  torch = types.SimpleNamespace(cuda=cuda)
  done = []

  def call():
    done.append(1)
    cuda.clock += 2.0   # 2 ms of "device time" a call
  samples, method, inner = measure.time_torch(
      torch, [call, call], reps=3, warmup=1, target_s=0.0,
      eager="legacy stream")
  assert method == "eager (legacy stream)"
  assert cuda.graphs == 0
  assert inner == 1 and samples == [0.002] * 3
  assert len(done) == 2 * (2 + 1 + 1 + 1 + 3)  # side, step, probe, warm, reps


def test_time_jax_takes_the_difference_of_a_long_and_a_short_call(
    monkeypatch):
  """A sample is (long call - short call) / (the ops between them): the
  call's fixed cost cancels. The loop runs the rounds asked for (a
  counter in the carry counts them), and one round is timed alone."""
  fixed, per_op = 0.18, 0.002
  trips = []
  clock = [0.0]

  real_jit, real_loop, rounds_of = measure.jax.jit, measure.timed_loop, {}

  def timed_loop(fn, rounds):
    run = real_loop(fn, rounds)
    rounds_of[run] = rounds
    return run

  def jit(fn, **kw):
    step = real_jit(fn, **kw)
    if fn not in rounds_of:  # a jit inside JAX itself: left alone
      return step
    n = rounds_of[fn]

    def timed(slots, carry):
      trips.append(n)
      clock[0] += fixed + n * len(slots) * per_op
      return step(slots, carry)
    return timed
  monkeypatch.setattr(measure, "timed_loop", timed_loop)
  monkeypatch.setattr(measure.jax, "jit", jit)
  monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
  x = np.zeros(4, np.float32)
  samples = measure.time_jax(lambda a: a + 1, ((x,), (x,)), rounds=8,
                             reps=3, warmup=1)
  assert trips == [8, 2, 8, 2] + [8, 2] * 3
  np.testing.assert_allclose(samples, [per_op] * 3, rtol=1e-9)
  trips.clear()
  samples = measure.time_jax(lambda a: a + 1, ((x,),), rounds=1, reps=2,
                             warmup=0)
  assert trips == [1, 1, 1]  # the compiling call, then the samples
  np.testing.assert_allclose(samples, [fixed + per_op] * 2, rtol=1e-9)


def test_time_jax_runs_the_rounds_it_is_given():
  """A long call runs `rounds` rounds of every slot, a short one a
  quarter (an op with a host callback counts them; CPU)."""
  runs = []

  def op(a):
    jax.debug.callback(lambda: runs.append(1))
    return a + 1
  x = np.zeros(2, np.float32)
  measure.time_jax(op, ((x,), (x,)), rounds=8, reps=2, warmup=0)
  jax.effects_barrier()
  assert len(runs) == 2 * (8 + 2 + (8 + 2) * 2)


def test_n_inner_leaves_a_short_call_on_the_gpu(monkeypatch):
  """On the GPU a timed call has at least two rounds (so `time_jax`
  subtracts a one-round call), at most `MAX_INNER`; off it, one."""
  monkeypatch.setattr(measure, "on_gpu", lambda: True)
  assert measure.n_inner(5e-3, 1e-2) == 2
  assert measure.n_inner(5e-3, 1e-3) == 5
  assert measure.n_inner(5e-3, 1e-9) == measure.MAX_INNER
  assert measure.n_inner(0.0, 1e-3) == 1
  monkeypatch.setattr(measure, "on_gpu", lambda: False)
  assert measure.n_inner(5e-3, 1e-3) == 1


# ---------------------------------------------------------------------------
# Bad arguments and outputs are refused before anything is measured.


@pytest.fixture
def no_measuring(monkeypatch):
  """Any measurement or model build fails the test: the checks come first."""
  from jaxbnb._src.tools import bench_decode
  from jaxbnb._src.tools import bench_train

  def measured(*args, **kwargs):
    raise AssertionError("measured before the arguments were checked")
  for name in ("roofs", "copy_bandwidth", "time_jax", "time_torch"):
    monkeypatch.setattr(measure, name, measured)
  monkeypatch.setattr(bench_decode, "random_model", measured)
  monkeypatch.setattr(bench_train, "_build", measured)


def _error_line(capsys) -> str:
  return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command", ["matmul", "quant"])
@pytest.mark.parametrize("blocksize", ["16", "33", "96", "8192"])
def test_bench_blocksize_is_checked_first(command, blocksize, capsys,
                                          no_measuring):
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", command, "--quick", "--blocksize", blocksize])
  assert e.value.code == 2
  line = _error_line(capsys)
  assert (f"jaxbnb bench {command}: error: argument --blocksize: expected "
          "one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got "
          f"{blocksize!r}") == line


_OUTPUTS = [
    (["matmul", "--quick"], "--out"),
    (["quant", "--quick"], "--out"),
    (["int8", "--quick"], "--out"),
    (["optim", "--quick"], "--json"),
    (["decode", "--quant", "nf4", "--shape", "tiny"], "--json"),
    (["qlora", "--impl", "jax-bf16", "--shape", "tiny"], "--json"),
]


@pytest.mark.parametrize("argv, flag", _OUTPUTS)
def test_bench_refuses_a_folder_as_output_before_measuring(
    argv, flag, tmp_path, capsys, no_measuring):
  assert cli.main(["bench", *argv, flag, str(tmp_path)]) == 2
  assert _error_line(capsys) == (
      f"jaxbnb bench: error: argument {flag}: expected a file to write, got "
      f"the folder {str(tmp_path)!r}")
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv, flag", _OUTPUTS)
def test_bench_refuses_an_output_under_a_file_before_measuring(
    argv, flag, tmp_path, capsys, no_measuring):
  (tmp_path / "file").write_text("x")
  out = tmp_path / "file" / "out.json"
  assert cli.main(["bench", *argv, flag, str(out)]) == 2
  line = _error_line(capsys)
  assert line.startswith(f"jaxbnb bench: error: argument {flag}: cannot "
                         f"write {str(out)!r}: Not a directory"), line


@pytest.mark.parametrize("flag", [["--sweep"],
                                  ["--configs", "64,256,1,4,3,skip"]])
def test_bench_int8_sweep_is_refused_where_the_kernels_do_not_run(
    flag, tmp_path, capsys, no_measuring):
  import jaxbnb
  with jaxbnb.kernel_mode("reference"):
    assert cli.main(["bench", "int8", "--quick", *flag, "--out",
                     str(tmp_path / "i8.json")]) == 2
  line = _error_line(capsys)
  assert line.startswith(f"jaxbnb bench: error: argument {flag[0]}: times "
                         "the Pallas kernels, which do not run here (kernel "
                         "mode 'reference' resolves to 'reference'"), line
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("impl, needs", [
    ("torch-bf16", "torch and transformers"),
    ("torch-bnb-nf4-dq", "torch, transformers and bitsandbytes")])
def test_bench_decode_torch_impl_says_what_it_needs(impl, needs, monkeypatch,
                                                   capsys, no_measuring):
  import sys
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails
  assert cli.main(["bench", "decode", "--impl", impl, "--shape", "tiny"]) == 2
  line = _error_line(capsys)
  assert line.startswith(f"jaxbnb bench: error: --impl {impl} needs {needs} "
                         "installed"), line


def test_bench_optim_refuses_to_skip_every_column(capsys, no_measuring):
  jax_columns = "optax-adamw,adamw8bit,adamw8bit-fused,paged_adamw8bit"
  assert cli.main(["bench", "optim", "--quick", "--no-bnb", "--skip",
                   jax_columns]) == 2
  line = _error_line(capsys)
  assert line.startswith("jaxbnb bench: error: argument --skip: expected a "
                         "column of optax-adamw,"), line
  assert line.endswith(f"got {jax_columns!r}")


def test_bench_optim_floor_of_float32_state_leaves(tmp_path):
  """A leaf under 4096 elements keeps float32 states in the 8-bit
  optimizers: it moves fp32 AdamW's 28 bytes per parameter, not 16."""
  from jaxbnb._src.tools import bench_optim
  out = tmp_path / "optim.json"
  assert cli.main(["bench", "optim", "--quick", "--sizes", "100,4196",
                   "--skip", "adamw8bit-fused,paged_adamw8bit", "--json",
                   str(out)]) == 0
  small, mixed = json.loads(out.read_text())["results"]
  assert small["columns"]["adamw8bit"]["bytes_per_param"] == 28
  assert small["columns"]["optax-adamw"]["bytes_per_param"] == 28
  # 4196 = a [1, 4096] leaf (8-bit states) and a [100] one (float32).
  assert mixed["columns"]["adamw8bit"]["bytes_per_param"] == pytest.approx(
      (16 * 4096 + 28 * 100) / 4196)
  assert bench_optim.bytes_per_param("adamw8bit", 4095) == 28
  assert bench_optim.bytes_per_param("adamw8bit", 4096) == 16


# ---------------------------------------------------------------------------
# The report commands: inputs of the right benchmark, outputs checked first.


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """One small `bench matmul` and one `bench decode` result file."""
  folder = tmp_path_factory.mktemp("results")
  mm, dec = folder / "matmul.json", folder / "decode.json"
  assert cli.main(["bench", "matmul", "--quick", "--shapes", "128x256",
                   "--m", "1", "--no-ref", "--out", str(mm)]) == 0
  assert cli.main(["bench", "decode", "--quant", "nf4", "--shape", "tiny",
                   "--layers", "1", "--batch", "1", "--steps", "2", "--reps",
                   "1", "--prompt-len", "4", "--json", str(dec)]) == 0
  return {"report": mm, "decode-report": dec}


def _report_argv(command, inputs, folder):
  argv = ["bench", command, "--inputs", *map(str, inputs)]
  return argv + (["--md", str(folder / "r.md")] if command == "report"
                 else [])


@pytest.mark.parametrize("command, other, held, wanted", [
    ("report", "decode-report", "the results of `bench decode`",
     "`bench matmul` or `bench quant`"),
    ("decode-report", "report", "the results of `bench matmul`",
     "`bench decode`"),
    ("qlora-report", "decode-report", "the results of `bench decode`",
     "`bench qlora`"),
])
def test_reports_name_the_file_of_another_benchmark(
    command, other, held, wanted, results, tmp_path, capsys):
  path = results[other]
  assert cli.main(_report_argv(command, [path], tmp_path)) == 2
  assert _error_line(capsys) == (
      f"jaxbnb bench: error: argument --inputs: {str(path)!r} holds {held}; "
      f"expected the results of {wanted}")
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["report", "decode-report",
                                     "qlora-report"])
@pytest.mark.parametrize("text, held", [
    ('{"results": []}', "holds no jaxbnb benchmark results"),
    ("[1, 2]", "holds no jaxbnb benchmark results"),
    ("{nope", "is not JSON ("),
])
def test_reports_name_a_file_that_is_no_result(command, text, held, tmp_path,
                                               capsys):
  path = tmp_path / "x.json"
  path.write_text(text)
  assert cli.main(_report_argv(command, [path], tmp_path)) == 2
  line = _error_line(capsys)
  assert line.startswith(f"jaxbnb bench: error: argument --inputs: "
                         f"{str(path)!r} {held}"), line
  assert "expected the results of `bench " in line
  assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


@pytest.mark.parametrize("command", ["report", "decode-report"])
@pytest.mark.parametrize("plot", ["plot", "plot.xyz", "plot.png/"])
def test_report_plot_needs_an_image_extension_before_writing(
    command, plot, results, tmp_path, capsys):
  path = f"{tmp_path}/{plot}"  # (pathlib would drop the trailing "/")
  argv = _report_argv(command, [results[command]], tmp_path)
  assert cli.main(argv + ["--plot", path]) == 2
  line = _error_line(capsys)
  assert line.startswith("jaxbnb bench: error: argument --plot: expected an "
                         "image file name ending in one of "), line
  assert ".png" in line and ".svg" in line and line.endswith(f"got {path!r}")
  assert not list(tmp_path.iterdir())  # no markdown, no image


@pytest.mark.parametrize("command", ["report", "decode-report"])
def test_report_says_where_the_plot_is(command, results, tmp_path, capsys):
  plot = tmp_path / "new" / "plot.svg"
  argv = _report_argv(command, [results[command]], tmp_path)
  assert cli.main(argv + ["--plot", str(plot)]) == 0
  assert f"wrote {plot}" in capsys.readouterr().err.splitlines()
  assert plot.read_text().lstrip().startswith("<?xml")
  assert [p.name for p in plot.parent.iterdir()] == ["plot.svg"]  # no temp


def test_report_refuses_a_folder_as_markdown(results, tmp_path, capsys):
  assert cli.main(["bench", "report", "--inputs", str(results["report"]),
                   "--md", str(tmp_path)]) == 2
  assert _error_line(capsys) == (
      f"jaxbnb bench: error: argument --md: expected a file to write, got "
      f"the folder {str(tmp_path)!r}")


# ---------------------------------------------------------------------------
# The `jaxbnb bench` commands the documentation gives run as written.

_ROOT = pathlib.Path(__file__).resolve().parents[2]
_PAGES = ["README.md"] + sorted(
    p.relative_to(_ROOT).as_posix() for p in (_ROOT / "docs").glob("*.md"))


def _doc_commands():
  """(page:line, command) of each `jaxbnb bench` command with options in
  the pages: inline code (which may wrap) and shell lines (with `\\`
  continuations)."""
  for page in _PAGES:
    text = (_ROOT / page).read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"`(jaxbnb bench [^`]*)`", text):
      found.append((text.count("\n", 0, m.start()) + 1, m[1]))
    lines = text.splitlines()
    for i, line in enumerate(lines):
      cmd = line.strip().removeprefix("$ ")
      if not cmd.startswith("jaxbnb bench "):
        continue
      j = i
      while cmd.endswith("\\") and j + 1 < len(lines):
        j += 1
        cmd = cmd[:-1] + " " + lines[j].strip()
      found.append((i + 1, cmd))
    for line, cmd in found:
      cmd = " ".join(cmd.split())
      # A command (not a name such as `jaxbnb bench decode`, nor a list
      # of them such as `jaxbnb bench matmul|quant`).
      if " --" in cmd and "|" not in cmd:
        yield f"{page}:{line}", cmd


@pytest.mark.parametrize("where, command", list(_doc_commands()))
def test_documented_bench_commands_parse(where, command):
  from jaxbnb._src.tools import bench_decode
  argv = shlex.split(command, comments=True)[1:]
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      args = cli.build_parser().parse_args(argv)
    if args.bench_command == "decode":
      bench_decode._check_impl(args)  # one of --impl or --quant
  except (SystemExit, ValueError) as e:
    pytest.fail(f"{where}: {command!r}: {err.getvalue().strip() or e}")
