"""`jaxbnb finetune`, `merge` and `generate --adapter` on a tiny GGUF model."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from jaxbnb import convert
from jaxbnb import lora
from jaxbnb import models
from jaxbnb._src.tools import cli
from tests.tools import tiny_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
# Fast settings: float32 compute, no dropout (one small program to compile).
FAST = ["--steps", "3", "--seq-len", "32", "--batch-size", "2",
        "--lora-r", "4", "--lora-dropout", "0", "--compute-dtype", "float32",
        "--dtype", "float32", "--save-every", "0", "--quiet"]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("ft") / "tiny.gguf"
  return tiny_gguf.write_tiny_gguf(path, tiny_gguf.tiny_weights(seed=4))


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
  with open(os.path.join(ROOT, "tests", "data", "persuasion_excerpt.txt"),
            encoding="utf-8") as f:
    text = f.read()[:2000]
  path = tmp_path_factory.mktemp("ft") / "austen.txt"
  path.write_text(text, encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def adapter(gguf_path, text_path, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ft") / "adapter")
  assert cli.main(["finetune", gguf_path, "--data", text_path, "--out", out,
                   "--target", "q_proj,v_proj,down_proj",
                   "--lora-bias", "lora_only", *FAST]) == 0
  return out


def _one_line(capsys, prefix):
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith(prefix), err
  return lines[0]


def _base(gguf_path, quant=True):
  q = (models.QuantizationConfig.nf4(compute_dtype="float32") if quant
       else None)
  return convert.from_pretrained(gguf_path, quantization=q, dtype="float32",
                                 param_dtype="float32", progress=False)


def test_finetune_writes_a_peft_adapter(adapter, gguf_path):
  files = set(os.listdir(adapter))
  assert {"adapter_config.json", "adapter_model.safetensors",
          "metrics.jsonl", "finetune.json", "loss.png",
          "checkpoints"} <= files
  with open(os.path.join(adapter, "adapter_config.json")) as f:
    config = json.load(f)
  assert config["peft_type"] == "LORA" and config["r"] == 4
  assert config["lora_alpha"] == 16 and config["task_type"] == "CAUSAL_LM"
  assert config["bias"] == "lora_only"  # the tiny model has no biases
  assert sorted(config["target_modules"]) == ["down_proj", "q_proj",
                                              "v_proj"]
  assert config["base_model_name_or_path"] == os.path.realpath(gguf_path)
  tensors = safetensors.numpy.load_file(
      os.path.join(adapter, "adapter_model.safetensors"))
  key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
  assert tensors[key].shape == (32, 4) and np.abs(tensors[key]).max() > 0
  assert len(tensors) == 2 * 3 * 2
  model = lora.load_adapter(_base(gguf_path), adapter)
  assert lora.adapter_state_dict(model).keys() == tensors.keys()
  with open(os.path.join(adapter, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
  assert [r["step"] for r in records if "eval_ppl" in r] == [0, 3]


def test_resume_of_a_finished_run(adapter, gguf_path, text_path, capsys):
  assert cli.main(["finetune", gguf_path, "--data", text_path, "--out",
                   adapter, "--target", "q_proj,v_proj,down_proj",
                   "--lora-bias", "lora_only", "--resume", *FAST]) == 0
  assert "nothing left to train" in capsys.readouterr().out


def test_generate_with_the_adapter(adapter, gguf_path, capsys):
  assert cli.main(["generate", gguf_path, "--adapter", adapter, "--prompt",
                   "the", "--no-chat", "--max-new-tokens", "3",
                   "--quiet"]) == 0
  assert "new tokens" in capsys.readouterr().err


def test_merge_float_and_requantized(adapter, gguf_path, tmp_path):
  out = tmp_path / "merged"
  assert cli.main(["merge", gguf_path, str(out), "--adapter", adapter,
                   "--dtype", "float32", "--quiet"]) == 0
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(
      os.listdir(out))
  merged = convert.from_pretrained(str(out), progress=False)
  adapted = lora.load_adapter(_base(gguf_path, quant=False), adapter)
  ids = np.array([[5, 70, 80, 90, 100]])
  np.testing.assert_allclose(merged(ids)[0], adapted(ids)[0], atol=2e-4)

  out4 = tmp_path / "merged-nf4"
  assert cli.main(["merge", gguf_path, str(out4), "--adapter", adapter,
                   "--quant", "nf4", "--compute-dtype", "float32",
                   "--quiet"]) == 0
  with open(out4 / "config.json") as f:
    assert json.load(f)["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
  q = convert.from_pretrained(str(out4), progress=False)
  assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


def test_out_folder_rules(adapter, gguf_path, text_path, tmp_path, capsys):
  before = sorted(os.listdir(adapter))
  assert cli.main(["finetune", gguf_path, "--data", text_path, "--out",
                   adapter, *FAST]) == 2
  line = _one_line(capsys, "jaxbnb finetune: error: argument --out: ")
  assert "--resume" in line and "--overwrite" in line
  assert sorted(os.listdir(adapter)) == before
  assert cli.main(["finetune", gguf_path, "--data", text_path, "--out",
                   str(tmp_path / "o"), "--resume", "--overwrite",
                   *FAST]) == 2
  _one_line(capsys, "jaxbnb finetune: error: argument --resume: ")


@pytest.mark.parametrize("content,needle", [
    (b"", "is empty"),
    (b"caf\xe9", "is not UTF-8 text (byte 0xe9"),
    (b'{"prompt": 1}\n', "line 1: `prompt` and `completion` must both be"),
])
def test_unusable_data(content, needle, gguf_path, tmp_path, capsys):
  data = tmp_path / ("d.jsonl" if content.startswith(b"{") else "d.txt")
  data.write_bytes(content)
  out = tmp_path / "out"
  assert cli.main(["finetune", gguf_path, "--data", str(data), "--out",
                   str(out), *FAST]) == 2
  line = _one_line(capsys, "jaxbnb finetune: error: argument --data: ")
  assert needle in line
  assert not out.exists()


@pytest.mark.parametrize("extra,prefix,needle", [
    (["--target", "qkv_proj"], "argument --target: ",
     "matches no linear layer"),
    (["--seq-len", "256"], "argument --seq-len: ",
     "256 exceeds the model's max_position_embeddings (128)"),
    (["--warmup", "9"], "argument --warmup: ",
     "--warmup (9) must be at most --steps (3)"),
    # 2000 characters make a few 32-token sequences: none left to train on.
    (["--eval-split", "0.99"], "argument --eval-split: ",
     "too few to hold out 0.99"),
    (["--target", "q_proj", "--modules-to-save", "lm_head,nothing"],
     "argument --modules-to-save: ", "['nothing'] select no module"),
    (["--target", "q_proj", "--modules-to-save", "mlp"],
     "argument --modules-to-save: ", "only float modules"),
])
def test_bad_settings(extra, prefix, needle, gguf_path, text_path, tmp_path,
                      capsys, monkeypatch):
  if "--target" not in extra:  # refused before the model loads
    def from_pretrained(*a, **k):
      raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(convert, "from_pretrained", from_pretrained)
  out = tmp_path / "out"
  assert cli.main(["finetune", gguf_path, "--data", text_path, "--out",
                   str(out), *FAST, *extra]) == 2
  assert needle in _one_line(capsys, "jaxbnb finetune: error: " + prefix)
  assert not out.exists()


@pytest.mark.parametrize("flag,value,needle", [
    ("--lora-r", "0", "expected an integer >= 1, got '0'"),
    ("--lora-alpha", "0", "expected a number > 0"),
    ("--lora-dropout", "1", "expected a number in [0, 1)"),
    ("--target", "(", "not a valid regex"),
    ("--eval-split", "1", "expected a number in [0, 1)"),
    ("--grad-accum", "0", "expected an integer >= 1"),
    ("--modules-to-save", "lm_head,(", "expected module names separated"),
    ("--lora-bias", "some", "invalid choice: 'some'"),
])
def test_bad_numbers(flag, value, needle, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(["finetune", "m", "--data", "d", "--out", "o", flag, value])
  assert e.value.code == 2
  line = _one_line(capsys, f"jaxbnb finetune: error: argument {flag}: ")
  assert needle in line


def test_adapter_of_another_model(gguf_path, tmp_path, capsys):
  other = models.LlamaForCausalLM(models.LlamaConfig(
      vocab_size=300, hidden_size=64, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
      rngs=nnx.Rngs(0))
  other = lora.apply_lora(other, lora.LoRAConfig(r=2), rngs=nnx.Rngs(1))
  wrong = tmp_path / "wrong"
  lora.save_adapter(other, wrong)
  assert cli.main(["generate", gguf_path, "--adapter", str(wrong),
                   "--prompt", "x", "--quiet"]) == 2
  line = _one_line(capsys, "jaxbnb generate: error: argument --adapter: ")
  assert "shape" in line
  out = tmp_path / "m"
  assert cli.main(["merge", gguf_path, str(out), "--adapter", str(wrong),
                   "--quiet"]) == 2
  _one_line(capsys, "jaxbnb merge: error: argument --adapter: ")
  assert not out.exists()
  assert cli.main(["merge", gguf_path, str(out), "--adapter",
                   str(tmp_path / "none"), "--quiet"]) == 2
  assert "is not a folder" in _one_line(capsys, "jaxbnb merge: error: ")


def test_merge_quant_gives_what_convert_quant_gives(adapter, gguf_path,
                                                   tmp_path, capsys):
  """`merge GGUF --quant nf4` lays the model out as `convert GGUF --quant
  nf4` does: the same float dtype (bfloat16 for a float32 GGUF) for the
  embeddings and norms, the same config; only the merged linears differ."""
  merged, converted = tmp_path / "merged", tmp_path / "converted"
  assert cli.main(["merge", gguf_path, str(merged), "--adapter", adapter,
                   "--quant", "nf4", "--quiet"]) == 0
  assert "(merged; nf4 + double quant, blocksize 64;" in (
      capsys.readouterr().out)
  assert cli.main(["convert", gguf_path, str(converted), "--quant", "nf4",
                   "--quiet"]) == 0
  a = safetensors.numpy.load_file(str(merged / "model.safetensors"))
  b = safetensors.numpy.load_file(str(converted / "model.safetensors"))
  assert a.keys() == b.keys()
  # (the quant_state JSON of a merged linear holds another nested_offset)
  layout = lambda t: {k: (v.dtype, v.shape if "quant_state" not in k else 0)
                      for k, v in t.items()}
  assert layout(a) == layout(b)
  assert str(a["model.embed_tokens.weight"].dtype) == "bfloat16"
  np.testing.assert_array_equal(a["model.embed_tokens.weight"],
                                b["model.embed_tokens.weight"])
  with open(merged / "config.json") as f, open(converted / "config.json") as g:
    assert json.load(f) == json.load(g)


def test_resume_in_a_folder_a_killed_run_left(gguf_path, text_path, tmp_path,
                                              capsys):
  """A run killed (SIGKILL) before its first checkpoint leaves only
  finetune.json and metrics.jsonl: --resume starts afresh there."""
  out = tmp_path / "killed"
  out.mkdir()
  (out / "finetune.json").write_text("{}")
  (out / "metrics.jsonl").write_text('{"step": 0, "eval_loss": 9}\n')
  assert cli.main(["finetune", gguf_path, "--data", text_path, "--out",
                   str(out), "--target", "q_proj", "--resume", *FAST]) == 0
  assert "steps 1-3" in capsys.readouterr().out
  assert (out / "adapter_model.safetensors").is_file()


_SLOW_FINETUNE = """
import sys, time
from jaxbnb._src.tools import cli
from jaxbnb._src.train import loop

def slow_evaluate(*args, **kwargs):
  print("ready", flush=True)
  time.sleep(120)

loop.evaluate = slow_evaluate
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_before_the_first_checkpoint_removes_the_folder(
    gguf_path, text_path, tmp_path):
  """SIGTERM before anything resumable was saved: the new OUT is removed
  (not left holding finetune.json and metrics.jsonl, which could neither
  be resumed nor reused)."""
  out = tmp_path / "out"
  proc = subprocess.Popen(
      [sys.executable, "-c", _SLOW_FINETUNE, "finetune", gguf_path,
       "--data", text_path, "--out", str(out), *FAST], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    assert proc.stdout.readline() == "ready\n"
    assert os.path.isfile(out / "finetune.json")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 143, err
  assert err.strip().splitlines()[-1] == "jaxbnb finetune: terminated"
  assert not out.exists()


@pytest.mark.parametrize("tied", [False, True])
def test_finetune_modules_to_save(tied, text_path, tmp_path):
  gguf = tiny_gguf.write_tiny_gguf(tmp_path / "m.gguf",
                                   tiny_gguf.tiny_weights(seed=5, tied=tied))
  out = str(tmp_path / "adapter")
  assert cli.main(["finetune", gguf, "--data", text_path, "--out", out,
                   "--target", "q_proj", "--modules-to-save", "lm_head",
                   *FAST]) == 0
  with open(os.path.join(out, "adapter_config.json")) as f:
    assert json.load(f)["modules_to_save"] == ["lm_head"]
  saved = safetensors.numpy.load_file(
      os.path.join(out, "adapter_model.safetensors"))
  head = saved["base_model.model.lm_head.weight"]
  base = _base(gguf)
  original = (base.model.embed_tokens if tied else base.lm_head).weight[...]
  assert np.abs(head - np.asarray(original)).max() > 0
  adapted = lora.load_adapter(base, out)
  np.testing.assert_array_equal(adapted.lm_head.weight[...], head)
