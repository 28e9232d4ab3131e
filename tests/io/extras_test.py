"""The Hugging Face extra: a lean core, and clear errors without it."""

import os
import subprocess
import sys

import pytest

from jaxbnb import convert
from tests.tools import tiny_gguf

_HF = ("transformers", "tokenizers", "gguf", "jinja2", "torch")
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def test_core_imports_no_hf_package():
  code = ("import sys, jaxbnb, jaxbnb.convert, jaxbnb.models, jaxbnb.nnx; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          f"{set(_HF)}))")
  out = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, check=True,
                       capture_output=True, text=True)
  assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture
def tiny(tmp_path):
  return tiny_gguf.write_tiny_gguf(tmp_path / "tiny.gguf",
                                   tiny_gguf.tiny_weights())


@pytest.mark.parametrize("blocked", ["transformers", "tokenizers", "gguf"])
def test_tokenizer_without_the_extra(blocked, tiny, monkeypatch):
  monkeypatch.setitem(sys.modules, blocked, None)  # import raises ImportError
  with pytest.raises(ImportError, match=rf"`{blocked}`.*pip install "
                     r"'jaxbnb\[hf\]'"):
    convert.load_tokenizer(tiny)


def test_gguf_weights_without_the_extra(tiny, monkeypatch):
  monkeypatch.setitem(sys.modules, "gguf", None)
  with pytest.raises(ImportError, match=r"reading GGUF files needs `gguf`.*"
                     r"pip install 'jaxbnb\[hf\]'"):
    convert.from_pretrained(tiny, progress=False)
