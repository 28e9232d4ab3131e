"""SmolLM2-135M from its GGUF vs transformers (fixtures): logits, greedy, ppl.

One module-scoped float32 model; every check batches its work into a single
compiled shape to keep CPU time down.
"""

import numpy as np
import pytest
from flax import nnx

from jaxbnb._src.io.tokenizer import load_tokenizer
from jaxbnb.convert import from_pretrained
from jaxbnb.models import generate
from jaxbnb.models import perplexity
from tests.tools import smollm2

WIDTH = 64  # prompts are right-padded to this width


@pytest.fixture(scope="module")
def model():
  return from_pretrained(smollm2.gguf_path(), progress=False)


@nnx.jit
def _logits(model, ids, mask):
  return model(ids, attention_mask=mask)[0]


def test_logits_match_transformers(model):
  arrays, meta = smollm2.golden()
  n = len(meta["prompts"])
  ids = np.full((n, WIDTH), 2, np.int32)
  mask = np.zeros((n, WIDTH), np.int32)
  for i in range(n):
    p = arrays[f"prompt{i}_ids"]
    ids[i, :len(p)], mask[i, :len(p)] = p, 1
  logits = np.asarray(_logits(model, ids, mask))
  for i in range(n):
    length = len(arrays[f"prompt{i}_ids"])
    got = logits[i, :length]
    # Full last-position logits (49152 values) agree to float32 noise.
    np.testing.assert_allclose(got[-1], arrays[f"prompt{i}_last_logits"],
                               atol=3e-4, rtol=0)
    # The top-10 of every position: same values at HF's top-10 ids.
    top_ids = arrays[f"prompt{i}_top10_ids"]
    np.testing.assert_allclose(np.take_along_axis(got, top_ids, -1),
                               arrays[f"prompt{i}_top10_logits"], atol=3e-4,
                               rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), top_ids[:, 0])


def test_greedy_matches_transformers(model):
  arrays, meta = smollm2.golden()
  n = len(meta["prompts"])
  prompts = [arrays[f"prompt{i}_ids"].tolist() for i in range(n)]
  out = generate(model, prompts, max_new_tokens=20, stop_token_ids=(2,),
                 pad_token_id=2)
  for i in range(n):
    want = arrays[f"prompt{i}_greedy"].tolist()
    if want and want[-1] == 2:  # transformers keeps EOS; generate drops it
      want = want[:-1]
    assert out.sequences[i] == want, meta["continuations"][i]
  # Decoded by jaxbnb's own GGUF tokenizer, our tokens give transformers'
  # continuation text (the fixture keeps EOS; generate drops it), and the
  # chat prompt answers the question. (This used to assert on the fixture's
  # own text only, which could not fail.)
  tok = load_tokenizer(smollm2.gguf_path())
  for i in range(n):
    text = tok.decode(out.sequences[i])
    assert meta["continuations"][i].startswith(text) and (
        len(meta["continuations"][i]) - len(text) <= len("<|im_end|>")), (
            i, text, meta["continuations"][i])
  assert tok.decode(out.sequences[2]).startswith(
      "The capital of France is Paris")


def test_perplexity_matches_transformers(model):
  arrays, meta = smollm2.golden()
  for name in ("nonoverlap", "stride"):
    ref = meta["perplexity"][name]
    ids = arrays["austen_ids"][:ref["tokens"]]
    r = perplexity(model, ids, window=ref["window"], stride=ref["stride"],
                   batch_size=3, progress=False)
    assert (r.num_tokens, r.num_windows) == (ref["num_tokens"],
                                             ref["num_windows"])
    np.testing.assert_allclose(r.nll_sum, ref["nll_sum"], rtol=1e-5)
    np.testing.assert_allclose(r.perplexity, ref["perplexity"], rtol=1e-5)
