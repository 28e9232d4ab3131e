"""jaxbnb's optimizers against real bitsandbytes 0.50.2 CUDA trajectories.

Fixtures: tests/golden/bnb_optim/ from tests/golden/make_bnb_optim_golden.py
(run on a CUDA machine; the regeneration command is `REGENERATE` below).
bnb optimizes a [64, 67] parameter (4288 elements, 17 blocks of 256, the
last one partial) with stored gradients and stores the parameter and the
state tensors after every step. Two fixture formats:

* version 2 (`format_version` key, what the script writes now): a clean
  trajectory of `meta["steps"]` (20) finite steps, compared at every step
  for every optimizer, and, for the float32 cases, a separate NaN
  trajectory (`nan/step<k>/...`, `meta["nan_steps"]` = 3 steps, the last
  gradient holding a NaN and an Inf at `meta["nan_elements"]`).
* version 1 (no `format_version`, the fixtures committed before): one
  5-step trajectory with the NaN/Inf at step 3 (zeros in bf16). The clean
  comparison then stops before step 3 for the 1-state optimizers
  (`V1_COMPARED_STEPS`) and the NaN trajectory is its first 3 steps.

Two checks per trajectory:

* step by step ("teacher forced"): bnb's parameter and state after step
  k - 1 are imported with `from_bnb_state_dict` and jaxbnb does step k.
  The result must match bnb's step k: parameters and absmax within
  `MAX_ULP` float ulp, codes identical except for at most `MAX_CODE_DIFFS`
  elements per tensor, each off by one code. Those allowances cover
  bnb's CUDA arithmetic (fused multiply-adds, `__fdividef` in the
  requantization), which can move a value sitting on a rounding or code
  midpoint; everything else must be identical.
* free run: jaxbnb steps from the same start stay within the same
  tolerances of bnb's trajectory, except that an element whose code once
  left bnb's (the allowance above) then follows its own trajectory: it is
  held within the sum of both trajectories' updates since (`Drift`).

Both run with the pure-jnp reference rules (`reference` kernel mode) and
through the fused Pallas kernel: in interpret mode on the CPU (the NaN
trajectory, or the first `INTERPRET_STEPS` clean steps of the bf16 case:
interpret mode is slow) and compiled (`pallas`, all steps, GPU only).

bitsandbytes compiles its kernels with `--use_fast_math` (approximate
division and square root), so parameters and float states are compared
with bnb's own 32-bit test tolerance (rtol 1e-5, atol 1e-6) rather than bit
for bit, and absmax within `ABSMAX_RTOL`. Where bnb differs on purpose or by
a bug:

* the 1-state kernels (Lion, SGD, RMSprop, Adagrad) neither skip nor reset
  a NaN/Inf gradient element: its parameter becomes NaN/Inf (Lion: moves by
  lr) and its state is not reset. jaxbnb leaves it unchanged and resets its
  state as the 2-state kernel does. At the NaN step those cases compare
  every other element's parameter and the codes and absmax of every block
  without a non-finite gradient, and check that jaxbnb kept the non-finite
  elements' parameters (`ONE_STATE`).
* AdEMAMix8bit keeps both EMAs' absmax in one `[2, blocks]` tensor but
  writes and reads the slow EMA's block j at flat offset `floor(n / 256) + j`
  instead of `blocks + j` when n is not a multiple of 256: the slow EMA's
  block 0 and the fast EMA's last block share one float, whichever CUDA
  block writes last (the fixture shows both outcomes), and the last flat
  entry is never written. The test reads the slow row at bnb's offset
  (`_ademamix_absmax`), compares every other block's absmax, and leaves out
  the two racing blocks' parameters and codes after step 1 (their next
  step dequantizes with whichever value won). Format 1 compares step 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbnb
from jaxbnb import optim
from jaxbnb._src.optim import interop as optim_interop
from jaxbnb._src.optim import state as optim_state
from pallas_kernels import optim_8bit
from tests import helpers

FIXTURES = os.path.join(helpers.GOLDEN, "bnb_optim")
CASES = ("adam8bit", "adamw8bit", "lion8bit", "sgd8bit", "rmsprop8bit",
         "adagrad8bit", "ademamix8bit", "adamw32bit", "adamw8bit_bf16")
# bnb class -> jaxbnb alias
ALIASES = {"Adam8bit": "adam8bit", "AdamW8bit": "adamw8bit",
           "Lion8bit": "lion8bit", "SGD8bit": "sgd8bit",
           "RMSprop8bit": "rmsprop8bit", "Adagrad8bit": "adagrad8bit",
           "AdEMAMix8bit": "ademamix8bit", "AdamW": "adamw32bit"}
MAX_ULP = 1  # bfloat16 parameters
RTOL, ATOL = 1e-5, 1e-6  # float32: bnb's 32-bit test (atol for params only)
ABSMAX_RTOL = 1e-6
STATE_ATOL = 1e-9  # 32-bit states (Adam's second moment is ~1e-7)
MAX_CODE_DIFFS = 4
# Teacher forced, float32: the update p_k - p_{k-1} itself must match bnb's
# within 2 float32 ulp of p (bnb's final rounding of p, and ours, on either
# side of a midpoint) plus UPDATE_RTOL of the update. The parameter check
# (rtol 1e-5) alone lets a doubled weight decay through (lr * wd = 1e-5).
# UPDATE_RTOL is measured, not derived: bnb's fast-math division and square
# root put up to 1.24e-4 of the update on Adam-like rules (AdamW 32-bit,
# fixture format 1); 4e-4 leaves 3x. Half or double weight decay is 1e-2
# of the update at |p| = 1.
UPDATE_RTOL = 4e-4
KEY = "['w']"
BLOCK = 256
FORMAT_VERSION = 2  # what make_bnb_optim_golden.py writes now
REGENERATE = ("python tests/golden/make_bnb_optim_golden.py --out "
              "tests/golden/bnb_optim  (CUDA GPU, torch + bitsandbytes "
              "0.50.2)")
# Version 1: the NaN sits in the one trajectory at step 3, so the 1-state
# cases' clean comparison stops at step 2 (AdEMAMix: at step 1).
V1_COMPARED_STEPS = {"lion8bit": 2, "sgd8bit": 2, "rmsprop8bit": 2,
                     "adagrad8bit": 2, "ademamix8bit": 1}
V1_NAN_STEP = 3
V1_NAN_ELEMENTS = {"nan": [0, 0], "inf": [5, 7]}
ONE_STATE = ("lion8bit", "sgd8bit", "rmsprop8bit", "adagrad8bit")
# float32 cases whose compared steps reach the NaN step (not AdEMAMix).
NAN_CASES = tuple(c for c in CASES
                  if c not in ("adamw8bit_bf16", "ademamix8bit"))
KERNEL_CASES = tuple(c for c in CASES if c != "adamw32bit")  # 8-bit states
INTERPRET_STEPS = 3


def _load(name):
  path = os.path.join(FIXTURES, f"{name}.npz")
  if not os.path.exists(path):
    pytest.fail(
        f"missing fixture {path}: generate tests/golden/bnb_optim on a CUDA "
        "machine with torch + bitsandbytes 0.50.2: `python "
        "tests/golden/make_bnb_optim_golden.py --out tests/golden/bnb_optim`",
        pytrace=False)
  return np.load(path)


def _version(z) -> int:
  return int(z["format_version"]) if "format_version" in z else 1


def _case(name):
  z = _load(name)
  inputs = _load("inputs")
  version = _version(z)
  if version not in (1, FORMAT_VERSION) or _version(inputs) != version:
    pytest.fail(
        f"tests/golden/bnb_optim: {name}.npz has format {version}, "
        f"inputs.npz format {_version(inputs)}; this test reads 1 or "
        f"{FORMAT_VERSION} from one run of the generator. Regenerate all "
        f"fixtures: {REGENERATE}", pytrace=False)
  meta = json.loads(bytes(z["meta"]).decode())
  dt = meta["dtype"]
  p0 = helpers.golden_array(inputs[f"{dt}/p0"], dt)
  return z, meta, p0, inputs


@dataclasses.dataclass(frozen=True)
class Trajectory:
  """One bnb run: keys `{prefix}step<k>/...`, gradients, steps compared, and
  the step whose gradient holds NaN/Inf (None: all finite)."""
  prefix: str
  grads: np.ndarray
  steps: int
  nan_step: int | None = None
  bad: tuple = ()  # (row, col) of the non-finite gradient elements


def _trajectory(name, which):
  """("clean" | "nan") -> (z, meta, p0, Trajectory)."""
  z, meta, p0, inputs = _case(name)
  dt = meta["dtype"]
  grads = helpers.golden_array(inputs[f"{dt}/grads"], dt)
  if _version(z) == 1:
    if which == "clean":
      traj = Trajectory("", grads, V1_COMPARED_STEPS.get(name, meta["steps"]))
    else:
      traj = Trajectory("", grads[:V1_NAN_STEP], V1_NAN_STEP, V1_NAN_STEP,
                        tuple(map(tuple, V1_NAN_ELEMENTS.values())))
  elif which == "clean":
    traj = Trajectory("", grads, meta["steps"])
  else:
    assert meta["nan_steps"] > 0, f"{name}: no NaN trajectory in the fixture"
    traj = Trajectory("nan/", helpers.golden_array(inputs[f"{dt}/nan_grads"],
                                                   dt),
                      meta["nan_steps"], meta["nan_steps"],
                      tuple(map(tuple, meta["nan_elements"].values())))
  if which == "nan":
    assert np.all(np.isfinite(traj.grads[:traj.nan_step - 1]))
    assert all(not np.isfinite(traj.grads[traj.nan_step - 1][i])
               for i in traj.bad), (name, traj.bad)
  return z, meta, p0, traj


def _optimizer(meta):
  kw = dict(meta["kwargs"])
  if "lr" in kw:
    kw["learning_rate"] = kw.pop("lr")
  if "betas" in kw:
    for i, b in enumerate(kw.pop("betas")):
      kw[f"b{i + 1}"] = b
  return getattr(optim, ALIASES[meta["class"]])(**kw)


def _ulp_diff(a, b):
  """Distance in float ulp (NaNs equal to NaNs)."""
  a, b = np.asarray(a), np.asarray(b)
  ints = {2: np.int16, 4: np.int32}[a.dtype.itemsize]
  def ordered(x):
    i = x.view(ints).astype(np.int64)
    return np.where(i < 0, np.iinfo(ints).min - i, i)
  d = np.abs(ordered(a) - ordered(b.astype(a.dtype)))
  both_nan = np.isnan(a.astype(np.float32)) & np.isnan(b.astype(np.float32))
  return np.where(both_nan, 0, d)


def _assert_close_bits(what, actual, expected, rtol=RTOL, atol=0.0):
  actual = np.asarray(actual)
  if actual.dtype == np.float32:
    np.testing.assert_allclose(actual, np.asarray(expected), rtol=rtol,
                               atol=atol, err_msg=what)
    return
  d = _ulp_diff(actual, expected)
  bad = np.flatnonzero(d.reshape(-1) > MAX_ULP)
  assert bad.size == 0, (
      f"{what}: {bad.size} of {d.size} elements differ by more than "
      f"{MAX_ULP} ulp; first at {bad[:5]}: "
      f"{actual.reshape(-1)[bad[:5]]} vs {np.asarray(expected).reshape(-1)[bad[:5]]}")


def _assert_codes(what, actual, expected):
  a = np.asarray(actual).astype(np.int32)
  e = np.asarray(expected).astype(np.int32)
  assert a.shape == e.shape, (what, a.shape, e.shape)
  d = np.abs(a - e).reshape(-1)
  bad = np.flatnonzero(d)
  assert bad.size <= MAX_CODE_DIFFS and d.max(initial=0) <= 1, (
      f"{what}: {bad.size} codes differ (allowed {MAX_CODE_DIFFS}, by 1); "
      f"first at {bad[:5]}: {a.reshape(-1)[bad[:5]]} vs "
      f"{e.reshape(-1)[bad[:5]]}")


def _ademamix_absmax(flat_absmax: np.ndarray, n: int) -> np.ndarray:
  """bnb's AdEMAMix `[2, blocks]` absmax with the slow row read where bnb
  reads it (flat `n // 256 + j`); the last flat entry is never written."""
  a = np.asarray(flat_absmax)
  blocks = a.shape[-1]
  flat = a.reshape(-1)
  out = a.copy()
  out[1] = flat[n // BLOCK: n // BLOCK + blocks]
  return out


def _ademamix_racing_blocks(n: int) -> tuple[int, int]:
  """(fast block, slow block) sharing one absmax float in bnb; none when
  n is a multiple of 256."""
  blocks = -(-n // BLOCK)
  return () if n % BLOCK == 0 else (blocks - 1, 0)


def _export(state, params):
  return optim_interop.to_bnb_state_dict(state, params)[KEY]


def _compare_step(name, k, z, params, state, traj, prev_p, forced=False,
                  drift=None):
  """bnb's step k of `traj` against jaxbnb's `params`, `state`; `prev_p` is
  the parameter jaxbnb started the step from (`forced`: bnb's step k - 1).

  `drift` (free run only): a `Drift` of the elements whose codes left
  bnb's at an earlier step; updated with this step's."""
  pre = traj.prefix
  mine = _export(state, params)
  got_p = np.asarray(params["w"])
  want_p = helpers.golden_array(z[f"{pre}step{k}/p"], str(params["w"].dtype))
  keep_p = np.ones(got_p.shape, bool)
  keep_block = None  # all blocks
  racing = (_ademamix_racing_blocks(got_p.size)
            if name == "ademamix8bit" else ())
  if racing and k > 1:
    # bnb's slow/fast absmax race (module docstring): those blocks'
    # parameters and codes follow whichever absmax won.
    keep_block = np.ones(-(-got_p.size // BLOCK), bool)
    keep_block[list(racing)] = False
    keep_p = np.repeat(keep_block, BLOCK)[:got_p.size].reshape(got_p.shape)
  if k == traj.nan_step and name in ONE_STATE:
    # bnb's 1-state kernels neither skip nor reset a non-finite gradient
    # element; jaxbnb keeps its parameter (and resets its state).
    n_blocks = -(-got_p.size // BLOCK)
    keep_block = np.ones(n_blocks, bool)
    for i in traj.bad:
      keep_p[i] = False
      keep_block[np.ravel_multi_index(i, got_p.shape) // BLOCK] = False
      assert got_p[i] == np.asarray(prev_p)[i], (name, k, i, got_p[i])
  if drift is not None:
    drift.check(f"{name} {pre}step {k}", got_p, want_p)
    keep_p = keep_p & ~drift.elements
  _assert_close_bits(f"{name} {pre}step {k} params", got_p[keep_p],
                     want_p[keep_p], atol=ATOL)
  if forced and got_p.dtype == np.float32:
    # (bnb's 32-bit AdamW turns a NaN-gradient parameter into NaN, as
    # jaxbnb's 32-bit rule does: the check above saw both; skip them here.)
    keep_u = keep_p & np.isfinite(want_p)
    old = np.asarray(prev_p, np.float64)[keep_u]
    want_upd = want_p[keep_u].astype(np.float64) - old
    helpers.assert_within(
        got_p[keep_u].astype(np.float64) - old, want_upd,
        2 * helpers.ulp(np.abs(old) + np.abs(want_upd), np.float32)
        + UPDATE_RTOL * np.abs(want_upd),
        err_msg=f"{name} {pre}step {k} update")
  for key in ("state1", "state2"):
    if f"{pre}step{k}/{key}" not in z:
      assert key not in mine, (name, key)
      continue
    ref = z[f"{pre}step{k}/{key}"]
    got = np.asarray(mine[key])
    if drift is not None and ref.dtype == np.uint8:
      got, ref = drift.codes(got, ref, keep_block)
    elif keep_block is not None:
      n = got_p.size
      lead = got.shape[:got.ndim - got_p.ndim]
      elem = np.repeat(keep_block, BLOCK)[:n]
      got = got.reshape(lead + (n,))[..., elem]
      ref = ref.reshape(lead + (n,))[..., elem]
    if ref.dtype == np.uint8:
      _assert_codes(f"{name} {pre}step {k} {key}", got, ref)
    else:  # 32-bit states: tiny values, so a tiny absolute floor
      _assert_close_bits(f"{name} {pre}step {k} {key}", got, ref,
                         atol=STATE_ATOL)
  for key in ("absmax1", "absmax2"):
    if f"{pre}step{k}/{key}" in z:
      got, want = np.asarray(mine[key]), z[f"{pre}step{k}/{key}"]
      if name == "ademamix8bit" and key == "absmax1" and racing:
        want = _ademamix_absmax(want, got_p.size)
        keep = np.ones(got.shape, bool)  # every block but the racing two
        keep[0, racing[0]] = keep[1, racing[1]] = False
        got, want = got[keep], want[keep]
      elif keep_block is not None:
        got, want = got[..., keep_block], want[..., keep_block]
      _assert_close_bits(f"{name} {pre}step {k} {key}", got, want,
                         rtol=ABSMAX_RTOL)


def _step_fn(opt):
  @jax.jit
  def step(params, state, g):
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state
  return step


def _bnb_state(z, k, prefix, name, n):
  entry = {"step": k}
  for key in ("state1", "state2", "absmax1", "absmax2"):
    if f"{prefix}step{k}/{key}" in z:
      entry[key] = z[f"{prefix}step{k}/{key}"]
  if name == "ademamix8bit" and _ademamix_racing_blocks(n):
    # bnb reads the slow row where it wrote it (the racing blocks are
    # excluded from the comparison).
    entry["absmax1"] = _ademamix_absmax(entry["absmax1"], n)
  for key in ("qmap1", "qmap2"):
    if key in z:
      entry[key] = z[key]
  return {KEY: entry}


def _mode(mode):
  return (contextlib.nullcontext() if mode is None
          else jaxbnb.kernel_mode(mode))


def _teacher_forced(name, which, mode=None, max_steps=None):
  z, meta, p0, traj = _trajectory(name, which)
  steps = min(traj.steps, max_steps or traj.steps)
  with _mode(mode):
    opt = _optimizer(meta)
    step = _step_fn(opt)
    template = opt.init({"w": jnp.asarray(p0)})
    for k in range(1, steps + 1):
      if k == 1:
        params, state = {"w": jnp.asarray(p0)}, template
      else:
        prev = helpers.golden_array(z[f"{traj.prefix}step{k - 1}/p"],
                                    meta["dtype"])
        params = {"w": jnp.asarray(prev)}
        state = optim_interop.from_bnb_state_dict(
            _bnb_state(z, k - 1, traj.prefix, name, p0.size), params,
            template)
      prev_p = params["w"]
      params, state = step(params, state,
                           {"w": jnp.asarray(traj.grads[k - 1])})
      _compare_step(name, k, z, params, state, traj, prev_p, forced=True)
  return steps


class Drift:
  """Free run: the elements whose 8-bit codes left bnb's.

  An element whose code differed from bnb's by one (allowed, up to
  MAX_CODE_DIFFS per tensor and step) dequantizes a different state from
  then on, so its trajectory is its own: its codes are no longer compared
  and its parameter may differ from bnb's by at most the summed magnitude
  of both trajectories' updates since then (two paths from one point).
  Every other element stays under the tight checks.
  """

  def __init__(self, p0):
    self.elements = np.zeros(np.shape(p0), bool)
    self.bound = np.zeros(np.shape(p0), np.float64)
    self.prev_got = np.asarray(p0, np.float64)
    self.prev_want = np.asarray(p0, np.float64)

  def check(self, what, got_p, want_p):
    got, want = np.asarray(got_p, np.float64), np.asarray(want_p, np.float64)
    self.bound += np.where(self.elements, np.abs(got - self.prev_got)
                           + np.abs(want - self.prev_want), 0.0)
    self.prev_got, self.prev_want = got, want
    e = self.elements
    assert np.all(np.abs(got - want)[e] <= self.bound[e] + ATOL), (
        f"{what}: a drifted parameter moved beyond both trajectories' "
        f"updates: {np.abs(got - want)[e]} > {self.bound[e]}")

  def codes(self, got, ref, keep_block):
    """Drops drifted elements; marks this step's differing ones."""
    n = self.elements.size
    lead = got.shape[:got.ndim - self.elements.ndim]
    got = np.asarray(got).reshape(lead + (n,))
    ref = np.asarray(ref).reshape(lead + (n,))
    keep = ~self.elements.reshape(-1)
    if keep_block is not None:
      keep &= np.repeat(keep_block, BLOCK)[:n]
    differ = np.any(got != ref, axis=tuple(range(len(lead)))) & keep
    self.elements |= differ.reshape(self.elements.shape)
    return got[..., keep], ref[..., keep]


def _free_run(name, which, mode=None, max_steps=None):
  z, meta, p0, traj = _trajectory(name, which)
  steps = min(traj.steps, max_steps or traj.steps)
  with _mode(mode):
    opt = _optimizer(meta)
    step = _step_fn(opt)
    params = {"w": jnp.asarray(p0)}
    state = opt.init(params)
    drift = Drift(p0)
    for k in range(1, steps + 1):
      prev_p = params["w"]
      params, state = step(params, state,
                           {"w": jnp.asarray(traj.grads[k - 1])})
      _compare_step(name, k, z, params, state, traj, prev_p, drift=drift)
  return steps


@pytest.mark.parametrize("name", CASES)
def test_step_by_step_from_imported_bnb_state(name):
  _teacher_forced(name, "clean", "reference")


@pytest.mark.parametrize("name", CASES)
def test_free_run_tracks_bnb(name):
  _free_run(name, "clean", "reference")


@pytest.mark.parametrize("name", NAN_CASES)
def test_nan_trajectory_step_by_step(name):
  _teacher_forced(name, "nan", "reference")


@pytest.mark.parametrize("name", NAN_CASES)
def test_nan_trajectory_free_run(name):
  _free_run(name, "nan", "reference")


def _spy_kernel(monkeypatch):
  """Records each (trace-time) call of the fused optimizer kernel."""
  calls = []
  real = optim_8bit.optimizer_update_8bit

  def spy(*args, **kwargs):
    calls.append(kwargs.get("kind"))
    return real(*args, **kwargs)
  monkeypatch.setattr(optim_8bit, "optimizer_update_8bit", spy)
  return calls


@pytest.mark.parametrize("name", KERNEL_CASES)
def test_fused_kernel_interpret_matches_bnb(name, monkeypatch):
  """The fused Pallas kernel (interpret mode, CPU) on bnb's trajectory: the
  NaN trajectory (clean steps, then the NaN/Inf step) of the float32 cases,
  the first clean steps of the bf16 one (interpret mode is slow)."""
  calls = _spy_kernel(monkeypatch)
  which = "nan" if name in NAN_CASES else "clean"
  assert _teacher_forced(name, which, "interpret", INTERPRET_STEPS) >= 1
  # Interpret mode falls back to the reference silently: the kernel must
  # have been traced (once per jit trace: one step function per test).
  assert calls, f"{name}: the fused kernel was not used"


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["clean", "nan"])
@pytest.mark.parametrize("name", KERNEL_CASES)
def test_fused_kernel_pallas_matches_bnb(name, which, monkeypatch):
  """The compiled kernel ("pallas" mode: raises rather than fall back) on
  every step of both trajectories, teacher forced and free running."""
  if which == "nan" and name not in NAN_CASES:
    which = "clean"
  calls = _spy_kernel(monkeypatch)
  _teacher_forced(name, which, "pallas")
  assert calls, f"{name}: the fused kernel was not used"
  _free_run(name, which, "pallas")


@pytest.mark.parametrize("name", CASES)
def test_maps_and_state_dict_layout_match_bnb(name):
  z, meta, p0, _ = _case(name)
  for key, table in (("qmap1", optim_state.signed_map()),
                     ("qmap2", optim_state.unsigned_map())):
    if key in z:
      helpers.assert_bits_equal(table, z[key], err_msg=key)
  opt = _optimizer(meta)
  params = {"w": jnp.asarray(p0)}
  sd = optim_interop.to_torch_state_dict(opt.init(params), params)

  def layout(v):
    if isinstance(v, dict):
      return {str(k): layout(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
      return f"tensor:{v.dtype.name}:{list(v.shape)}"
    return type(v).__name__
  bnb = meta["state_dict"]["state"]["0"]
  bnb = {k: (v if isinstance(v, dict) else type(v).__name__)
         for k, v in bnb.items()}
  assert layout(sd["state"][0]) == bnb
