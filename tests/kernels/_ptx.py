"""A small PTX emulator for the inline-PTX blocks of the Mosaic GPU GEMVs.

Runs a block for every thread of a program at once (registers are numpy
arrays over the threads; the blocks are branch-free, predicated), with
shared memory as a byte array and global memory as named arrays at fake
addresses. It knows the instructions `gemv_4bit_lut` and
`gemv_4bit_warp_tma` write (the warp's `mma.sync` over each warp's 32
lanes) and raises on any other, so the CPU tests run the very text the
GPU assembles.
"""

from __future__ import annotations

import re

import numpy as np

from pallas_kernels import gemv_4bit_lut

_U32 = np.uint32
_MASK = (1 << 32) - 1


def _f32(bits):
  return np.asarray(bits, np.uint64).astype(np.uint32).view(np.float32)


def _bits(f):
  return np.asarray(f, np.float32).view(np.uint32).astype(np.uint64)


def _halves(v, kind):
  """Two packed 16-bit values (`kind` "bf16" or "f16") as float32 (low,
  high)."""
  v = np.asarray(v, np.uint64)
  lo = (v & np.uint64(0xFFFF)).astype(np.uint16)
  hi = ((v >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.uint16)
  if kind == "f16":
    return lo.view(np.float16).astype(np.float32), hi.view(
        np.float16).astype(np.float32)
  return ((lo.astype(np.uint32) << 16).view(np.float32),
          (hi.astype(np.uint32) << 16).view(np.float32))


def _to16(f, kind):
  """float32 -> 16-bit bits, rounded to nearest even."""
  f = np.asarray(f, np.float32)
  if kind == "f16":
    with np.errstate(over="ignore"):  # past f16's range: inf, as cvt.rn
      return f.astype(np.float16).view(np.uint16).astype(np.uint64)
  b = f.view(np.uint32).astype(np.uint64)
  return ((b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1)))
          >> np.uint64(16)) & np.uint64(0xFFFF)


def _pack(lo, hi, kind):
  return _to16(lo, kind) | (_to16(hi, kind) << np.uint64(16))


def _regs(tok):
  return [r.strip() for r in tok.strip()[1:-1].split(",")]


class Machine:
  """Shared memory, global arrays and the special registers of a program."""

  def __init__(self, threads: int, smem_bytes: int, ctaid: tuple[int, int]):
    self.threads = threads
    self.smem = np.zeros(smem_bytes, np.uint8)
    self.ctaid = ctaid  # (x, y)
    self.globals: dict[int, np.ndarray] = {}  # base address -> byte view
    self.ways: dict[str, int] = {}  # shared access -> bank conflict ways

  def count_ways(self, instruction: str, addr, pred, size: int = 4) -> None:
    """Records in `ways[instruction]` the most lanes of one warp that this
    shared access sends to one bank with different words (1: no bank
    conflict; lanes reading one word share it). An 8- or 16-byte access
    (`size`) is served a half or a quarter of the warp at a time."""
    start = np.asarray(addr, np.int64) // 4
    lanes = 32 if size <= 4 else 128 // size
    most = self.ways.get(instruction, 1)
    for w in range(0, self.threads, lanes):
      on = pred[w:w + lanes]
      if not on.any():
        continue
      words = start[w:w + lanes][on][:, None] + np.arange(max(1, size // 4))
      distinct = np.unique(words)
      most = max(most, int(np.bincount(distinct % 32).max()))
    self.ways[instruction] = most

  def add_global(self, base: int, array: np.ndarray) -> int:
    self.globals[base] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    return base

  def _global(self, addr, size):
    out = []
    for a in np.asarray(addr, np.uint64).tolist():
      base = max(b for b in self.globals if b <= a)
      buf = self.globals[base]
      off = a - base
      if off + size > buf.size:
        raise IndexError(f"global access past the array at {base}: {off}")
      out.append((buf, off))
    return out

  def load(self, space, addr, size, pred):
    vals = np.zeros(self.threads, np.uint64)
    if space == "shared":
      idx = np.asarray(addr, np.int64)[pred]
      if idx.size and idx.max() + size > self.smem.size:
        raise IndexError(f"shared load past the end: {idx.max()}")
      got = np.zeros(idx.size, np.uint64)
      for b in range(size):
        got |= self.smem[idx + b].astype(np.uint64) << np.uint64(8 * b)
      vals[pred] = got
      return vals
    for t in np.nonzero(pred)[0]:
      a = int(addr[t])
      if space == "shared":
        if a + size > self.smem.size:
          raise IndexError(f"shared load past the end: {a}")
        raw = self.smem[a:a + size]
      else:
        [(buf, off)] = self._global([a], size)
        raw = buf[off:off + size]
      vals[t] = int.from_bytes(raw.tobytes(), "little")
    return vals

  def store(self, space, addr, size, vals, pred):
    if space == "shared":
      idx = np.asarray(addr, np.int64)[pred]
      if idx.size and idx.max() + size > self.smem.size:
        raise IndexError(f"shared store past the end: {idx.max()}")
      v = np.asarray(vals, np.uint64)[pred]
      for b in range(size):
        self.smem[idx + b] = ((v >> np.uint64(8 * b)) & np.uint64(0xFF)
                              ).astype(np.uint8)
      return
    for t in np.nonzero(pred)[0]:
      a = int(addr[t])
      raw = np.frombuffer(int(vals[t]).to_bytes(8, "little")[:size], np.uint8)
      if space == "shared":
        if a + size > self.smem.size:
          raise IndexError(f"shared store past the end: {a}")
        self.smem[a:a + size] = raw
      else:
        [(buf, off)] = self._global([a], size)
        buf[off:off + size] = raw


def _imm(tok):
  if tok.startswith("0f"):
    return int(tok[2:], 16)
  return int(tok, 0)


def run(text: str, machine: Machine, operands: dict[int, int]) -> np.ndarray:
  """Runs the block `text` with `$i` bound to `operands[i]` (all threads);
  returns the instructions each thread executed. A branch (`bra`, forward
  only) parks its threads until its label."""
  n = machine.threads
  tid = np.arange(n, dtype=np.uint64)
  regs: dict[str, np.ndarray] = {}
  preds: dict[str, np.ndarray] = {}
  active = np.ones(n, bool)
  parked: dict[str, np.ndarray] = {}
  executed = np.zeros(n, np.int64)

  def val(tok):
    tok = tok.strip()
    if tok.startswith("$"):
      return np.full(n, operands[int(tok[1:])], np.uint64)
    if tok == "%tid.x":
      return tid.copy()
    if tok == "%ctaid.x":
      return np.full(n, machine.ctaid[0], np.uint64)
    if tok == "%ctaid.y":
      return np.full(n, machine.ctaid[1], np.uint64)
    if re.fullmatch(r"-?(0x[0-9a-fA-F]+|0f[0-9A-F]{8}|\d+)", tok):
      return np.full(n, _imm(tok) & ((1 << 64) - 1), np.uint64)
    return regs[tok]

  def addr(tok):
    m = re.fullmatch(r"\[([^\]+]+)(?:\+(\d+))?\]", tok.strip())
    base = val(m.group(1))
    return base + np.uint64(int(m.group(2) or 0))

  for raw in text.splitlines():
    line = raw.strip().rstrip(";")
    if not line or line in "{}" or line.startswith(".reg"):
      continue
    if line.endswith(":"):  # a label: its parked threads go on
      active |= parked.pop(line[:-1], np.zeros(n, bool))
      continue
    executed += active
    pred = active.copy()
    m = re.match(r"@(!?)(\w+)\s+(.*)", line)
    if m:
      pred &= ~preds[m.group(2)] if m.group(1) else preds[m.group(2)]
      line = m.group(3)
    op, _, rest = line.partition(" ")
    if op == "bra":
      parked[rest.strip()] = parked.get(rest.strip(), np.zeros(n, bool)) | pred
      active &= ~pred
      continue
    args = [a.strip() for a in re.split(r",(?![^{]*\})", rest)] if rest else []

    def put(name, value, pred=pred):
      old = regs.get(name, np.zeros(n, np.uint64))
      regs[name] = np.where(pred, np.asarray(value, np.uint64), old)

    parts = op.split(".")
    base = parts[0]
    if base in ("bar", "fence"):  # every thread runs each line in turn
      continue
    if base == "mov" and args[0].startswith("{"):
      lo, hi = [r.strip() for r in args[0][1:-1].split(",")]
      v = val(args[1])
      put(lo, v & 0xFFFF)
      put(hi, (v >> 16) & 0xFFFF)
    elif base == "mov":
      put(args[0], val(args[1]))
    elif op == "cvta.to.global.u64":
      put(args[0], val(args[1]))
    elif op == "and.pred":
      old = preds.get(args[0], np.zeros(n, bool))
      preds[args[0]] = np.where(pred, preds[args[1]] & preds[args[2]], old)
    elif base in ("and", "or", "shr", "shl", "add", "sub", "min", "rem"
                  ) and parts[1] in ("b32", "u32", "u64"):
      a, b = val(args[1]), val(args[2])
      width = (1 << 64) - 1 if parts[1] == "u64" else _MASK
      res = {"and": lambda: a & b, "or": lambda: a | b, "shr": lambda: a >> b,
             "shl": lambda: a << b, "add": lambda: a + b,
             "sub": lambda: a - b, "min": lambda: np.minimum(a, b),
             "rem": lambda: a % b}[base]()
      put(args[0], res & np.uint64(width))
    elif op == "mul.lo.u32":
      put(args[0], (val(args[1]) * val(args[2])) & np.uint64(_MASK))
    elif op == "mad.lo.u32":
      put(args[0], (val(args[1]) * val(args[2]) + val(args[3]))
          & np.uint64(_MASK))
    elif op == "mul.wide.u32":
      put(args[0], val(args[1]) * val(args[2]))
    elif op == "prmt.b32":
      a, b, sel = val(args[1]), val(args[2]), val(args[3])
      both = a | (b << np.uint64(32))
      res = np.zeros(n, np.uint64)
      for i in range(4):
        s = (sel >> np.uint64(4 * i)) & np.uint64(7)
        res |= ((both >> (np.uint64(8) * s)) & np.uint64(0xFF)) << np.uint64(
            8 * i)
      put(args[0], res)
    elif base == "setp":
      a, b = val(args[1]), val(args[2])
      cmp = {"eq": a == b, "ne": a != b, "lt": a < b, "ge": a >= b}[parts[1]]
      old = preds.get(args[0], np.zeros(n, bool))
      preds[args[0]] = np.where(pred, cmp, old)
    elif op == "selp.f32":
      put(args[0], np.where(preds[args[3]], val(args[1]), val(args[2])))
    elif op == "shfl.sync.bfly.b32":
      v = val(args[1])
      lane = tid & np.uint64(31)
      src = (tid - lane) + (lane ^ val(args[2]))
      put(args[0], v[src.astype(np.int64)])
    elif base in ("add", "mul") and parts[-1] == "f32":
      a, b = _f32(val(args[1])), _f32(val(args[2]))
      put(args[0], _bits(a + b if base == "add" else a * b))
    elif op == "cvt.f32.f16":
      put(args[0], _bits(val(args[1]).astype(np.uint16).view(np.float16)
                         .astype(np.float32)))
    elif op == "cvt.f32.bf16":
      put(args[0], (val(args[1]) & np.uint64(0xFFFF)) << np.uint64(16))
    elif op in ("cvt.rn.bf16.f32", "cvt.rn.f16.f32"):
      put(args[0], _to16(_f32(val(args[1])), parts[2]))
    elif op == "ex2.approx.ftz.f32":  # the hardware's is within 2 ulp
      with np.errstate(over="ignore"):
        put(args[0], _bits(np.exp2(_f32(val(args[1])))))
    elif op == "fma.rn.f32":  # one rounding: the float64 sum of an exact
      a, b, c = (_f32(val(t)).astype(np.float64) for t in args[1:4])
      put(args[0], _bits((a * b + c).astype(np.float32)))
    elif op == "div.rn.f32":
      with np.errstate(divide="ignore", invalid="ignore"):
        put(args[0], _bits(_f32(val(args[1])) / _f32(val(args[2]))))
    elif op == "rsqrt.approx.f32":  # the hardware's is within 2 ulp
      with np.errstate(divide="ignore", invalid="ignore"):
        put(args[0], _bits(np.float32(1) / np.sqrt(_f32(val(args[1])))))
    elif op == "rcp.rn.f32":
      with np.errstate(divide="ignore"):
        put(args[0], _bits(np.float32(1) / _f32(val(args[1]))))
    elif base == "cvt" and parts[-2] in ("bf16x2", "f16x2"):
      kind = parts[-2][:-2]
      hi, lo = _f32(val(args[1])), _f32(val(args[2]))
      put(args[0], _pack(lo, hi, kind))
    elif base == "fma" and parts[-1] in ("bf16x2", "f16x2"):
      kind = parts[-1][:-2]
      (alo, ahi), (blo, bhi), (clo, chi) = (_halves(val(a), kind)
                                            for a in args[1:4])
      put(args[0], _pack(alo * blo + clo, ahi * bhi + chi, kind))
    elif base == "mma":  # m16n8k16, A row-major, B column-major, fp32 C/D
      assert "m16n8k16" in parts and parts[-1] == "f32", raw
      kind = parts[-3]
      d, a, b, c = (_regs(t) for t in args)
      av = [_halves(val(r), kind) for r in a]
      bv = [_halves(val(r), kind) for r in b]
      cv = [_f32(val(r)) for r in c]
      out = [np.zeros(n, np.uint64) for _ in range(4)]
      for w in range(0, n, 32):
        lanes = np.arange(w, w + 32)
        g, q = (lanes - w) >> 2, (lanes - w) & 3
        am = np.zeros((16, 16), np.float64)
        bm = np.zeros((16, 8), np.float64)
        cm = np.zeros((16, 8), np.float64)
        for j, (row, col) in enumerate(((g, 2 * q), (g + 8, 2 * q),
                                        (g, 2 * q + 8), (g + 8, 2 * q + 8))):
          am[row, col] = av[j][0][lanes]
          am[row, col + 1] = av[j][1][lanes]
        for j, kk in enumerate((2 * q, 2 * q + 8)):
          bm[kk, g] = bv[j][0][lanes]
          bm[kk + 1, g] = bv[j][1][lanes]
        for j, (row, col) in enumerate(((g, 2 * q), (g, 2 * q + 1),
                                        (g + 8, 2 * q), (g + 8, 2 * q + 1))):
          cm[row, col] = cv[j][lanes]
        dm = (am @ bm + cm).astype(np.float32)
        for j, (row, col) in enumerate(((g, 2 * q), (g, 2 * q + 1),
                                        (g + 8, 2 * q), (g + 8, 2 * q + 1))):
          out[j][lanes] = _bits(dm[row, col])
      for r, v in zip(d, out):
        put(r, v)
    elif base in ("ld", "st") and parts[-2] in ("v2", "v4"):
      space = parts[1]
      regs4 = _regs(args[0] if base == "ld" else args[1])
      where = addr(args[1] if base == "ld" else args[0])
      if space == "shared":
        machine.count_ways(raw.strip(), where, pred, 4 * len(regs4))
      for j, r in enumerate(regs4):
        at = where + np.uint64(4 * j)
        if base == "ld":
          put(r, machine.load(space, at, 4, pred))
        else:
          machine.store(space, at, 4, val(r), pred)
    elif base in ("ld", "st"):
      space = parts[1]
      size = {"u8": 1, "u32": 4, "b32": 4, "f32": 4}[parts[-1]]
      where = addr(args[1] if base == "ld" else args[0])
      if space == "shared":
        machine.count_ways(raw.strip(), where, pred)
      if base == "ld":
        put(args[0], machine.load(space, where, size, pred))
      else:
        machine.store(space, where, size, val(args[1]), pred)
    else:
      raise NotImplementedError(f"PTX op not emulated: {raw.strip()}")
  if parked:
    raise ValueError(f"branch to a label the block lacks: {sorted(parked)}")
  return executed


def run_pipeline(x, weights, ns, k, plan, span, tile_rows, wgs, own_bytes,
                 out, texts, on_program=None, kchunks=1,
                 acc_bytes=0, norm_weight=None) -> None:
  """Every program of the Mosaic GPU GEMVs' pipeline
  (`gemv_4bit_lut.pipelines`) over a group of weights `(packed, qs)`:
  the build block, then each step with its TMA tiles written into shared
  memory (rows past the weight zero, as TMA fills them). The kernel's own
  scratch buffer (`own_bytes`) comes first in shared memory, then the
  nested table, the span, the step counters and the two tiles; x, the
  nested codes and absmax, `out` and the offset are global arrays.

  `texts(n, steps, group0, row0, n_nested)` gives a weight's (build,
  step) PTX; `on_program(machine, executed)`, if given, sees each program
  after its steps with the build's executed counts. `out` is written in
  place. With `kchunks` > 1 a program takes that many K chunks in turn
  for each row tile (`gemv_4bit_warp_tma`), its step PTX getting a
  scratch buffer of `acc_bytes` after the codes tile as `$6` and `out`
  as `$7`. `norm_weight` (an RMSNorm's, `gemv_4bit_lut.NormInput`) is
  the build's `$8`."""
  c2_ = own_bytes
  sp_ = c2_ + 2048
  cnt_ = sp_ + 4 * span
  w_ = cnt_ + 512 * wgs
  cd_ = w_ + tile_rows * 128
  acc_ = cd_ + tile_rows * 16
  for (packed, qs), n, (r, steps, _, _, group0, row0) in zip(weights, ns,
                                                           plan):
    tiles = -(-n // tile_rows)
    nested = np.asarray(qs.nested_absmax, np.float32)
    table = np.asarray(qs.nested_code, np.float32)
    offset = np.asarray(qs.offset, np.float32).reshape(1)
    w2 = np.zeros((tiles * tile_rows, k // 2), np.uint8)
    w2[:n] = np.asarray(packed).reshape(n, k // 2)
    # The codes as the kernels hand them to TMA (rows padded to 16 bytes
    # where k is not a multiple of 1024).
    rows = np.asarray(gemv_4bit_lut.codes_tiles(qs.absmax, n, k))
    c2 = np.zeros((tiles * tile_rows, rows.shape[1]), np.uint8)
    c2[:n] = rows
    bptx, sptx = texts(n, steps, group0, row0, nested.shape[0])
    for i in range(group0, group0 + r):
      for s in range(k // 256 // kchunks):
        m = Machine(128 * (wgs + (wgs > 1)), acc_ + acc_bytes, (s, i))
        xg = m.add_global(1 << 40, np.asarray(x).view(np.uint16).reshape(-1))
        ng = m.add_global(2 << 40, table)
        sg = m.add_global(3 << 40, nested)
        og = m.add_global(4 << 40, out)
        fg = m.add_global(5 << 40, offset)
        operands = {0: 0, 1: c2_, 2: sp_, 3: cnt_, 4: xg, 5: ng, 6: sg,
                    7: fg}
        if norm_weight is not None:
          operands[8] = m.add_global(6 << 40, np.asarray(norm_weight).view(
              np.uint16).reshape(-1))
        count = run(bptx, m, operands)
        m.threads = 128 * wgs
        for t in range(steps * kchunks):
          q = min((i - group0) * steps + t // kchunks,
                  tiles - 1) * tile_rows
          chunk = s * kchunks + t % kchunks
          m.smem[w_:w_ + tile_rows * 128] = w2[
              q:q + tile_rows, 128 * chunk:128 * chunk + 128].reshape(-1)
          c = 16 * (chunk // 4)
          m.smem[cd_:cd_ + tile_rows * 16] = c2[q:q + tile_rows,
                                                c:c + 16].reshape(-1)
          ops = {0: w_, 1: cd_, 2: 0, 3: c2_, 4: sp_, 5: cnt_, 6: og}
          if kchunks > 1:
            ops.update({6: acc_, 7: og})
          run(sptx, m, ops)
        if on_program is not None:
          on_program(m, count)
