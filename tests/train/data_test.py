"""Training data: packing, prompt and chat masking, files, split, order."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import train
from tests.tools import tiny_gguf
from tests.train import common

TOK = common.CharTokenizer()


def _numpy_loss(logits, ids, mask):
  """Reference: float64 log-softmax, targets t >= 1 with mask[t]."""
  x = np.asarray(logits, np.float64)[:, :-1]
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(ids)[:, 1:, None], -1)[..., 0]
  m = np.asarray(mask, bool)[:, 1:]
  return nll[m].sum() / m.sum(), m.sum()


def test_loss_matches_numpy_reference():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 7, 11)).astype(np.float32) * 3
  ids = rng.integers(0, 11, (3, 7))
  mask = rng.random((3, 7)) < 0.5
  mask[:, 0] = True  # ignored: nothing predicts column 0
  want, count = _numpy_loss(logits, ids, mask)
  got = train.causal_lm_loss(jnp.asarray(logits), ids, mask)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  nll, n = train.token_nll(jnp.asarray(logits), ids, mask)
  assert int(n) == count
  # bf16 logits: the log-softmax is still float32
  got16 = train.causal_lm_loss(jnp.asarray(logits, jnp.bfloat16), ids, mask)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(float(got16), want, rtol=2e-2)
  assert float(train.causal_lm_loss(jnp.asarray(logits), ids,
                                    np.zeros_like(mask))) == 0.0


def test_pack_texts_eos_between_documents():
  data = train.pack_texts(TOK, ["abc", "de"], seq_len=4)
  a, b, c, d, e = TOK.encode("abcde")
  assert data.input_ids.tolist() == [[a, b, c, 1], [d, e, 1, 0]]
  assert data.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
  # every real token but the first of a sequence is a target
  assert data.loss_mask.tolist() == [[0, 1, 1, 1], [0, 1, 1, 0]]
  # a 1-token tail is dropped (nothing to predict)
  assert len(train.pack_texts(TOK, ["abcdefg"], seq_len=4)) == 2
  with pytest.raises(ValueError, match="too few"):
    train.pack_texts(TOK, [""], seq_len=4)


def test_prompt_completion_masks_the_prompt():
  recs = [{"prompt": "Q:ab", "completion": "cd"},
          {"prompt": "Q:" + "x" * 20, "completion": "y"}]
  data = train.encode_records(TOK, recs, seq_len=8)
  assert len(data) == 1  # the second has no target within 8 tokens
  assert TOK.decode(data.input_ids[0][data.loss_mask[0]]) == "cd<eos>"
  assert data.attention_mask[0].sum() == 7
  truncated = train.encode_records(
      TOK, [{"prompt": "Q", "completion": "abcdefghij"}], seq_len=5)
  assert TOK.decode(truncated.input_ids[0][truncated.loss_mask[0]]) == "abcd"
  with pytest.raises(ValueError, match="has a target token within"):
    train.encode_records(TOK, recs[1:], seq_len=8)


def test_chat_template_masking_char_tokenizer():
  msgs = [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"},
          {"role": "user", "content": "Bye"},
          {"role": "assistant", "content": "Ciao"}]
  data = train.encode_records(TOK, [{"messages": msgs}], seq_len=96)
  ids, mask = data.input_ids[0], data.loss_mask[0]
  full = TOK.apply_chat_template(msgs)
  assert TOK.decode(ids[data.attention_mask[0]]) == full
  # only the two assistant turns (content + the template's end of turn)
  spans = np.flatnonzero(np.diff(np.r_[0, mask.astype(int), 0]))
  texts = [TOK.decode(ids[s:e]) for s, e in spans.reshape(-1, 2)]
  assert texts == ["Hello\n", "Ciao\n"]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
  from jaxbnb import convert  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
  tiny_gguf.write_tiny_gguf(path, tiny_gguf.tiny_weights())
  return convert.load_tokenizer(path)


def test_chat_masking_with_a_transformers_tokenizer(hf_tokenizer):
  tok = hf_tokenizer
  msgs = [{"role": "user", "content": "the sun"},
          {"role": "assistant", "content": "on the sea"}]
  data = train.encode_records(tok, [{"messages": msgs}], seq_len=64)
  ids = data.input_ids[0]
  assert tok.decode(ids[data.attention_mask[0]]) == tok.apply_chat_template(
      msgs, tokenize=False)
  assert tok.decode(ids[data.loss_mask[0]]) == "on the sea<|im_end|>\n"


def test_read_data_files(tmp_path):
  txt = tmp_path / "a.txt"
  txt.write_text("\ufeffhello world")
  assert train.read_data(txt) == ["hello world"]
  chat = tmp_path / "c.jsonl"
  rows = [{"messages": [{"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"}]}] * 2
  chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  assert train.read_data(chat) == rows
  docs = tmp_path / "t.jsonl"
  docs.write_text('{"text": "one"}\n{"text": "two"}\n')
  assert train.read_data(docs) == ["one", "two"]


@pytest.mark.parametrize("name,content,match", [
    ("e.txt", b"", "is empty"),
    ("w.txt", b" \n\t", "only whitespace"),
    ("l.txt", b"caf\xe9", r"not UTF-8 text \(byte 0xe9 at offset 3"),
    ("j.jsonl", b'{"text": "a"}\n{oops\n', "line 2 is not valid JSON"),
    ("m.jsonl", b'{"text": "a"}\n{"prompt": "p", "completion": "c"}\n',
     "line 2: a 'prompt' record among 'text' records"),
    ("n.jsonl", b'{"messages": [{"role": "user", "content": "a"}]}\n',
     "no assistant message"),
    ("k.jsonl", b'{"input": "a"}\n', "expected a `messages`"),
    ("r.jsonl", b'{"messages": [{"role": "bot", "content": "a"}]}\n',
     "unknown role 'bot'"),
])
def test_read_data_errors(tmp_path, name, content, match):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(ValueError, match=match):
    train.read_data(path)


def test_read_data_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    train.read_data(tmp_path / "nope.txt")


def test_chat_records_need_a_template():
  class NoTemplate(common.CharTokenizer):
    chat_template = None
  rec = {"messages": [{"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}]}
  with pytest.raises(ValueError, match="chat template"):
    train.encode_records(NoTemplate(), [rec], seq_len=16)


def test_split_and_batch_order():
  data = train.pack_texts(TOK, [common.TEXT * 3], seq_len=16)
  n = len(data)
  tr, ev = data.split(0.2)
  assert len(ev) == int(np.ceil(0.2 * n)) and len(tr) + len(ev) == n
  # the held-out sequences are the end of the text
  np.testing.assert_array_equal(ev.input_ids, data.input_ids[-len(ev):])
  assert data.split(0)[1] is None
  with pytest.raises(ValueError, match="too few"):
    data.take(slice(0, 1)).split(0.5)
  # a new permutation each epoch, any window reproducible from its position
  stream = train.batch_indices(n, 0, 3 * n, seed=3)
  for e in range(3):
    assert sorted(stream[e * n:(e + 1) * n]) == list(range(n))
  assert not np.array_equal(stream[:n], stream[n:2 * n])
  np.testing.assert_array_equal(train.batch_indices(n, 5, n, seed=3),
                                stream[5:5 + n])
  assert not np.array_equal(train.batch_indices(n, 0, n, seed=4), stream[:n])


def test_prepare_data_dispatch(tmp_path):
  texts = train.prepare_data(TOK, ["ab", "cd"], 4)
  assert texts.input_ids.shape == (2, 4)
  recs = train.prepare_data(TOK, [{"prompt": "a", "completion": "b"}], 4)
  assert recs.num_targets == 2
  again = train.prepare_data(None, recs, 4)
  assert again is recs
  with pytest.raises(ValueError, match="seq_len=8"):
    train.prepare_data(None, recs, 8)
  with pytest.raises(ValueError, match="all strings"):
    train.prepare_data(TOK, ["a", {"text": "b"}], 4)
  assert jax.numpy.asarray(texts.input_ids).dtype == jnp.int32
