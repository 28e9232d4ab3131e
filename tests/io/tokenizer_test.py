"""load_tokenizer: GGUF metadata tokenizers vs transformers' own conversion."""


import numpy as np
import pytest

from jaxbnb._src.io.tokenizer import load_tokenizer
from tests.tools import smollm2
from tests.tools import tiny_gguf


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
  return tiny_gguf.write_tiny_gguf(path, tiny_gguf.tiny_weights())


def test_tiny_gguf_tokenizer(tiny_path):
  tok = load_tokenizer(tiny_path)
  tokens = tiny_gguf.tiny_tokens()
  assert len(tok) == len(tokens)
  assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
      "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
  ids = tok("the sat<|im_end|>", add_special_tokens=False)["input_ids"]
  # "t" + "he" (no leading space), "Ġs" merge, "a", "t", control token whole.
  assert [tokens[i] for i in ids] == ["t", "he", "Ġs", "a", "t", "<|im_end|>"]
  text = "Ünïcode 🤗 and\n\ttabs  "
  assert tok.decode(tok(text)["input_ids"]) == text
  assert "<|im_end|>" in tok.all_special_tokens


def test_tiny_gguf_save_reload(tiny_path, tmp_path):
  tok = load_tokenizer(tiny_path)
  tok.save_pretrained(tmp_path)
  again = load_tokenizer(tmp_path)
  text = "the other ones\n<|im_start|>user"
  assert again(text)["input_ids"] == tok(text)["input_ids"]
  assert again.chat_template == tiny_gguf.CHAT_TEMPLATE
  assert again.eos_token == "<|im_end|>"


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(tmp_path / "nope.gguf")
  other = tiny_gguf.write_tiny_gguf(tmp_path / "rwkv.gguf",
                                    tiny_gguf.tiny_weights(),
                                    tokenizer_model="rwkv")
  with pytest.raises(NotImplementedError,
                     match="tokenizer.ggml.model is 'rwkv'"):
    load_tokenizer(other)
  bare = tiny_gguf.write_tiny_gguf(tmp_path / "bare.gguf",
                                   tiny_gguf.tiny_weights(), tokenizer=False)
  with pytest.raises(ValueError, match="no tokenizer metadata"):
    load_tokenizer(bare)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="cannot load a tokenizer"):
    load_tokenizer(tmp_path / "empty")


def test_sentencepiece_gguf_goes_through_transformers(tmp_path):
  """transformers' conversion also covers SentencePiece ("llama") files."""
  spm = tiny_gguf.write_tiny_gguf(tmp_path / "spm.gguf",
                                  tiny_gguf.tiny_weights(),
                                  tokenizer_model="llama")
  tok = load_tokenizer(spm)
  assert tok.eos_token == "<|im_end|>"
  ids = tok("the<|im_end|>", add_special_tokens=False)["input_ids"]
  assert ids[-1] == tiny_gguf.tiny_tokens().index("<|im_end|>")


# --------------------------------------------------------------------------
# SmolLM2: ids equal transformers' GGUF tokenizer (fixture) exactly.


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer(smollm2.gguf_path())


def test_smollm2_special_tokens(tok):
  assert len(tok) == 49152
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
          tok.unk_token_id) == (1, 2, 2, 0)
  assert tok("Hi")["input_ids"] == tok("Hi", add_special_tokens=False)[
      "input_ids"]  # no BOS added


def test_smollm2_ids_match_transformers(tok):
  arrays, meta = smollm2.golden()
  for i, text in enumerate(meta["tokenizer_probes"]):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ids, arrays[f"probe{i}_ids"], err_msg=text)
    assert tok.decode(ids) == text
  for i, text in enumerate(meta["prompts"]):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(ids, arrays[f"prompt{i}_ids"], err_msg=text)


def test_smollm2_austen_ids_and_roundtrip(tok):
  arrays, _ = smollm2.golden()
  text = smollm2.excerpt()
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert len(ids) > 4000
  np.testing.assert_array_equal(ids, arrays["austen_ids"])
  assert tok.decode(ids) == text


def test_smollm2_chat_template(tok):
  _, meta = smollm2.golden()
  text = tok.apply_chat_template(meta["chat_messages"],
                                 add_generation_prompt=True, tokenize=False)
  assert text == meta["chat_text"]
  assert text.startswith("<|im_start|>system\n")
  assert text.endswith("<|im_start|>assistant\n")
