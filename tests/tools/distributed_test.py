"""Two processes on this machine as two hosts (`jax.distributed`, gloo).

Also: two layerwise QLoRA steps on `fsdp=2` across the two processes
(`test_two_processes_train_fsdp_as_one`).

Each worker is a fresh Python with one CPU device. It runs

  jaxbnb --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I \
      generate MODEL --mesh tensor=2 ...

so the model is loaded onto a mesh spanning both processes and decoded
tensor-parallel, then loads it again through `from_pretrained(mesh=)` and
computes logits. The tokens and logits must be those of one process, and
each process must read from the safetensors file only its own rows.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from jaxbnb import convert
from jaxbnb import models
from jaxbnb import train
from jaxbnb._src.tools import cli
from tests.tools import tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
QUANT = ["--quant", "nf4", "--no-double-quant", "--compute-dtype", "float32",
         "--dtype", "float32"]
GENERATE = ["--prompt", "the", "--no-chat", "--max-new-tokens", "8",
            "--quiet", *QUANT]
IDS = [[3, 70, 200, 5, 9, 41], [7, 7, 120, 66, 1, 250]]

_WORKER = r"""
import contextlib, io, json, sys
pid, port, folder, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
generate = json.loads(sys.argv[5])
ids = json.loads(sys.argv[6])
from jaxbnb._src.io import checkpoint_source as cs
reads = []
slice_of, whole_of = cs.SafetensorsSource.load_slice, cs.SafetensorsSource.load

def load_slice(self, name, index):
  reads.append([name, list(self._info[name][1]),
                [[s.start, s.stop] for s in index]])
  return slice_of(self, name, index)

def load(self, name):
  reads.append([name, list(self._info[name][1]), "whole"])
  return whole_of(self, name)

cs.SafetensorsSource.load_slice, cs.SafetensorsSource.load = load_slice, load
from jaxbnb._src.tools import cli
text = io.StringIO()
with contextlib.redirect_stdout(text):
  rc = cli.main(["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", str(pid), "generate", folder,
                 "--mesh", "tensor=2", *generate])
cli_reads = list(reads)

import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxbnb import convert, models
mesh = convert.parse_mesh("tensor=2")

def mesh_logits(double_quant):
  model = convert.from_pretrained(
      folder, quantization=models.QuantizationConfig.nf4(
          double_quant=double_quant, compute_dtype="float32"),
      param_dtype="float32", progress=False, mesh=mesh)
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, i: nnx.merge(graphdef, s)(i)[0],
                 out_shardings=NamedSharding(mesh, P()))(state, np.array(ids))

logits = mesh_logits(False)
# Double quantization: each process quantizes its rows; the absmax of all
# rows is double-quantized once (exchanged between the processes).
reads.clear()
dq_logits = mesh_logits(True)
with open(out, "w") as f:
  json.dump({"rc": rc, "text": text.getvalue(), "reads": cli_reads,
             "dq_reads": list(reads),
             "processes": jax.process_count(),
             "devices": [len(jax.devices()), len(jax.local_devices())],
             "logits": np.asarray(logits).tolist(),
             "dq_logits": np.asarray(dq_logits).tolist()}, f)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _spawn(script: str, *argv: str, **extra_env: str) -> subprocess.Popen:
  """A fresh Python with one CPU device running `script` with `argv` (and
  `extra_env` in its environment)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=1",
             **extra_env)
  return subprocess.Popen([sys.executable, "-c", script, *argv], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _logs(procs, timeout: float = 300) -> list[str]:
  """Each process's output; every one must exit with 0."""
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  return logs


def _results(procs) -> list[dict]:
  """The `RESULT` JSON each process printed last."""
  out = []
  for log in _logs(procs):
    lines = [l for l in log.splitlines() if l.startswith("RESULT")]
    assert lines, log[-4000:]
    out.append(json.loads(lines[-1][len("RESULT"):]))
  return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  # vocab 272 splits over 2; rows of every 4-bit weight hold whole blocks.
  tmp = tmp_path_factory.mktemp("dist")
  gguf = tiny_gguf.write_tiny_gguf(
      tmp / "tiny.gguf", tiny_gguf.tiny_weights(seed=5, tied=False,
                                                vocab=272))
  out = str(tmp / "model")
  assert cli.main(["convert", gguf, out, "--quant", "none", "--dtype",
                   "float32", "--quiet"]) == 0
  return out


@pytest.fixture(scope="module")
def worker_run(folder, tmp_path_factory):
  """The two workers' results and the compilation cache folder they had."""
  tmp = tmp_path_factory.mktemp("workers")
  port = str(_free_port())
  outs = [tmp / f"worker{pid}.json" for pid in range(2)]
  # The command line's compilation cache, in a folder of the test's own.
  cache = tmp / "cache"
  _logs([_spawn(_WORKER, str(pid), port, folder, str(outs[pid]),
                json.dumps(GENERATE), json.dumps(IDS),
                JAXBNB_COMPILATION_CACHE=str(cache)) for pid in range(2)])
  return [json.loads(o.read_text()) for o in outs], cache


@pytest.fixture(scope="module")
def workers(worker_run):
  return worker_run[0]


def test_two_processes_on_the_cpu_keep_the_compilation_cache_off(
    worker_run):
  # JAX 0.12.1 hangs a process that reads a program back from the
  # persistent cache in a run of several CPU processes (the first
  # collective never returns), so such a run compiles each program
  # itself: nothing was written to the cache folder.
  assert not worker_run[1].exists()


def test_two_processes_generate_from_the_command_line(workers):
  # (That the tokens are one device's: tests/models/tensor_parallel_test.py;
  # the logits of this mesh: below.)
  for w in workers:
    assert w["rc"] == 0
    assert w["processes"] == 2 and w["devices"] == [2, 1]
  # Process 0 prints the text; the other runs the same program silently.
  assert workers[0]["text"].strip()
  assert workers[1]["text"] == ""


@pytest.mark.parametrize("double_quant,key", [(False, "logits"),
                                              (True, "dq_logits")])
def test_two_processes_compute_the_logits_of_one(folder, workers,
                                                 double_quant, key):
  # With double quantization each process quantized only its rows and the
  # two exchanged their absmax (see convert._quantize_rows_nested).
  single = convert.from_pretrained(
      folder, quantization=models.QuantizationConfig.nf4(
          double_quant=double_quant, compute_dtype="float32"),
      param_dtype="float32", progress=False)
  want = np.asarray(single(np.array(IDS))[0])
  for w in workers:
    # Bit-identical weights; only the order of a few float32 sums differs.
    np.testing.assert_allclose(np.asarray(w[key]), want, rtol=0,
                               atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("reads", ["reads", "dq_reads"])
def test_each_process_reads_only_its_rows(workers, reads):
  seen = {}
  for pid, w in enumerate(workers):
    assert w[reads], "no reads logged"
    for name, shape, index in w[reads]:
      assert index != "whole", f"process {pid} read all of {name}"
      if len(shape) < 2:
        continue  # norm weights: replicated, each process reads them
      half = shape[0] // 2
      assert index == [[pid * half, (pid + 1) * half], [None, None]], (
          pid, name, index)
      seen.setdefault(name, set()).add(pid)
  # Every matrix was split: each process read its half, the other the rest.
  assert seen and all(p == {0, 1} for p in seen.values()), seen


def _options(argv, environ=None):
  args = cli.build_parser().parse_args([*argv, "info", "x"])
  return cli.distributed_options(args, environ or {})


def test_distributed_options_from_flags_or_environment():
  assert _options([]) is None
  want = {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  assert _options(["--coordinator", "h:1", "--num-processes", "2",
                   "--process-id", "1"]) == want
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "0"}
  assert _options(["--process-id", "1"], env) == want  # the flag wins


@pytest.mark.parametrize("argv,env,needle", [
    (["--coordinator", "h:1"], {}, "--num-processes: several processes "
     "need --coordinator, --num-processes and --process-id together"),
    (["--coordinator", "h", "--num-processes", "2", "--process-id", "0"], {},
     "--coordinator: expected HOST:PORT, received 'h'"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"],
     {}, "--process-id: expected 0 ... 1 (for --num-processes 2), "
     "received 2"),
    ([], {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
          "JAX_PROCESS_ID": "0"}, "--num-processes: expected an integer "
     "from JAX_NUM_PROCESSES, received 'two'"),
])
def test_bad_distributed_options_are_usage_errors(argv, env, needle,
                                                  monkeypatch, capsys):
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(k, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(SystemExit) as e:
    cli.main([*argv, "info", "x"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxbnb: error: argument ") and needle in err, err


def test_generate_mesh_is_checked_before_loading(folder, capsys):
  assert cli.main(["generate", folder, "--prompt", "x", "--mesh",
                   "tensor=3"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("jaxbnb generate: error: argument --mesh: ")
  assert "multiply to 3, expected the number of devices, 8" in err, err


# ---------------------------------------------------------------------------
# FSDP-QLoRA training steps across two processes.

_TRAIN_SCRIPT = r"""
import json, sys
import jax, numpy as np
from jaxbnb import convert, train
from jaxbnb._src.train import mesh as train_mesh
args = json.loads(sys.argv[1])
if args["pid"] is not None:
  jax.distributed.initialize(f"127.0.0.1:{args['port']}", 2, args["pid"])
from tests.train.common import sgd_qlora
mesh = convert.parse_mesh("fsdp=2") if args["pid"] is not None else None
m, opt = sgd_qlora(args["folder"], mesh)
ids = np.asarray(np.random.default_rng(0).integers(0, 256, (1, 4, 16)),
                 np.int32)
batch = {"input_ids": ids, "attention_mask": np.ones(ids.shape, bool),
         "loss_mask": np.ones(ids.shape, bool)}
if mesh is not None:
  train.shard_for_training(m, opt, mesh)
  where = train_mesh.batch_sharding(mesh, 3, 1)
  batch = {k: train_mesh.put(v, where) for k, v in batch.items()}
losses = [float(train.layerwise_train_step(m, opt, batch)["loss"])
          for _ in range(2)]
print("RESULT" + json.dumps({"losses": losses,
                             "processes": jax.process_count()}))
"""


def _train_run(folder, pid=None, port=None):
  return _spawn(_TRAIN_SCRIPT,
                json.dumps({"pid": pid, "port": port, "folder": folder}))


def test_two_processes_train_fsdp_as_one(folder):
  """Two processes as two hosts, `fsdp=2` over one CPU device each: the
  4-bit base loaded shard by shard, the adapters, optimizer state and
  batch placed onto the mesh by each process (`train.mesh.put`), two
  layerwise QLoRA steps with dropout. The losses are one device's (only
  the order of float32 sums differs; 1e-5 relative is ~100 ulps, another
  dropout draw or a batch row seen twice moves them by percents)."""
  port = str(_free_port())
  *results, one = _results([_train_run(folder, pid, port) for pid in range(2)]
                           + [_train_run(folder)])
  want = one["losses"]
  for r in results:
    assert r["processes"] == 2
    np.testing.assert_allclose(r["losses"], want, rtol=1e-5)
  assert want[1] < want[0]


# ---------------------------------------------------------------------------
# `jaxbnb finetune` across two processes: files written once, checkpoints
# written shard by shard and resumable on one process.

_FINETUNE_SCRIPT = r"""
import json, sys
from jaxbnb._src.tools import cli
args = json.loads(sys.argv[1])
hosts = [] if args["pid"] is None else [
    "--coordinator", f"127.0.0.1:{args['port']}", "--num-processes", "2",
    "--process-id", str(args["pid"])]
print("RC", cli.main([*hosts, "finetune", *args["argv"]]))
"""


def _finetune_run(argv, pid=None, port=None):
  return _spawn(_FINETUNE_SCRIPT,
                json.dumps({"pid": pid, "port": port, "argv": argv}))


def _finished(procs):
  logs = _logs(procs)
  for log in logs:
    assert "RC 0" in log, log[-4000:]
  return logs


def _adapter(out):
  return safetensors.numpy.load_file(
      os.path.join(out, "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def finetuned(folder, tmp_path_factory):
  """Three steps with dropout and a checkpoint every two: on `fsdp=2`
  across two processes, and on one process (one device)."""
  tmp = tmp_path_factory.mktemp("ft")
  text = tmp / "austen.txt"
  with open(os.path.join(ROOT, "tests", "data", "persuasion_excerpt.txt"),
            encoding="utf-8") as f:
    text.write_text(f.read()[:3000], encoding="utf-8")
  common = ["--data", str(text), "--steps", "3", "--save-every", "2",
            "--seq-len", "32", "--batch-size", "2", "--lora-r", "4",
            "--lora-dropout", "0.1", "--lr", "1e-2", "--eval-every", "2",
            *QUANT, "--quiet"]
  two, one = str(tmp / "two"), str(tmp / "one")
  port = str(_free_port())
  procs = [_finetune_run([folder, "--out", two, "--mesh", "fsdp=2",
                          *common], pid, port) for pid in range(2)]
  procs.append(_finetune_run([folder, "--out", one, *common]))
  logs = _finished(procs)
  return {"two": two, "one": one, "common": common, "logs": logs,
          "tmp": tmp, "folder": folder}


def test_two_process_finetune_writes_each_file_once(finetuned):
  two, one = finetuned["two"], finetuned["one"]
  assert sorted(os.listdir(two)) == sorted(os.listdir(one))
  assert not [e for e in os.listdir(two) if e.startswith(".")]
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == [
      "step_00000002", "step_00000003"]
  # The losses, held-out losses and step rows: one device's, each once.
  got, want = train.read_metrics(two), train.read_metrics(one)
  assert [sorted(r) for r in got] == [sorted(r) for r in want]
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for key in ("loss", "eval_loss", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in got if key in r],
                               [r[key] for r in want if key in r],
                               rtol=1e-5)
  # One process reports; the adapter holds the gathered global tensors.
  assert finetuned["logs"][0].count("wrote the adapter to") == 1
  assert "wrote the adapter to" not in finetuned["logs"][1]
  a, b = _adapter(two), _adapter(one)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].shape == b[k].shape
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_two_process_checkpoint_resumes_on_one_process(finetuned):
  """The step-2 checkpoint written shard by shard by two processes
  resumes on one device to the same step 3 and adapter."""
  resumed = str(finetuned["tmp"] / "resumed")
  shutil.copytree(finetuned["two"], resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "step_00000003"))
  _finished([_finetune_run([finetuned["folder"], "--out", resumed,
                            "--resume", *finetuned["common"]])])
  last = [r for r in train.read_metrics(resumed) if "loss" in r][-1]
  want = [r for r in train.read_metrics(finetuned["two"]) if "loss" in r][-1]
  assert last["step"] == want["step"] == 3
  np.testing.assert_allclose(last["loss"], want["loss"], rtol=1e-5)
  a, b = _adapter(resumed), _adapter(finetuned["two"])
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------
# A checkpoint that one host cannot read.

_OPEN_SCRIPT = r"""
import json, sys
import jax
args = json.loads(sys.argv[1])
jax.distributed.initialize(f"127.0.0.1:{args['port']}", 2, args["pid"])
from jaxbnb import convert
try:
  convert.from_pretrained(args["folder"], progress=False,
                          mesh=convert.parse_mesh("tensor=2"))
  print("RESULT" + json.dumps({"error": None}))
except Exception as e:
  print("RESULT" + json.dumps({"error": f"{type(e).__name__}: {e}"}))
"""


def test_a_shard_one_host_cannot_read_fails_every_host(folder, tmp_path):
  """Process 1's copy of the checkpoint is truncated: it reports its file,
  and process 0 reports process 1's error instead of waiting for it."""
  bad = tmp_path / "bad"
  shutil.copytree(folder, bad)
  weights = bad / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:1000])
  port = str(_free_port())
  errors = [r["error"] for r in _results([_spawn(_OPEN_SCRIPT, json.dumps(
      {"pid": pid, "port": port, "folder": str(bad if pid else folder)}))
                                          for pid in range(2)])]
  assert errors[1].startswith("ValueError: ") and str(weights) in errors[1]
  assert "is truncated or not a safetensors file" in errors[1]
  assert errors[0].startswith(
      "ValueError: from_pretrained: process 1 of 2 could not open its "
      "checkpoint: ValueError: "), errors[0]
  assert str(weights) in errors[0]


# ---------------------------------------------------------------------------
# save_pretrained of a model split over two processes.

_SAVE_SCRIPT = r"""
import json, sys
import jax
args = json.loads(sys.argv[1])
jax.distributed.initialize(f"127.0.0.1:{args['port']}", 2, args["pid"])
from jaxbnb import convert, models
model = convert.from_pretrained(
    args["folder"], progress=False, mesh=convert.parse_mesh("tensor=2"),
    quantization=models.QuantizationConfig.nf4(compute_dtype="float32"),
    param_dtype="float32")
convert.save_pretrained(model, args["out"], progress=False)
print("RESULT" + json.dumps({"sharded": not next(
    v for _, v in model.iter_variables()).get_value().is_fully_addressable}))
"""


def test_two_processes_save_the_checkpoint_of_one(folder, tmp_path):
  """Loaded split over two processes (each quantizing its rows, the
  absmax double-quantized together), saved by both: process 0 writes
  exactly the files one process writes."""
  out = tmp_path / "saved"
  port = str(_free_port())
  results = _results([_spawn(_SAVE_SCRIPT, json.dumps(
      {"pid": pid, "port": port, "folder": folder, "out": str(out)}))
                      for pid in range(2)])
  assert all(r["sharded"] for r in results)
  one = tmp_path / "one"
  convert.save_pretrained(convert.from_pretrained(
      folder, progress=False, param_dtype="float32",
      quantization=models.QuantizationConfig.nf4(compute_dtype="float32")),
                          one, progress=False)
  assert sorted(os.listdir(out)) == sorted(os.listdir(one))
  assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]
  got = safetensors.numpy.load_file(out / "model.safetensors")
  want = safetensors.numpy.load_file(one / "model.safetensors")
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
