"""Tests for `generate_text` and incremental text streaming."""

import pytest
from flax import nnx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxbnb._src.models import generate as gen_lib
from jaxbnb._src.models.llama import LlamaForCausalLM
from jaxbnb._src.models.config import LlamaConfig

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(ascii_only: bool) -> PreTrainedTokenizerFast:
  """A byte-level tokenizer with one token per byte and no merges."""
  chars = sorted(pre_tokenizers.ByteLevel.alphabet())
  if ascii_only:  # printable ASCII and newline: every output is valid text
    keep = {chr(c) for c in range(33, 127)} | {"Ġ", "Ċ"}
    chars = [c for c in chars if c in keep]
  vocab = {s: i for i, s in enumerate(SPECIALS)}
  vocab.update({c: i + len(SPECIALS) for i, c in enumerate(chars)})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
      additional_special_tokens=SPECIALS[1:], chat_template=TEMPLATE)


@pytest.fixture(scope="module")
def tokenizer():
  return byte_tokenizer(ascii_only=True)


@pytest.fixture(scope="module")
def model(tokenizer):
  cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    eos_token_id=(), initializer_range=0.3)
  return LlamaForCausalLM(cfg, rngs=nnx.Rngs(1))


def test_text_stream_never_splits_characters():
  tok = byte_tokenizer(ascii_only=False)
  text = "caf\u00e9 \u6771\u4eac \U0001f917 ok"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert len(ids) == len(text.encode())  # one token per byte
  deltas = []
  stream = gen_lib._TextStream(tok, deltas.append)
  for i in ids:
    stream.push([i])
  stream.flush()
  assert "".join(deltas) == text
  assert not any("\ufffd" in d for d in deltas)
  assert "\U0001f917" in deltas  # the emoji's 4 bytes came out at once


def test_text_stream_sends_whole_characters_of_odd_chunks():
  # Two tokens per character, chunks of 3 tokens: every chunk ends inside a
  # character, yet the characters completed in it are sent at once (not
  # all at the flush).
  tok = byte_tokenizer(ascii_only=False)
  text = "\u00e9" * 9
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert len(ids) == 18
  deltas = []
  stream = gen_lib._TextStream(tok, deltas.append)
  for i in range(0, 18, 3):
    stream.push(ids[i:i + 3])
    assert "".join(deltas) == "\u00e9" * ((i + 3) // 2)
  stream.flush()
  assert "".join(deltas) == text


def test_chat_prompt_and_output(model, tokenizer):
  out = gen_lib.generate_text(model, tokenizer, "Hi there", max_new_tokens=6,
                              system="Be brief.", return_result=True)
  want_prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                 "Hi there<|im_end|>\n<|im_start|>assistant\n")
  ids = tokenizer(want_prompt, add_special_tokens=False)["input_ids"]
  assert out.prompt_tokens == len(ids)
  # Same as token-level generation with the tokenizer's EOS and pad.
  ref = gen_lib.generate(model, [ids], max_new_tokens=6,
                         stop_token_ids=[tokenizer.eos_token_id],
                         pad_token_id=tokenizer.pad_token_id)
  assert out.sequences == ref.sequences
  assert out.texts == [tokenizer.decode(ref.sequences[0],
                                        skip_special_tokens=True)]


def test_plain_batch_and_stream(model, tokenizer):
  texts = gen_lib.generate_text(model, tokenizer, ["abc", "hello world"],
                                chat=False, max_new_tokens=5)
  assert isinstance(texts, list) and len(texts) == 2
  alone = gen_lib.generate_text(model, tokenizer, "hello world", chat=False,
                                max_new_tokens=5)
  assert alone == texts[1:]
  deltas = []
  streamed = gen_lib.generate_text(model, tokenizer, "hello world",
                                   chat=False, max_new_tokens=5,
                                   stream=deltas.append)
  assert "".join(deltas) == streamed[0] == texts[1]


def test_errors(model, tokenizer):
  with pytest.raises(ValueError, match="one prompt"):
    gen_lib.generate_text(model, tokenizer, ["a", "b"], stream=print)
  with pytest.raises(ValueError, match="chat=True"):
    gen_lib.generate_text(model, tokenizer, "a", chat=False, system="s")
  with pytest.raises(TypeError, match="prompts"):
    gen_lib.generate_text(model, tokenizer, [1, 2])
