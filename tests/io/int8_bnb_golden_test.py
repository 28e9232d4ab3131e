"""LLM.int8 checkpoints written by transformers + bitsandbytes on CUDA.

Fixtures: tests/golden/bnb_int8/llama_int8_t6 and llama_int8_t1.5, made by
tests/golden/make_bnb_int8_golden.py (transformers 5.17, bitsandbytes
0.50.2, NVIDIA H200; VERSIONS.txt there): tests/golden/bnb_llama/orig
loaded with `BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=...)`
in float16 and saved again (int8 `weight`, float32 `SCB`, uint8
`weight_format` per linear; lm_head and everything else float16), each with
the logits of that model for fixed input ids. Threshold 1.5 makes outlier
columns common in this tiny model; 6 (transformers' default) rarely fires.

The logits tolerance. The int8 matmuls are bitsandbytes' bit for bit
(tests/quant/int8_bnb_golden_test.py), but everything between them (norms,
RoPE, attention, SiLU) runs in float16 on both sides with different
rounding points, and each linear re-quantizes its float16 input to int8:
the 16-bit rounding noise moves an activation across an int8 rounding
boundary now and then, one code (absmax/127) at a time. That noise is
measured on our side as the distance `noise` between the float16 forward
and the float32 forward of the same loaded int8 weights (measured 0.0078
and 0.0046, about 0.9% and 0.5% of the largest |logit|); torch's float16
forward has the same rounding stages, so |ours - bnb| <= 2 * noise (the
convention of tests/io/convert_test.py; measured |ours - bnb| 0.0077 and
0.0044, about one `noise`; quantize-on-load 0.0067 and 0.0059). Not
vacuous: the unquantized float16 model is further from bitsandbytes' int8
logits (0.0132, 0.0118) than ours, and for threshold 1.5 so is the same
int8 model run at threshold 6 (0.0098). Checked by hand: RoPE switched
off moves the logits by 0.017 to 0.019, beyond 2 * noise in all four
logits tests (narrowly for quantize-on-load at threshold 6: 0.0166
against 0.0165); row scales scaled by 1.01 in the forward fail all four
(threshold 6 through the float-model comparison, 1.5 through 2 * noise);
a forward that ignores the threshold fails the threshold-1.5 folder test.
"""

from __future__ import annotations

import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from jaxbnb import functional as F
from jaxbnb._src.io import convert
from jaxbnb._src.io.checkpoint_source import write_safetensors
from jaxbnb._src.layers.linear8bit import Linear8bitLt
from jaxbnb._src.layers.quant_config import QuantizationConfig
from jaxbnb._src.quant.weights import Int8Params
from tests import helpers
from tests.io import common

BASE = os.path.join(helpers.GOLDEN, "bnb_int8")
THRESHOLDS = {"6": 6.0, "1.5": 1.5}
for _t in THRESHOLDS:
  for _f in ("config.json", "model.safetensors", "logits.npz"):
    assert os.path.exists(os.path.join(BASE, f"llama_int8_t{_t}", _f)), (
        f"golden fixture bnb_int8/llama_int8_t{_t}/{_f} is missing "
        "(tests/golden/make_bnb_int8_golden.py)")
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]
L = "model.layers.1.mlp.down_proj"  # [128, 256]: rows != columns


def _folder(t):
  return os.path.join(BASE, f"llama_int8_t{t}")


def _fixture(t):
  d = np.load(os.path.join(_folder(t), "logits.npz"))
  return d["input_ids"], d["logits"]


_LOADED = {}


def _load(path, **kw):
  key = (path, tuple(sorted((k, str(v)) for k, v in kw.items())))
  if key not in _LOADED:
    _LOADED[key] = convert.from_pretrained(path, progress=False, **kw)
  return _LOADED[key]


def _int8(t):
  return QuantizationConfig(load_in_8bit=True,
                            llm_int8_threshold=THRESHOLDS[t])


def _variables(model):
  return {n: v.get_value() for n, v in model.iter_variables()}


def _near_tie(w, scb):
  """Weights whose `|w| * 127 / SCB` lies within 4 float32 ulps of a
  rounding tie, where bitsandbytes' approximate `__fdividef(127, absmax)`
  may round the other way (tests/quant/int8_bnb_golden_test.py)."""
  v = np.abs(np.asarray(w, np.float32)
             * (np.float32(127) / np.asarray(scb, np.float32))[:, None])
  return np.abs(v - np.floor(v) - np.float32(0.5)) <= 4 * np.spacing(v)


def _assert_logits_close(model, twin32, t):
  """|ours - bnb| <= 2 * noise (module docstring); returns |ours - bnb|."""
  ids, want = _fixture(t)
  got = common.logits(model, ids)
  assert got.shape == want.shape == (2, 8, 128)
  noise = float(np.abs(got - common.logits(twin32, ids)).max())
  scale = float(np.abs(want).max())
  assert 0 < noise <= 0.012 * scale, (t, "fp16 vs fp32 forward", noise,
                                      scale)
  err = float(np.abs(got - want).max())
  assert err <= 2 * noise, (t, "ours vs bitsandbytes", err, 2 * noise)
  # The int8 numerics matter at this tolerance: the float16 model without
  # quantization is further from bitsandbytes' int8 logits.
  plain = common.logits(common.load("orig", param_dtype="float16"), ids)
  assert float(np.abs(plain - want).max()) > err, (t, "float model closer")
  return err


# -- the transformers int8 folders --------------------------------------------


@pytest.mark.parametrize("t", THRESHOLDS)
def test_int8_folder_loads_bnb_tensors_exactly(t, tmp_path):
  model = _load(_folder(t))
  want = common.read_all(_folder(t))
  assert model.quantization.load_in_8bit
  assert model.quantization.llm_int8_threshold == THRESHOLDS[t]
  assert model.param_dtype == jnp.float16
  values = _variables(model)
  for name in LINEARS:
    fmt = want[name + ".weight_format"]
    assert (fmt.dtype, fmt.shape, int(fmt)) == (np.uint8, (), 0)
    got = values[name + ".weight"]
    assert isinstance(got, Int8Params) and got.dtype == "float16"
    assert np.asarray(got.CB).dtype == np.int8
    assert np.asarray(got.CB).tobytes() == want[name + ".weight"].tobytes()
    assert np.asarray(got.SCB).dtype == np.float32
    assert np.asarray(got.SCB).tobytes() == want[name + ".SCB"].tobytes()
    layer = model.model.layers[int(name.split(".")[2])]
    for part in name.split(".")[3:]:
      layer = getattr(layer, part)
    assert isinstance(layer, Linear8bitLt)
    assert layer.threshold == THRESHOLDS[t] and not layer.has_fp16_weights
  # lm_head stays float16 (transformers' default skip list), bit for bit.
  head = np.asarray(values["lm_head.weight"])
  assert head.dtype == np.float16
  assert head.tobytes() == want["lm_head.weight"].tobytes()
  # Saving gives back transformers' tensors, byte for byte.
  convert.save_pretrained(model, tmp_path / "again", progress=False)
  common.assert_same_bytes(common.read_all(tmp_path / "again"), want)


@pytest.mark.parametrize("t", THRESHOLDS)
def test_int8_folder_logits_match_bnb(t):
  model = _load(_folder(t))
  err = _assert_logits_close(model, _load(_folder(t), param_dtype="float32"),
                             t)
  ids, want = _fixture(t)
  if t == "1.5":
    # The threshold matters too: the same int8 weights at threshold 6 are
    # further from bitsandbytes' threshold-1.5 logits.
    other = _load(_folder(t), quantization=_int8("6"))
    assert other.model.layers[0].mlp.up_proj.threshold == 6.0
    assert np.abs(common.logits(other, ids) - want).max() > err


# -- quantize on load -----------------------------------------------------------


@pytest.mark.parametrize("t", THRESHOLDS)
def test_quantize_on_load_matches_bnb(t):
  """tests/golden/bnb_llama/orig (bf16) with load_in_8bit at the same
  threshold, in float16 as transformers loaded it: the int8 weights are
  bitsandbytes' (SCB bit for bit; CB but for rounding ties) and the logits
  are within the same tolerance of bitsandbytes'."""
  kw = dict(quantization=_int8(t))
  model = _load(common.golden("orig"), param_dtype="float16", **kw)
  bnb = common.read_all(_folder(t))
  floats = common.read_all(common.golden("orig"))
  values = _variables(model)
  ties = 0
  for name in LINEARS:
    got = values[name + ".weight"]
    assert isinstance(got, Int8Params)
    assert np.asarray(got.SCB).tobytes() == bnb[name + ".SCB"].tobytes()
    diff = (np.asarray(got.CB, np.int32)
            - bnb[name + ".weight"].astype(np.int32))
    assert np.abs(diff).max() <= 1, name
    tie = _near_tie(floats[name + ".weight"].astype(np.float16),
                    bnb[name + ".SCB"])
    assert not (diff != 0)[~tie].any(), (name, np.argwhere((diff != 0)
                                                           & ~tie))
    ties += int((diff != 0).sum())
  assert ties == 116  # measured: 1 to 20 per linear, of 294912 elements
  # The float tensors are the bf16 checkpoint's cast to float16, as
  # transformers' (one embedding value is a float16 subnormal there).
  for name, arr in bnb.items():
    if arr.dtype == np.float16:
      assert np.asarray(values[name]).tobytes() == arr.tobytes(), name
  _assert_logits_close(
      model, _load(common.golden("orig"), param_dtype="float32", **kw), t)


# -- bad input ----------------------------------------------------------------


def _broken(tmp_path, mutate):
  folder = str(tmp_path / "broken")
  shutil.copytree(_folder("6"), folder)
  tensors = common.read_all(folder)
  mutate(tensors)
  write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
  return folder


def _set(key, fn):
  return lambda t: t.__setitem__(L + key, fn(t[L + key]))


TENSOR = rf"model\.safetensors:{L.replace('.', '[.]')}"
BAD = {
    "weight_format col32": (
        _set(".weight_format", lambda _: np.asarray(1, np.uint8)),
        rf"{TENSOR}\.weight_format is weight_format 1 \('col32'\); only 0 "
        r"\('row'\) is supported"),
    "weight_format col_ampere": (
        _set(".weight_format", lambda _: np.asarray(3, np.uint8)),
        r"weight_format 3 \('col_ampere'\); only 0 \('row'\)"),
    "weight_format not a scalar": (
        _set(".weight_format", lambda _: np.zeros(2, np.uint8)),
        r"weight_format is weight_format \[0, 0\]; only 0 \('row'\)"),
    "SCB float16": (
        _set(".SCB", lambda s: s.astype(np.float16)),
        rf"{TENSOR}\.SCB has dtype float16; an LLM\.int8 row scale `SCB` is "
        "float32"),
    "SCB float64": (
        _set(".SCB", lambda s: s.astype(np.float64)),
        rf"{TENSOR}\.SCB has dtype float64; .* is float32"),
    "SCB one short": (
        _set(".SCB", lambda s: s[:-1]),
        rf"{TENSOR}\.SCB has shape \[127\]; expected \[128\], one row scale "
        rf"per row of {TENSOR}\.weight \[128, 256\]"),
    "SCB 2-D": (
        _set(".SCB", lambda s: s[:, None]),
        r"SCB has shape \[128, 1\]; expected \[128\]"),
    "weight transposed": (
        _set(".weight", lambda w: np.ascontiguousarray(w.T)),
        r"SCB has shape \[128\]; expected \[256\], one row scale per row of "
        rf"{TENSOR}\.weight \[256, 128\]"),
    "weight and SCB short": (
        lambda t: (_set(".weight", lambda w: w[:-1])(t),
                   _set(".SCB", lambda s: s[:-1])(t)),
        rf"{TENSOR}\.weight has shape \[127, 256\], expected \[128, 256\] "
        "from config.json"),
    "weight float16": (
        _set(".weight", lambda w: w.astype(np.float16)),
        rf"{TENSOR}\.weight has dtype float16 beside an `SCB` entry; an "
        r"LLM\.int8 weight is int8"),
    "weight uint8": (
        _set(".weight", lambda w: w.view(np.uint8)),
        r"weight has dtype uint8 beside an `SCB` entry"),
    "SCB missing": (
        lambda t: t.pop(L + ".SCB"),
        rf"{TENSOR}\.weight is int8 without bitsandbytes' quantization "
        rf"tensors beside it \(an LLM\.int8 '{L}\.SCB'"),
    "weight missing": (
        lambda t: t.pop(L + ".weight"),
        rf"has '{L}\.SCB' but no '{L}\.weight'"),
    "SCB NaN": (
        _set(".SCB", lambda s: np.where(np.arange(s.size) == 5, np.nan,
                                        s).astype(np.float32)),
        rf"{L}\.SCB must hold finite row absmax values >= 0; 1 do not "
        r"\(row 5: nan\)"),
    "SCB negative": (
        _set(".SCB", lambda s: -s),
        r"SCB must hold finite row absmax values >= 0; 128 do not"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_checkpoint_gives_clear_error(tmp_path, case):
  mutate, message = BAD[case]
  folder = _broken(tmp_path, mutate)
  with pytest.raises(ValueError, match=message):
    convert.from_pretrained(folder, progress=False)


def test_bad_state_dict_gives_clear_error():
  """`Int8Params.from_state_dict` on bitsandbytes' own tensors: they load
  as stored; each broken variant names the tensor, what it expects and
  what it got."""
  state = {k[len(L) + 1:]: v for k, v in common.read_all(_folder("6")).items()
           if k.startswith(L + ".")}
  assert sorted(state) == ["SCB", "weight", "weight_format"]
  ok = F.Int8Params.from_state_dict(state)
  assert np.asarray(ok.CB).tobytes() == state["weight"].tobytes()
  assert np.asarray(ok.SCB).tobytes() == state["SCB"].tobytes()
  fn = "Int8Params.from_state_dict: "
  cases = [
      ({"weight_format": np.asarray(2, np.uint8)},
       fn + r"only weight_format 0 \('row'\) is supported, got 2\."),
      ({"weight_format": np.zeros(2, np.uint8)},
       fn + r"only weight_format 0 \('row'\) is supported, got \[0, 0\]\."),
      ({"weight": state["weight"].astype(np.float16)},
       fn + "weight must be int8, got float16."),
      ({"weight": state["weight"].reshape(-1)},
       fn + r"weight must be 2-D \[out, in\], got shape \[32768\]\."),
      ({"SCB": state["SCB"].astype(np.float16)},
       fn + r"SCB must be float32 \(bitsandbytes' row scales\), got "
       "float16."),
      ({"SCB": state["SCB"][:-1]},
       fn + r"SCB must have shape \[128\] \(one row scale per row of weight "
       r"\[128, 256\]\), got \[127\]\."),
      ({"SCB": np.full(128, np.inf, np.float32)},
       fn + r"SCB must hold finite row absmax values >= 0; 128 do not "
       r"\(row 0: inf\)\."),
  ]
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      F.Int8Params.from_state_dict({**state, **change})
