"""The 4-bit wgmma GEMM (`pallas_kernels.gemm_4bit_wgmma`) at M = 64-256,
against the package's path and XLA's bf16 dot (docs/benchmarks.md,
thirteenth and fourteenth sessions; run on the GPU).

    python docs/bench/gemm_wgmma_sweep.py 300 e   # time budget (s), run

NF4 + DQ, bf16. Each configuration (tile_w, tile_x, tile_k, split, stages,
variant) is timed with `measure.time_jax` over three rotating weights, the nested
absmax decoded in the timed function (as a caller pays it), and compared
with `x @ dequantize(W).T`. One JSON line per (shape, M) goes to
$OUT/gemm_wgmma_sweep.jsonl. The first case is a small one, checked only.

The thirteenth session's table is the third recorded run (`..._c.jsonl`).
The first (`..._a.jsonl`) timed "plain" tiles only; the second
(`..._b_async.jsonl`) also an "async" variant and "ws" with the wgmma
wait deferred one step, which returned wrong products and were removed
from the kernel. The fourteenth session's run d (`2026-12-03_h200_d`)
compares the in-kernel store of `y` with the old `y.T` ("old") and times
the "ks" variant and x tiles of 16 and 32 rows (`RUNS` below); run f
(`2026-12-03_h200_f`) the multicast of x to clusters. Run e is defined
but was not run (the GPU machine was refused that session). The
fifteenth session's run g times the swizzled weight tile and the table
words from memory ("sw", "lt"), run h the steps decoded in overlapped
parts ("ov"), run i the defaults chosen from them (not run: no device
time was left), run j more programs a weight (run in the sixteenth
session). Run k (sixteenth session): the nested statistics decoded in the
kernel ("dq"); run l (defined, not run): their scale words made a step
ahead ("pf"; run in the seventeenth session). Run m (seventeenth
session): K splits with the statistics on 4096-row weights; run n: the
same at M = 256 in x tiles of 128 rows. Run o (twenty-second session):
M = 256 with 64-column steps and K splits on the weights of 4096 and 11008
rows, and splits of 8 on 1024-row weights; run p: "ks" there with two
steps in flight (the float32 sums meeting in the output tile). Run q
(twenty-third session): M = 256 on weights of 6144 and 8192 rows, and
K splits at M = 128 on 6144-14336 rows; run r: M = 256 on 3072-9216
rows after run q's routing, and run q's M = 128 cases its budget cut;
run s: one wave of K splits at M = 64 and 128 on 6144 and 3072 rows.
Run t (forty-sixth session): M = 512-4096, past the kernel's routing;
run u (defined, not run): K splits and 128-row x tiles where run t's
config leaves SMs idle. Run v (forty-seventh session): "ks" unsplit, x's
128-row tiles and K splits at M = 256 on Qwen2.5-7B's and Llama-3-70B's
weights; run w (forty-ninth session): a thin last wave's rows as a tail
launch with K split (`gemm`'s `tail_rows`); run x (forty-ninth
session): K splits on Qwen2.5-7B's K = 3584 weights, which the GEMM
did not take before it. Runs y and z: K splits on
K = 3072 and 2048 weights (Llama-3.2-3B, -1B, TinyLlama), and on
512-row weights (both run in the fiftieth session, with aa and ab). Run
ac (fifty-first session): splits that are not powers of two on K = 2304.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from gemv_sweep import baseline, checked, each_case, record  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxbnb import functional as F  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxbnb._src.quant import codebooks, ops  # pylint: disable=g-import-not-at-top,wrong-import-position
from pallas_kernels import gemm_4bit_wgmma as gw  # pylint: disable=g-import-not-at-top,wrong-import-position

CODE = tuple(float(c) for c in codebooks.code_for("nf4"))
# (tile_w, tile_x, tile_k, split, stages, variant[, "old" | "cN"]): "old"
# stores y.T for XLA to transpose, as the kernel did before the fourteenth
# session; "c2", "c4": clusters of 2 or 4 programs sharing x's tile.
# Runs y and z: K split 1, 2 and 4 ways in the variants `_split_config`
# picks at each M (every K there is a multiple of 256).
_SHORT_K_TILES = {
    64: [(64, 64, 128, 2, 2, "ks", "dqswlt"),
         (64, 64, 256, 1, 2, "ks", "dqswlt"),
         (64, 64, 64, 4, 2, "ks", "dqswlt")],
    128: [(64, 128, 128, 2, 2, "ks", "dqlt"),
          (64, 128, 64, 4, 2, "ks", "dqlt"),
          (64, 128, 128, 2, 3, "ws", "dqlt")],
    256: [(64, 256, 128, 2, 2, "plain", "dqpf"),
          (64, 256, 128, 1, 2, "plain", "dqpf"),
          (64, 256, 64, 4, 2, "ks", "dqlt")]}

RUNS = {
    # d: the in-kernel transposed store against "old", and the "ks"
    # variant, on the served shapes and a few below them.
    "d": ([((256, 1024), 96), ((14336, 4096), 64), ((14336, 4096), 16),
           ((14336, 4096), 128), ((14336, 4096), 256), ((11008, 4096), 256),
           ((4096, 4096), 64), ((4096, 14336), 64), ((4096, 4096), 16),
           ((11008, 4096), 64), ((6144, 4096), 128), ((4096, 14336), 16)],
          {256: [(64, 256, 64, 1, 4, "ws", "old"), (64, 256, 64, 1, 4, "ws"),
                 (64, 256, 128, 1, 2, "ws"), (64, 128, 64, 1, 2, "ks")],
           128: [(64, 128, 128, 1, 3, "ws", "old"), (64, 128, 128, 1, 3, "ws"),
                 (64, 128, 64, 1, 2, "ks"), (64, 128, 64, 1, 3, "ks"),
                 (64, 64, 128, 1, 2, "ks")],
           64: [(64, 64, 128, 1, 4, "plain", "old"),
                (64, 64, 128, 1, 4, "plain"), (64, 64, 128, 1, 2, "ks"),
                (64, 64, 64, 1, 3, "ks"), (64, 64, 64, 1, 4, "ks"),
                (64, 64, 64, 2, 3, "plain")],
           16: [(64, 16, 128, 1, 4, "plain"), (64, 16, 128, 1, 2, "ks"),
                (64, 16, 64, 1, 4, "ks"), (64, 16, 128, 1, 3, "ks"),
                (64, 32, 128, 1, 3, "ks")]}),
    # e: "ks" on the weights of fewer rows, where "ws" leaves SMs idle,
    # and x's tile multicast to clusters of 2 and 4 programs.
    "e": ([((256, 1024), 96), ((14336, 4096), 256), ((6144, 4096), 128),
           ((4096, 4096), 128), ((14336, 4096), 128), ((11008, 4096), 256),
           ((6144, 4096), 64), ((6144, 4096), 256), ((4096, 4096), 256),
           ((11008, 4096), 128), ((4096, 14336), 128), ((14336, 4096), 64)],
          {256: [(64, 256, 64, 1, 4, "ws"), (64, 256, 64, 1, 4, "ws", "c2"),
                 (64, 256, 64, 1, 4, "ws", "c4"), (64, 128, 64, 1, 2, "ks"),
                 (64, 128, 64, 1, 2, "ks", "c2"), (64, 192, 64, 1, 2, "ks")],
           128: [(64, 128, 128, 1, 3, "ws"), (64, 128, 128, 1, 3, "ws", "c2"),
                 (64, 128, 64, 1, 3, "ks"), (64, 128, 64, 1, 3, "ks", "c2"),
                 (64, 128, 64, 1, 2, "ks"), (64, 128, 128, 1, 2, "ks")],
           64: [(64, 64, 128, 1, 4, "plain"), (64, 64, 128, 1, 2, "ks"),
                (64, 64, 128, 1, 2, "ks", "c2"), (64, 64, 64, 1, 3, "ks"),
                (64, 64, 128, 1, 4, "ws", "c2")]}),
    # f: run e's multicast cases alone (a short device call).
    "f": ([((14336, 4096), 256), ((14336, 4096), 128)],
          {256: [(64, 256, 64, 1, 4, "ws"), (64, 256, 64, 1, 4, "ws", "c2"),
                 (64, 256, 64, 1, 4, "ws", "c4")],
           128: [(64, 128, 128, 1, 3, "ws"),
                 (64, 128, 128, 1, 3, "ws", "c2")]}),
    # g (fifteenth session): the weight tile swizzled ("sw", no bank
    # conflicts in the decode's shared loads) and the table words loaded
    # from memory ("lt", no constant re-created before each permute).
    "g": ([((256, 1024), 96), ((14336, 4096), 64), ((14336, 4096), 256),
           ((14336, 4096), 128), ((11008, 4096), 64), ((11008, 4096), 256),
           ((4096, 14336), 64), ((6144, 4096), 128)],
          {256: [(64, 256, 64, 1, 4, "ws"), (64, 256, 64, 1, 4, "ws", "sw"),
                 (64, 256, 64, 1, 4, "ws", "lt"),
                 (64, 256, 64, 1, 4, "ws", "swlt"),
                 (64, 256, 128, 1, 2, "ws", "swlt")],
           128: [(64, 128, 128, 1, 3, "ws"), (64, 128, 128, 1, 3, "ws", "sw"),
                 (64, 128, 128, 1, 3, "ws", "lt"),
                 (64, 128, 128, 1, 3, "ws", "swlt"),
                 (64, 128, 64, 1, 3, "ks", "swlt")],
           64: [(64, 64, 128, 1, 4, "plain"),
                (64, 64, 128, 1, 4, "plain", "sw"),
                (64, 64, 128, 1, 4, "plain", "lt"),
                (64, 64, 128, 1, 4, "plain", "swlt"),
                (64, 64, 256, 1, 2, "plain", "swlt"),
                (64, 64, 128, 1, 2, "ks", "swlt")]}),
    # h: each step decoded in parts of 64 columns, each part's decode
    # overlapping the previous part's wgmma ("ov").
    "h": ([((256, 1024), 96), ((14336, 4096), 64), ((14336, 4096), 256),
           ((14336, 4096), 128), ((11008, 4096), 64), ((11008, 4096), 256)],
          {256: [(64, 256, 64, 1, 4, "ws"), (64, 256, 128, 1, 2, "ws", "ov"),
                 (64, 256, 128, 1, 2, "ws", "ovlt")],
           128: [(64, 128, 128, 1, 3, "ws"), (64, 128, 128, 1, 3, "ws", "ov"),
                 (64, 128, 128, 1, 3, "ws", "ovlt"),
                 (64, 128, 256, 1, 2, "ws", "ov")],
           64: [(64, 64, 128, 1, 4, "plain"),
                (64, 64, 128, 1, 4, "plain", "ov"),
                (64, 64, 128, 1, 4, "plain", "ovlt"),
                (64, 64, 256, 1, 2, "plain", "ov"),
                (64, 64, 256, 1, 2, "plain", "ovswlt")]}),
    # i: the defaults chosen from g and h ("package") against the old
    # defaults and the overlapped parts, side by side.
    "i": ([((14336, 4096), 64), ((11008, 4096), 64), ((14336, 4096), 128),
           ((11008, 4096), 128)],
          {128: [(64, 128, 128, 1, 3, "ws"), (64, 128, 128, 1, 3, "ws", "lt"),
                 (64, 128, 128, 1, 3, "ws", "ovlt")],
           64: [(64, 64, 128, 1, 4, "plain"),
                (64, 64, 256, 1, 2, "plain", "swlt"),
                (64, 64, 256, 1, 2, "plain", "ovswlt")]}),
    # j (defined for the next session, not run): more programs for the
    # latency-bound kernel: x split in tiles of 32 rows (the weight decoded
    # twice), K split in two, and "ks" with the new decode.
    "j": ([((14336, 4096), 64), ((11008, 4096), 64), ((14336, 4096), 128)],
          {128: [(64, 128, 128, 1, 3, "ws", "lt"),
                 (64, 64, 128, 1, 3, "ws", "lt"),
                 (64, 128, 128, 2, 2, "ws", "lt")],
           64: [(64, 64, 256, 1, 2, "plain", "swlt"),
                (64, 32, 256, 1, 2, "plain", "swlt"),
                (64, 32, 128, 1, 3, "plain", "swlt"),
                (64, 64, 256, 2, 2, "plain", "swlt"),
                (64, 64, 256, 1, 2, "ks", "swlt")]}),
    # k (sixteenth session): the double-quantized statistics decoded by the
    # kernel ("dq") against the scale words made by XLA first.
    "k": ([((14336, 4096), 256), ((14336, 4096), 64), ((14336, 4096), 128),
           ((11008, 4096), 256)],
          {256: [(64, 256, 64, 1, 4, "ws"), (64, 256, 64, 1, 4, "ws", "dq"),
                 (64, 256, 128, 1, 2, "ws"), (64, 256, 128, 1, 2, "ws", "dq"),
                 (64, 256, 64, 1, 4, "ws", "dqlt"),
                 (64, 128, 128, 1, 3, "ws", "dqlt")],
           128: [(64, 128, 128, 1, 3, "ws", "lt"),
                 (64, 128, 128, 1, 3, "ws", "dqlt"),
                 (64, 128, 256, 1, 2, "ws", "dqlt")],
           64: [(64, 64, 256, 1, 2, "plain", "swlt"),
                (64, 64, 256, 1, 2, "plain", "dqswlt"),
                (64, 64, 128, 1, 4, "plain", "dqswlt")]}),
    # l (defined in the sixteenth session, not run): the statistics' scale
    # words made a step ahead ("pf") against made in the step.
    "l": ([((14336, 4096), 64), ((14336, 4096), 128), ((11008, 4096), 64),
           ((11008, 4096), 128), ((14336, 4096), 256)],
          {256: [(64, 256, 64, 1, 4, "ws"), (64, 256, 128, 1, 2, "ws", "dq"),
                 (64, 256, 128, 1, 2, "ws", "dqpf"),
                 (64, 256, 64, 1, 4, "ws", "dqpf")],
           128: [(64, 128, 256, 1, 2, "ws", "dqlt"),
                 (64, 128, 256, 1, 2, "ws", "dqltpf"),
                 (64, 128, 128, 1, 3, "ws", "dqltpf")],
           64: [(64, 64, 256, 1, 2, "plain", "dqswlt"),
                (64, 64, 256, 1, 2, "plain", "dqswltpf"),
                (64, 64, 128, 1, 4, "plain", "dqswltpf")]}),
    # m (seventeenth session): K splits with the statistics on the shapes
    # the kernel does not serve (too few row tiles for 132 SMs: 4096 rows,
    # the K-long 4096x14336), and at M = 256 the 128-column steps with
    # the scale words made ahead.
    "m": ([((4096, 14336), 64), ((4096, 4096), 64), ((4096, 14336), 256),
           ((4096, 4096), 256), ((4096, 14336), 128), ((4096, 4096), 128),
           ((11008, 4096), 256)],
          {256: [(64, 256, 128, 1, 2, "ws", "dqpf"),
                 (64, 256, 128, 2, 2, "ws", "dqpf"),
                 (64, 256, 128, 4, 2, "ws", "dqpf"),
                 (64, 256, 64, 2, 4, "ws", "dqpf"),
                 (64, 128, 256, 2, 2, "ws", "dqlt"),
                 (64, 256, 128, 2, 2, "ks", "dq")],
           128: [(64, 128, 256, 1, 2, "ws", "dqlt"),
                 (64, 128, 256, 2, 2, "ws", "dqlt"),
                 (64, 128, 256, 4, 2, "ws", "dqlt"),
                 (64, 128, 128, 4, 3, "ws", "dqlt"),
                 (64, 128, 256, 2, 2, "ks", "dqlt")],
           64: [(64, 64, 256, 1, 2, "plain", "dqswlt"),
                (64, 64, 256, 2, 2, "plain", "dqswlt"),
                (64, 64, 256, 4, 2, "plain", "dqswlt"),
                (64, 64, 128, 4, 4, "plain", "dqswlt"),
                (64, 64, 256, 2, 2, "ks", "dqswlt"),
                (64, 64, 256, 4, 2, "ks", "dqswlt")]}),
    # n (seventeenth session): M = 256 on 4096-row weights in x tiles of
    # 128 rows (the 256-row splits of run m did not fit shared memory).
    "n": ([((4096, 14336), 256), ((4096, 4096), 256)],
          {256: [(64, 128, 128, 2, 3, "ws", "dqlt"),
                 (64, 128, 128, 4, 3, "ws", "dqlt"),
                 (64, 128, 64, 4, 4, "ws", "dqlt"),
                 (64, 64, 256, 2, 2, "ks", "dqswlt")]}),
    # o (twenty-second session): M = 256 on the weights of 4096 and 11008
    # rows with x's 256-row tile and 64-column steps (which fit shared
    # memory with the float32 partials of a K split), in "ws", "plain"
    # and "ks"; and K splits of 8 on 1024-row weights at M = 64-256.
    "o": ([((4096, 14336), 256), ((4096, 4096), 256), ((1024, 4096), 64),
           ((1024, 4096), 256), ((11008, 4096), 256), ((14336, 4096), 256)],
          {256: [(64, 256, 128, 1, 2, "ws", "dqpf"),
                 (64, 256, 64, 2, 2, "ws", "dqpf"),
                 (64, 256, 64, 4, 2, "ws", "dqpf"),
                 (64, 256, 64, 1, 1, "ks", "dq"),
                 (64, 256, 64, 2, 1, "ks", "dq"),
                 (64, 256, 64, 2, 4, "plain", "dqpf"),
                 (64, 256, 128, 2, 2, "plain", "dqpf"),
                 (64, 256, 64, 1, 4, "plain", "dqpf"),
                 (64, 256, 64, 8, 4, "plain", "dqpf"),
                 (64, 256, 64, 8, 2, "ws", "dqpf")],
           64: [(64, 64, 256, 1, 2, "plain", "dqswlt"),
                (64, 64, 128, 8, 4, "plain", "dqswlt"),
                (64, 64, 256, 4, 2, "ks", "dqswlt"),
                (64, 64, 128, 8, 2, "ks", "dqswlt"),
                (64, 64, 64, 8, 4, "ks", "dqswlt")]}),
    # p (twenty-second session): "ks" at x's 256-row tile with two steps
    # in flight, now that the second warpgroup's float32 sums go through
    # the output tile (no separate buffer), against run o's best; M = 128
    # on 1024-row weights.
    "p": ([((4096, 14336), 256), ((4096, 4096), 256), ((1024, 4096), 128),
           ((1024, 4096), 256), ((1024, 4096), 64)],
          {256: [(64, 256, 128, 2, 2, "plain", "dqpf"),
                 (64, 256, 128, 2, 2, "plain", "dqswltpf"),
                 (64, 256, 64, 2, 2, "ks", "dq"),
                 (64, 256, 64, 2, 2, "ks", "dqlt"),
                 (64, 256, 64, 2, 2, "ks", "dqswlt"),
                 (64, 256, 64, 8, 4, "plain", "dqpf"),
                 (64, 256, 64, 8, 2, "ks", "dqlt")],
           128: [(64, 128, 128, 8, 3, "ws", "dqlt"),
                 (64, 128, 128, 16, 2, "ws", "dqlt"),
                 (64, 128, 128, 8, 2, "ks", "dqlt"),
                 (64, 128, 128, 8, 4, "plain", "dqswlt"),
                 (64, 128, 64, 8, 4, "plain", "dqswlt")],
           64: [(64, 64, 128, 8, 2, "ks", "dqswlt"),
                (64, 64, 128, 8, 4, "ks", "dqswlt")]}),
    # q (twenty-third session): weights of 6144 and 8192 rows at M = 256,
    # which take dequantize + dot (no split measured there), and the
    # 11008- and 14336-row weights at M = 128, where "ws" runs 86 and 112
    # programs on 132 SMs.
    "q": ([((6144, 4096), 256), ((8192, 4096), 256), ((11008, 4096), 128),
           ((14336, 4096), 128), ((6144, 4096), 128)],
          {256: [(64, 256, 128, 1, 2, "ws", "dqpf"),
                 (64, 256, 128, 1, 2, "plain", "dqpf"),
                 (64, 256, 128, 2, 2, "plain", "dqpf"),
                 (64, 256, 64, 2, 2, "ws", "dqpf"),
                 (64, 256, 64, 4, 2, "ws", "dqpf"),
                 (64, 256, 64, 2, 2, "ks", "dqlt"),
                 (64, 256, 64, 4, 2, "ks", "dqlt")],
           128: [(64, 128, 256, 1, 2, "ws", "dqlt"),
                 (64, 128, 128, 2, 3, "ws", "dqlt"),
                 (64, 128, 128, 4, 3, "ws", "dqlt"),
                 (64, 128, 128, 1, 4, "plain", "dqswlt"),
                 (64, 128, 128, 2, 4, "plain", "dqswlt"),
                 (64, 128, 128, 2, 2, "ks", "dqlt")]}),
    # r (twenty-third session): after run q's routing, M = 256 between
    # its measured row counts and past them (5120 and 3072 rows; 9216,
    # still dequantize + dot, against "ws" unsplit), and run q's M = 128
    # cases that its time budget cut.
    "r": ([((5120, 5120), 256), ((3072, 4096), 256), ((9216, 4096), 256),
           ((14336, 4096), 128), ((6144, 4096), 128)],
          {256: [(64, 256, 128, 1, 2, "plain", "dqpf"),
                 (64, 256, 128, 2, 2, "plain", "dqpf"),
                 (64, 256, 64, 4, 2, "ks", "dqlt"),
                 (64, 256, 128, 1, 2, "ws", "dqpf")],
           128: [(64, 128, 128, 4, 3, "ws", "dqlt"),
                 (64, 128, 128, 2, 3, "ws", "dqlt"),
                 (64, 128, 128, 1, 4, "plain", "dqswlt"),
                 (64, 128, 128, 2, 2, "ks", "dqlt")]}),
    # s (twenty-third session): at M = 64 and 128 on 6144 and 3072 rows,
    # K splits to 128 programs or more (the default) against those that
    # keep one wave of 132.
    "s": ([((6144, 4096), 64), ((6144, 4096), 128), ((3072, 4096), 64)],
          {64: [(64, 64, 256, 1, 2, "ks", "dqswlt"),
                (64, 64, 256, 2, 2, "ks", "dqswlt"),
                (64, 64, 256, 4, 2, "ks", "dqswlt")],
           128: [(64, 128, 128, 2, 3, "ws", "dqlt"),
                 (64, 128, 128, 4, 3, "ws", "dqlt")]}),
    # t (forty-sixth session): past M = 256, where the package runs
    # dequantize + dot: the M = 256 default ("ws", x's 256-row tile, the
    # statistics decoded in the kernel, their scale words made ahead),
    # 64-column steps four in flight, without the words made ahead, and
    # x's tile shared by a cluster of two programs ("c2").
    "t": ([((14336, 4096), 512), ((14336, 4096), 1024),
           ((14336, 4096), 4096), ((4096, 14336), 1024),
           ((4096, 14336), 4096), ((11008, 4096), 1024),
           ((4096, 4096), 1024), ((4096, 4096), 4096)],
          {4096: [(64, 256, 128, 1, 2, "ws", "dqpf"),
                  (64, 256, 64, 1, 4, "ws", "dqpf"),
                  (64, 256, 128, 1, 2, "ws", "dq"),
                  (64, 256, 128, 1, 2, "ws", "dqpfc2")]}),
    # u (defined in the forty-sixth session, not run): where run t's
    # config leaves SMs idle past M = 256 (4096-row weights at M = 512
    # and 768: 64 and 96 programs; 11008 rows at 512: 172 in two waves),
    # K split in two, and x's 128-row tiles (M = 512 on 4096 rows: 128
    # programs).
    "u": ([((4096, 14336), 512), ((4096, 4096), 512), ((4096, 14336), 768),
           ((4096, 4096), 768), ((11008, 4096), 512)],
          {512: [(64, 256, 128, 1, 2, "ws", "dqpf"),
                 (64, 256, 128, 2, 2, "plain", "dqpf"),
                 (64, 256, 64, 2, 2, "ws", "dq"),
                 (64, 256, 64, 2, 2, "ks", "dq"),
                 (64, 128, 128, 1, 3, "ws", "dqlt"),
                 (64, 128, 128, 2, 3, "ws", "dqlt")]}),
    # v (forty-seventh session): M = 256 on weights outside the 8B
    # suite where `jaxbnb bench matmul` ran 0.65-0.78x bf16: Qwen2.5-7B's
    # 18944x3584 ("ws", 148 programs: a second wave of 16) and
    # Llama-3-70B's 8192-row weights ("plain", one compute warpgroup a
    # program), against "ks" unsplit (two compute warpgroups on the same
    # 64 rows, alternate K steps: twice the programs of "ws", twice the
    # warps of "plain"), x's 128-row tiles and K splits.
    "v": ([((18944, 3584), 256), ((8192, 28672), 256), ((8192, 8192), 256),
           ((3584, 18944), 256)],
          {256: [(64, 256, 128, 1, 2, "ws", "dqpf"),
                 (64, 256, 128, 1, 2, "plain", "dqpf"),
                 (64, 256, 64, 1, 1, "ks", "dq"),
                 (64, 256, 64, 1, 1, "ks", "dqlt"),
                 (64, 128, 64, 1, 3, "ks", "dqlt"),
                 (64, 128, 128, 1, 3, "ws", "dqlt"),
                 (64, 256, 128, 2, 2, "plain", "dqpf"),
                 (64, 256, 64, 2, 2, "ks", "dqlt")]}),
    # w (defined in the forty-seventh session, run in the forty-ninth):
    # the last wave's rows as a tail launch with K split ("tail": `gemm`'s
    # `tail_rows` from `tail_rows_for` with any last wave below a full one
    # and programs of any size) against
    # one launch, where the default leaves a thin last wave: Qwen2.5-7B's
    # 18944x3584 (148 programs of "ws" at M = 129-256, 296 of "plain" at
    # M = 64), Yi-34B's 20480x7168 (160) and Gemma-2-27B's 36864x4608 (288).
    "w": ([((18944, 3584), 256), ((18944, 3584), 128), ((18944, 3584), 64),
           ((20480, 7168), 256), ((36864, 4608), 256)],
          {256: [(64, 256, 128, 1, 2, "ws", "dqpf"),
                 (64, 256, 128, 1, 2, "ws", "dqpftail")],
           128: [(64, 128, 256, 1, 2, "ws", "dqlt"),
                 (64, 128, 256, 1, 2, "ws", "dqlttail")],
           64: [(64, 64, 256, 1, 2, "plain", "dqswlt"),
                (64, 64, 256, 1, 2, "plain", "dqswlttail")]}),
    # x (defined in the forty-seventh session, run in the forty-ninth):
    # Qwen2.5-7B's weights of K = 3584, then below GEMM_SPLIT_MIN_K
    # (4096), which the GEMM did not take: at M = 64 the GEMV ran 3584x3584 at 21.4 us and
    # 512x3584 at 9.9 (XLA 15.6 and 6.2), at M = 256 dequantize + dot
    # 3584x3584 at 28.5 (XLA 17.0); K splits as `_split_config` would
    # make them.
    "x": ([((3584, 3584), 64), ((512, 3584), 64), ((3584, 3584), 256),
           ((3584, 3584), 128)],
          {64: [(64, 64, 128, 2, 2, "ks", "dqswlt"),
                (64, 64, 256, 1, 2, "ks", "dqswlt"),
                (64, 64, 64, 4, 2, "ks", "dqswlt")],
           128: [(64, 128, 128, 2, 3, "ws", "dqlt"),
                 (64, 128, 128, 2, 2, "ks", "dqlt")],
           256: [(64, 256, 128, 2, 2, "plain", "dqpf"),
                 (64, 256, 64, 4, 2, "ks", "dqlt")]}),
    # y (defined in the forty-ninth session, run in the fiftieth):
    # Llama-3.2-3B's K = 3072 weights (q/o 3072x3072, gate/up 8192x3072,
    # k/v 1024x3072), below GEMM_SPLIT_MIN_K (then 3584), which the GEMM
    # did not take.
    "y": ([((3072, 3072), 64), ((3072, 3072), 128), ((3072, 3072), 256),
           ((8192, 3072), 64), ((8192, 3072), 128), ((8192, 3072), 256),
           ((1024, 3072), 64), ((1024, 3072), 128)], _SHORT_K_TILES),
    # z (defined in the forty-ninth session, run in the fiftieth): K =
    # 2048 (Llama-3.2-1B, TinyLlama: q/o 2048x2048, gate/up 8192x2048 and
    # 5632x2048) and Qwen2.5-7B's k/v (512x3584), which has fewer rows
    # than GEMM_SPLIT_MIN_N (1024).
    "z": ([((2048, 2048), 64), ((2048, 2048), 256), ((8192, 2048), 64),
           ((8192, 2048), 256), ((5632, 2048), 128), ((512, 3584), 128),
           ((512, 3584), 256)], _SHORT_K_TILES),
    # aa (fiftieth session): after runs y and z (the GEMM won on K = 3072
    # and 2048), the splits `_split_config` picks where those runs did not
    # time them: "ws" split 4 / 8 at M = 128 on 3072x3072 / 2048x2048
    # against "ks" split 2 and 4; at M = 256 "ks" split 4 / 8 (`plain`
    # past split 2 becomes "ks") against "plain" split 2.
    "aa": ([((3072, 3072), 128), ((2048, 2048), 128), ((2048, 2048), 256),
            ((1024, 4096), 256), ((1024, 3072), 256)],
           {128: [(64, 128, 128, 4, 3, "ws", "dqlt"),
                  (64, 128, 128, 8, 2, "ws", "dqlt"),
                  (64, 128, 128, 2, 2, "ks", "dqlt"),
                  (64, 128, 64, 4, 2, "ks", "dqlt")],
            256: [(64, 256, 128, 2, 2, "plain", "dqpf"),
                  (64, 256, 64, 4, 2, "ks", "dqlt"),
                  (64, 256, 64, 8, 2, "ks", "dqlt")]}),
    # ab (fiftieth session; the default stayed best): M = 256 on the K =
    # 2048 / 3072 weights of 5632-8192 rows, where the package's "plain"
    # unsplit (one wave) ran 0.65-0.85x XLA bf16 after runs y and z: more
    # stages, 64-column steps, "ws" (half the programs), x's 128-row
    # tiles (twice the programs).
    "ab": ([((8192, 3072), 256), ((8192, 2048), 256), ((5632, 2048), 256)],
           {256: [(64, 256, 128, 1, 2, "plain", "dqpf"),
                  (64, 256, 64, 1, 4, "plain", "dqpf"),
                  (64, 256, 128, 1, 2, "ws", "dqpf"),
                  (64, 128, 128, 1, 3, "ws", "dqlt"),
                  (64, 128, 128, 1, 3, "plain", "dqlt")]}),
    # ac (fifty-first session): K = 2304 (Gemma-2-2B: q 2048x2304, k/v
    # 1024x2304, a 2304-row weight). 2304 = 9 x 256 takes no power-of-two
    # split past 2 ("ks") or 4 ("ws") in 64-column steps, so the default
    # leaves 1024x2304 at 32 programs; the package A/B (issue14_targets.sh
    # g) had it lose to the path before. Here the default against splits
    # of 3, 6, 9 and 12, which divide K.
    "ac": ([((1024, 2304), 64), ((2048, 2304), 64), ((2304, 2304), 64),
            ((1024, 2304), 128), ((2048, 2304), 128), ((2304, 2304), 128),
            ((1024, 2304), 256), ((2048, 2304), 256), ((2304, 2304), 256)],
           {64: [(64, 64, 64, 2, 4, "ks", "dqswlt"),
                 (64, 64, 64, 3, 4, "ks", "dqswlt"),
                 (64, 64, 128, 3, 3, "ks", "dqswlt"),
                 (64, 64, 64, 6, 3, "ks", "dqswlt")],
            128: [(64, 128, 64, 4, 4, "ws", "dqlt"),
                  (64, 128, 64, 6, 4, "ws", "dqlt"),
                  (64, 128, 128, 6, 3, "ws", "dqlt"),
                  (64, 128, 64, 9, 4, "ws", "dqlt"),
                  (64, 128, 64, 12, 3, "ws", "dqlt")],
            256: [(64, 256, 64, 2, 2, "ks", "dqlt"),
                  (64, 256, 128, 2, 2, "plain", "dqpf"),
                  (64, 256, 64, 3, 2, "ks", "dqlt"),
                  (64, 256, 64, 6, 2, "ks", "dqlt")]}),
}

def fn(n, k, cfg):
  tw, tx, tk, split, stages, variant = cfg[:6]
  if cfg[6:] == ("old",):
    def f_old(x, p, qs):
      absmax = ops.float_absmax(qs)
      mp = -(-x.shape[0] // tx) * tx
      xp = jnp.pad(x, ((0, mp - x.shape[0]), (0, 0)))
      yt = gw._compiled(xp, p.reshape(-1), gw.scale_words_t(absmax, n, k),  # pylint: disable=protected-access
                        code=CODE, n=n, k=k, tile_w=tw, tile_x=tx, tile_k=tk,
                        split=split, stages=stages, variant=variant,
                        out_t=False)
      return yt[0, :, :x.shape[0]].T
    return f_old
  tag = cfg[6] if cfg[6:] else ""
  cluster = int(tag[tag.index("c") + 1]) if "c" in tag else 1
  def f(x, p, qs):
    absmax = ((qs.absmax, qs.nested_absmax, qs.nested_code, qs.offset)
              if "dq" in tag else ops.float_absmax(qs))
    tail = gw.tail_rows_for(
        x.shape[0], n, k, dict(tile_w=tw, tile_x=tx, split=split,
                               variant=variant), below=1.0,
        min_size=0) if "tail" in tag else 0
    return gw.gemm(x, p.reshape(-1), absmax, code=CODE, n=n,
                   k=k, tile_w=tw, tile_x=tx, tile_k=tk, split=split,
                   stages=stages, variant=variant, cluster=cluster,
                   swizzle="sw" in tag, load_table="lt" in tag,
                   overlap="ov" in tag, prefetch="pf" in tag,
                   tail_rows=tail)
  return f


def main():
  budget = float(sys.argv[1]) if len(sys.argv) > 1 else 300.0
  run = sys.argv[2] if len(sys.argv) > 2 else "e"
  cases, tiles_by_m = RUNS[run]
  t_end = time.time() + budget
  out = open(os.path.join(os.environ.get("OUT", "."),
                          "gemm_wgmma_sweep.jsonl"), "a")
  for n, k, m, base, x in each_case(cases, t_end):
    tiles = tiles_by_m[min(tiles_by_m, key=lambda t: abs(t - m))]
    if k >= 4 * n and run < "o":  # few row tiles: split K
      tiles = tiles + [(t[0], t[1], t[2], s, t[4], t[5]) for t in tiles[1:4]
                       for s in (2, 4)]
    if n * k < 2 ** 20:  # the small case: checked, not timed
      packed, qs = base[0][7], base[0][6]
      ref = np.asarray(x.astype(jnp.float32)
                       @ F.dequantize_4bit(packed, qs).astype(jnp.float32).T)
      for cfg in [(64, 64, 64, 1, 2, "plain"), (64, 128, 128, 2, 2, "ws"),
                  (64, 64, 64, 1, 3, "ws"), (128, 128, 64, 2, 3, "ws"),
                  (64, 256, 128, 1, 2, "ws"), (64, 64, 64, 1, 2, "ks"),
                  (64, 128, 64, 1, 2, "ks"), (64, 16, 64, 1, 2, "plain"),
                  (64, 64, 128, 1, 2, "plain", "old"),
                  (64, 256, 64, 1, 2, "ws", "c2"),
                  (64, 128, 64, 1, 2, "ks", "c2"),
                  (64, 64, 128, 1, 2, "plain", "swlt"),
                  (64, 256, 64, 1, 2, "ws", "swlt"),
                  (64, 128, 128, 1, 2, "ws", "sw"),
                  (64, 128, 64, 1, 2, "ks", "swlt"),
                  (64, 64, 128, 1, 2, "plain", "ov"),
                  (64, 64, 256, 1, 2, "plain", "ovswlt"),
                  (64, 256, 128, 1, 2, "ws", "ov"),
                  (64, 128, 128, 1, 2, "ks", "ov")]:
        try:
          y = np.asarray(jax.jit(fn(n, k, cfg))(x, packed, qs), np.float32)
          err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
          print("small", cfg, err, flush=True)
        except Exception as e:  # pylint: disable=broad-except
          print("small", cfg, f"ERR {type(e).__name__}: {str(e)[:1500]}",
                flush=True)
      continue
    rec, ref, scale = baseline(x, base, n=n, k=k, m=m)
    res = []
    for cfg in tiles:
      if time.time() > t_end:
        break
      r = checked(fn(n, k, cfg), [(x, s[7], s[6]) for s in base], ref, scale)
      res.append([list(cfg), *r])
    record(out, rec, res, f"{n}x{k} M={m} xla {rec['xla_bf16']:.1f} "
           f"package {rec['package']:.1f}", top=5)


if __name__ == "__main__":
  main()
