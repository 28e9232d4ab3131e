"""Mutation check: the fast tests must catch curated semantic bugs.

  python -m tests.mutation              # every mutant, 2 at a time
  python -m tests.mutation --list       # the table below
  python -m tests.mutation --only kv-cache-slot-off --only rope-off
  python -m tests.mutation --jobs 4

Each mutant in `MUTANTS` is one deliberate bug: an exact piece of source
text and its replacement, and the tests that must catch it. For each one,
the source tree (jaxbnb, pallas_kernels, tests, pyproject.toml, README.md,
docs) is copied to a temporary folder, the text is replaced there (never in
the working tree), and `pytest -x` runs the mutant's tests in the copy. The
mutant is killed when pytest exits with 1 (a test failed). Exit 2 to 5 (a
collection or import error, a usage error, no tests) means the mutant or its
selection is broken: it is reported as an error, not a kill.

The union of all the selections also runs once on an unmutated copy (the
first job, alongside the mutants); it must pass, or no kill means anything.
First of all, and again inside every pytest run (a `-p` probe plugin), the
check asserts that `import jaxbnb` loads the copy: the working tree is
installed in editable mode, and `PYTHONPATH` puts the copy ahead of the
editable finder (which sits after the path finder on `sys.meta_path`).

A mutant whose text is not found exactly once fails the whole check before
anything runs: a refactor that moves the code must update the table, never
silently skip a mutant. The exit status is 0 only when the baseline passes
and every mutant is killed.

To add a mutant with a new feature: append one `Mutant(...)` row (see
docs/testing.md): a short name, the file, text that occurs exactly once in
it, the bug, and the few fast tests (node ids; the most likely killer
first, since `-x` stops at the first failure) that must catch it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One deliberate bug and the tests that must catch it.

  Attributes:
    name: short unique id (`--only NAME`).
    path: the mutated file, relative to the repository root.
    old: source text that must occur exactly once in `path`.
    new: its replacement (the bug).
    tests: pytest node ids (files, `file::test`, `file::test[param]`), the
      most likely killer first.
  """

  name: str
  path: str
  old: str
  new: str
  tests: tuple[str, ...]


# Selections shared by several mutants.
_GEMV_TWIN = ("tests/kernels/gemv_4bit_test.py::"
              "test_interpret_twin_keeps_the_compute_dtype_rounding")
_LLAMA = "tests/models/llama_test.py"
_LOGITS = _LLAMA + "::test_logits_match_transformers"
_DECODE = _LLAMA + "::test_cached_decode_and_greedy_tokens_match_transformers"
_SAMPLING = "tests/models/sampling_test.py"
_GENERATE_SAMPLING = "tests/models/generate_test.py::test_sampling_seeds"
_BNB4 = "tests/quant/bnb_golden_test.py"
_Q4 = _BNB4 + "::test_quantize_4bit_matches_bnb"
_DQ4 = _BNB4 + "::test_dequantize_4bit_of_bnb_state_is_exact"
# bitsandbytes golden cases: plain NF4, odd-sized FP4, nested NF4 (3 nested
# blocks) and nested FP4 in bfloat16.
_BNB4_CASES = ("[sweep_nf4_float32_64_0]", "[odd_fp4_bfloat16]",
               "[bignest_nf4_float32]", "[sweep_fp4_bfloat16_64_1]")
_OPTIM_GOLDEN = "tests/optim/bnb_golden_test.py"
_STEP = _OPTIM_GOLDEN + "::test_step_by_step_from_imported_bnb_state"
_RULES = "tests/optim/rules_test.py"
_TRUST = "tests/optim/trust_ratio_test.py"
_FIRST_STEP = _RULES + "::test_first_step_8bit_close_to_32bit"


def _cases(test: str, *ids: str) -> tuple[str, ...]:
  return tuple(test + i for i in ids)


# fmt: off
_ATTN = "tests/kernels/decode_attention_test.py::"

MUTANTS: tuple[Mutant, ...] = (
    # ---------------------------------------------------------- kernels
    Mutant("decode-attn-new-key-in-the-slot-before",
           "pallas_kernels/decode_attention.py",
           "new = (slots == index)[:, None]",
           "new = (slots == index - 1)[:, None]",
           (_ATTN + "test_matches_einsum_path[1-32-8-128-256-None-131-"
            "interpret]",)),
    Mutant("wgmma-gemm-gathers-the-wrong-byte",
           "pallas_kernels/wgmma_decode.py",
           '"mad.lo.u32 sel, c, 17, 64;"',
           '"mad.lo.u32 sel, c, 16, 64;"',
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_decode_ptx_fills_wgmma_registers[64-64-nf4-False-False]",)),
    Mutant("wgmma-gemm-swizzle-of-the-wrong-rows",
           "pallas_kernels/wgmma_decode.py",
           '"shr.u32 xo, xo, 7;"',
           '"shr.u32 xo, xo, 8;"',
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_decode_ptx_fills_wgmma_registers[64-64-nf4-True-True]",)),
    Mutant("wgmma-gemm-loads-the-wrong-table-words",
           "pallas_kernels/wgmma_decode.py",
           "return np.asarray(words[0::2], np.uint32)",
           "return np.asarray(words[1::2], np.uint32)",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_decode_ptx_fills_wgmma_registers[64-64-nf4-True-True]",)),
    Mutant("wgmma-gemm-256-column-steps-for-any-k",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "if k is not None and k % 256:",
           "if k is not None and k % 128:",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_default_config_follows_k",)),
    Mutant("wgmma-gemm-nested-value-of-the-wrong-block",
           "pallas_kernels/wgmma_decode.py",
           'f"shr.u32 fl, fl, {nbs.bit_length() - 1};"',
           'f"shr.u32 fl, fl, {nbs.bit_length()};"',
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_decode_ptx_decodes_the_nested_absmax[64-256-True-True-None-"
            "False]",)),
    Mutant("wgmma-gemm-decodes-nested-at-any-m-with-a-bias",
           "jaxbnb/_src/quant/kernels.py",
           "return qs.nested and (not bias or m <= GEMM_NESTED_BIAS_MAX_M)",
           "return qs.nested",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_matmul_4bit_hands_the_statistics_to_the_kernel[129-True-"
            "True-False]",)),
    Mutant("wgmma-gemm-no-prefetch-at-256-rows",
           "pallas_kernels/gemm_4bit_wgmma.py",
           'stages=2 if wide else 4, variant="ws", prefetch=True)',
           'stages=2 if wide else 4, variant="ws")',
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_default_config_follows_k",)),
    Mutant("wgmma-gemm-for-small-weights", "jaxbnb/_src/quant/kernels.py",
           "(n >= GEMM_MIN_N or (",
           "(n >= 128 or (",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves[256-9216-4096-64-bfloat16-interpret-False]",)),
    Mutant("wgmma-gemm-split-only-to-128-rows-of-x",
           "jaxbnb/_src/quant/kernels.py",
           "and (m <= GEMM_SPLIT_MAX_M or n <= GEMM_SPLIT_WIDE_MAX_N))",
           "and m <= GEMM_SPLIT_MAX_M)",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves[256-4096-4096-64-bfloat16-interpret-True]",)),
    Mutant("wgmma-gemm-split-k-from-4096",
           "jaxbnb/_src/quant/kernels.py",
           "GEMM_SPLIT_MIN_K = 1536",
           "GEMM_SPLIT_MIN_K = 4096",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves[64-3584-3584-64-bfloat16-interpret-True]",)),
    Mutant("wgmma-gemm-split-k-from-3584",
           "jaxbnb/_src/quant/kernels.py",
           "GEMM_SPLIT_MIN_K = 1536",
           "GEMM_SPLIT_MIN_K = 3584",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves[64-8192-3072-64-bfloat16-interpret-True]",)),
    Mutant("wgmma-gemm-split-k-from-2048",
           "jaxbnb/_src/quant/kernels.py",
           "GEMM_SPLIT_MIN_K = 1536",
           "GEMM_SPLIT_MIN_K = 2048",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves[64-2048-1536-64-bfloat16-interpret-True]",)),
    Mutant("wgmma-gemm-split-k-from-1024",
           "jaxbnb/_src/quant/kernels.py",
           "GEMM_SPLIT_MIN_K = 1536",
           "GEMM_SPLIT_MIN_K = 1024",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves[128-2048-1024-64-bfloat16-interpret-False]",)),
    Mutant("wgmma-gemm-split-ways-powers-of-two",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "SPLIT_WAYS = (1, 2, 3, 4, 6, 8, 9, 12, 16)",
           "SPLIT_WAYS = (1, 2, 4, 8, 16)",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_default_config_splits_k_ways_not_powers_of_two",)),
    Mutant("wgmma-gemm-split-ways-k-does-not-take",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "\n      and (not s & (s - 1)\n"
           "           or k is not None and k % (64 * s * way_halves) == 0))]",
           ")]",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_default_config_splits_k_ways_not_powers_of_two",)),
    Mutant("wgmma-gemm-split-ways-narrowest-steps",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "next((w for w in widths if steps(w, s) >= 2), 64)",
           "64",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_default_config_splits_k_ways_not_powers_of_two",)),
    Mutant("add-splits-y-not-rounded",
           "pallas_kernels/split_sum.py",
           "y = total.astype(dtype).astype(jnp.float32)",
           "y = total",
           ("tests/kernels/split_sum_test.py::"
            "test_add_splits_is_the_reference_bit_for_bit",)),
    Mutant("mlp-residual-not-fused",
           "jaxbnb/_src/models/llama.py",
           "if residual is not None and residual.dtype == self.dtype:",
           "if False:",
           ("tests/models/llama_test.py::"
            "test_decode_mlp_runs_down_on_gate_up_partials",)),
    Mutant("warp-tma-pair-one-k-chunk",
           "pallas_kernels/gemv_4bit_warp_tma.py",
           "PAIR_KCHUNKS.get(k, 1) if len(ns) == 2 else 1",
           "1",
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_default_k_chunks_two_for_a_pair_at_k_4096",)),
    Mutant("lut-default-tma-runs-the-build",
           "pallas_kernels/gemv_4bit_lut.py",
           "early=True,\n              tma_skips_build=True)",
           "early=True,\n              tma_skips_build=False)",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_default_group_is_one_launch_of_the_tables",)),
    Mutant("lut-pipeline-allocated-after-the-build",
           "pallas_kernels/gemv_4bit_lut.py",
           "ALLOC_FIRST = True",
           "ALLOC_FIRST = False",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_default_allocates_the_pipeline_before_the_build",)),
    Mutant("lut-loads-first-off-by-default",
           "pallas_kernels/gemv_4bit_lut.py",
           "LOADS_FIRST = True",
           "LOADS_FIRST = False",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_default_takes_the_loads_back_first_in_plain_builds",)),
    Mutant("lut-loads-first-in-fused-builds",
           "pallas_kernels/gemv_4bit_lut.py",
           "LOADS_FIRST and swiglu is None and norm is None,",
           "LOADS_FIRST,",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_swiglu_lowers_for_cuda",
            "tests/kernels/gemv_4bit_lut_test.py::"
            "test_norm_group_lowers_for_cuda")),
    Mutant("lut-loads-fence-dropped",
           "pallas_kernels/gemv_4bit_lut.py",
           'lines += ["fence.acq_rel.cta;"]',
           "lines += []",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_build_fences_its_loads_first",)),
    Mutant("warp-tma-early-below-its-bound",
           "pallas_kernels/gemv_4bit_warp_tma.py",
           "return m <= EARLY_MAX_M or",
           "return m < EARLY_MAX_M or",
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_default_skips_the_build_up_to_early_max_m",)),
    Mutant("warp-tma-small-weights-below-their-bound",
           "pallas_kernels/gemv_4bit_warp_tma.py",
           "and sum(ns) * k <= EARLY_SMALL_ELEMENTS)",
           "and sum(ns) * k < EARLY_SMALL_ELEMENTS)",
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_default_skips_the_build_up_to_early_max_m",)),
    Mutant("warp-tma-small-weights-one-at-a-time",
           "pallas_kernels/gemv_4bit_warp_tma.py",
           "and sum(ns) * k <= EARLY_SMALL_ELEMENTS)",
           "and max(ns) * k <= EARLY_SMALL_ELEMENTS)",
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_skips_build_counts_every_weight_of_the_launch",)),
    Mutant("group-drops-split-weights-past-64-rows",
           "jaxbnb/_src/quant/kernels.py",
           "GROUP_KEEPS_SPLIT_MAX_M = 128",
           "GROUP_KEEPS_SPLIT_MAX_M = 64",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_group_keeps_split_weights_at_128_rows",)),
    Mutant("wgmma-gemm-tail-off-by-default",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "TAIL_BELOW_FILL = 0.5",
           "TAIL_BELOW_FILL = 0.0",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_tail_rows_for_a_thin_last_wave",)),
    Mutant("wgmma-gemm-tail-for-short-programs",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "      or rows * k < min_size\n",
           "",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_tail_rows_for_a_thin_last_wave",)),
    Mutant("wgmma-gemm-tail-never-passed",
           "jaxbnb/_src/quant/kernels.py",
           "tail = 0 if bias is not None else gw.tail_rows_for(m, n, k, cfg)",
           "tail = 0",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_package_gemm_takes_the_tail",)),
    Mutant("wgmma-gemm-tail-ignores-the-fill",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "or not 0 < last < below * sms):",
           "or not 0 < last):",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_tail_rows_for_a_thin_last_wave",)),
    Mutant("wgmma-gemm-past-256-ignores-the-waves",
           "jaxbnb/_src/quant/kernels.py",
           "and programs >= GEMM_LARGE_MIN_FILL * waves * sms)",
           ")",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves_past_256_rows[512-4096-True-False-False]",)),
    Mutant("wgmma-gemm-past-256-pads-freely",
           "jaxbnb/_src/quant/kernels.py",
           "and 8 * cfg[\"tile_x\"] * tiles <= 9 * m",
           "and cfg[\"tile_x\"] * tiles <= 2 * m",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves_past_256_rows[300-14336-True-False-False]",)),
    Mutant("wgmma-gemm-past-256-splits-k",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "if n is not None and n < SPLIT_BELOW_N and m <= 256 and (",
           "if n is not None and n < SPLIT_BELOW_N and (",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_gemm_serves_past_256_rows[1024-4096-True-False-True]",)),
    Mutant("wgmma-gemm-ks-sums-in-a-second-tile",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "+ (0 if out_f32 else tile_w * tile_x * 2))",
           "+ tile_w * tile_x * (4 if out_f32 else 2))",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_default_config_splits_few_rows",)),
    Mutant("wgmma-gemm-split-breaks-groups", "jaxbnb/_src/quant/kernels.py",
           "if any((q.shape[0] >= GEMM_MIN_N or m > GROUP_KEEPS_SPLIT_MAX_M)",
           "if any((q.shape[0] >= 0 or m > GROUP_KEEPS_SPLIT_MAX_M)",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_group_keeps_weights_served_only_with_a_split",)),
    Mutant("wgmma-gemm-unsplit-for-few-rows",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "ways = [s for s in SPLIT_WAYS if s == 1 or (",
           "ways = [s for s in SPLIT_WAYS if s == 1 or False and (",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_default_config_splits_few_rows",)),
    Mutant("wgmma-gemm-split-past-one-wave",
           "pallas_kernels/gemm_4bit_wgmma.py",
           "s <= most and tiles * s <= sms\n",
           "s <= most and tiles * s <= 2 * sms\n",
           ("tests/kernels/gemm_4bit_wgmma_test.py::"
            "test_default_config_splits_few_rows",)),
    # q/k/v sent back to "reduce" (the rule before the 29th session).
    Mutant("lut-serves-no-qkv-group", "pallas_kernels/gemv_4bit.py",
           "len(ns) > 1 and min(ns) >= LUT_GROUP_MIN_N",
           "len(ns) > 1 and min(ns) >= LUT_MIN_N",
           ("tests/quant/dispatch_test.py::"
            "test_m1_qkv_group_takes_the_table_kernel",)),
    Mutant("lut-swiglu-reads-gate-as-up", "pallas_kernels/gemv_4bit_lut.py",
           'ups = fetch("pu", swiglu.up_row0)',
           'ups = fetch("pu", 0)',
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_swiglu_build_matches_reference",)),
    Mutant("swiglu-silu-dropped", "pallas_kernels/gemv_4bit_lut.py",
           "h = jax.nn.silu(g.astype(dtype)) * u.astype(dtype)",
           "h = g.astype(dtype) * u.astype(dtype)",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_swiglu_interpret_is_the_composition",)),
    Mutant("lut-norm-mean-over-half-the-row",
           "pallas_kernels/gemv_4bit_lut.py",
           'math += [f"div.rn.f32 ss, ss, {_f32(float(k))};",',
           'math += [f"div.rn.f32 ss, ss, {_f32(float(k // 2))};",',
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_norm_build_matches_reference",)),
    Mutant("lut-norm-last-warp-left-out", "pallas_kernels/gemv_4bit_lut.py",
           "for w in range(1, threads // 32):",
           "for w in range(1, threads // 32 - 1):",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_norm_build_matches_reference",)),
    Mutant("model-norm-skipped-when-not-fused", "jaxbnb/_src/models/llama.py",
           "    x = x if norm is None else norm(x)\n"
           "    return matmul_lib.matmul_4bit_group(x.astype(dtype), pairs)",
           "    return matmul_lib.matmul_4bit_group(x.astype(dtype), pairs)",
           ("tests/models/llama_test.py::"
            "test_grouped_projections_share_one_gemv",)),
    Mutant("lut-gemv-table-lanes-collide", "pallas_kernels/gemv_4bit_lut.py",
           'f"add.u32 tb{i}, l, {16 * i};"', 'f"add.u32 tb{i}, l, {32 * i};"',
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_emulated_matches_twin",)),
    # A layout that still gives every entry its own word, but 4 lanes of a
    # warp a bank: only the bank count sees it.
    Mutant("lut-gemv-table-bank-conflicts", "pallas_kernels/gemv_4bit_lut.py",
           'return [f"and.b32 {reg}, {reg}, 63;", f"shl.b32 {reg}, {reg}, 2;",',
           'return [f"and.b32 {reg}, {reg}, 63;", f"shr.u32 {tmp}, {reg}, 4;", '
           'f"and.b32 {reg}, {reg}, 15;", f"shl.b32 {reg}, {reg}, 2;", '
           'f"add.u32 {reg}, {reg}, {tmp};", f"shl.b32 {reg}, {reg}, 2;",',
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_table_has_no_bank_conflicts",)),
    Mutant("lut-gemv-reduce-keeps-wrong-half",
           "pallas_kernels/gemv_4bit_lut.py",
           'f"selp.f32 kp, {hi}, {lo_}, p;"', 'f"selp.f32 kp, {lo_}, {hi}, p;"',
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_emulated_matches_twin",)),
    Mutant("lut-gemv-codes-column-off", "pallas_kernels/gemv_4bit_lut.py",
           '"mad.lo.u32 ca, a, 4, ca;"', '"mad.lo.u32 ca, a, 2, ca;"',
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_emulated_matches_twin",)),
    # The TMA warp GEMV's PTX (run by the emulator): the MMA's A operand
    # with rows g + 8 and bytes 1 swapped, and the x row of the MMA column.
    Mutant("warp-tma-mma-operand-order", "pallas_kernels/gemv_4bit_warp_tma.py",
           'f"{mma} {{{acc}0, {acc}1, {acc}2, {acc}3}}, {{pa0, pb0, pa1, pb1}}, "',
           'f"{mma} {{{acc}0, {acc}1, {acc}2, {acc}3}}, {{pa0, pa1, pb0, pb1}}, "',
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_ptx_emulated_matches_weight",)),
    Mutant("warp-tma-x-row", "pallas_kernels/gemv_4bit_warp_tma.py",
           'lines += [f"rem.u32 a, g, {m};"', 'lines += [f"rem.u32 a, c, {m};"',
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_ptx_emulated_matches_weight",)),
    # The default config not fitted to the shared memory.
    Mutant("warp-tma-default-unfitted", "pallas_kernels/gemv_4bit_warp_tma.py",
           "functools.partial(smem_bytes, tuple(ns), k, m=MAX_M, kchunks=kchunks,\n"
           "                        decode=decode))",
           "lambda **_: 0)",
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_default_config_fits_shared_memory",)),
    # K chunks a program: the accumulators not carried between a row
    # tile's steps (loaded on its first chunk instead of the others).
    Mutant("warp-tma-kchunks-accumulators-lost",
           "pallas_kernels/gemv_4bit_warp_tma.py",
           'lines += [f"@pf ld.shared.v4.f32 {{{v}0, {v}1, {v}2, {v}3}}, "',
           'lines += [f"@!pf ld.shared.v4.f32 {{{v}0, {v}1, {v}2, {v}3}}, "',
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_ptx_emulated_k_chunks_a_program",)),
    # The default's row groups taken as rounded, past one wave of SMs.
    Mutant("warp-tma-rows-overshoot-the-wave",
           "pallas_kernels/gemv_4bit_warp_tma.py",
           "share = min(range(total, 0, -1), key=lambda t: makespan(",
           "share = min(range(total, 0, -1), key=lambda t: 0 * makespan(",
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_default_rows_keep_the_shortest_wave",)),
    # The RMSNorm kernel's mean over one value too few; the model taking
    # it for two rows.
    Mutant("rms-norm-mean-off", "pallas_kernels/rms_norm.py",
           "mean = jnp.sum(x * x) / jnp.float32(features)",
           "mean = jnp.sum(x * x) / jnp.float32(features - 1)",
           ("tests/kernels/rms_norm_test.py::"
            "test_interpreted_matches_reference",)),
    Mutant("rms-norm-kernel-for-two-rows", "jaxbnb/_src/models/norm_kernel.py",
           "if rows > MAX_ROWS or", "if rows > MAX_ROWS + 1 or",
           ("tests/models/generate_test.py::"
            "test_rms_norm_kernel_at_one_row",)),
    # The default taking q/k/v at M < 8 (slower at M = 2 and 4).
    Mutant("warp-tma-serves-groups", "pallas_kernels/gemv_4bit.py",
           "wanted = min(ns) >= WARP_TMA_GROUP_MIN_N",
           "wanted = min(ns) >= WARP_TMA_MIN_N",
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_served_where_it_was_measured_faster",)),
    # The "lds" decode reading another lane's copy of an entry.
    Mutant("warp-tma-lds-entry-stride", "pallas_kernels/gemv_4bit_warp_tma.py",
           'f"mad.lo.u32 ka{j}, kb{j}, 128, tw0;"',
           'f"mad.lo.u32 ka{j}, kb{j}, 132, tw0;"',
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_ptx_emulated_lds_decode_equals_prmt",)),
    Mutant("large-m-gemv-for-fp32", "jaxbnb/_src/quant/kernels.py",
           "return (m <= GEMV_MAX_M and jnp.dtype(dtype) != jnp.float32",
           "return (m <= GEMV_MAX_M",
           ("tests/quant/dispatch_test.py::test_large_m_routing[100-float32-"
            "None]",)),
    # q/k/v in one input: the token's key read at a query head's offset.
    Mutant("decode-attn-key-read-from-the-queries",
           "pallas_kernels/decode_attention.py",
           "kn = _rope(*(qkv_ref[b, nq + h, i] for i in lo_hi)",
           "kn = _rope(*(qkv_ref[b, h, i] for i in lo_hi)",
           (_ATTN + "test_matches_einsum_path[1-32-8-128-256-None-131-"
            "interpret]",)),
    # The layer read at run time: taken from the slot's word.
    Mutant("decode-attn-layer-from-the-slot-word",
           "pallas_kernels/decode_attention.py",
           "index, layer = index_ref[0], layer_ref[0]",
           "index, layer = index_ref[0], index_ref[0] % 3",
           (_ATTN + "test_layer_as_a_traced_array[interpret]",)),
    Mutant("decode-attn-mask-ignored", "pallas_kernels/decode_attention.py",
           "s = jnp.where((allowed != 0)[None, :], s, jnp.float32(_NEG))",
           "s = jnp.where((allowed != 2)[None, :], s, jnp.float32(_NEG))",
           (_ATTN + "test_matches_einsum_path[1-32-8-128-256-None-131-"
            "interpret]",)),
    Mutant("decode-attn-splits-combined-unweighted",
           "pallas_kernels/decode_attention.py",
           "w = jnp.exp(m - top[None])",
           "w = jnp.ones_like(m)",
           (_ATTN + "test_forced_splits[4-interpret]",)),
    Mutant("decode-attn-rope-sine-sign", "pallas_kernels/decode_attention.py",
           "return ((rnd(lo * c_lo) - rnd(hi * s_lo)).astype(dtype),",
           "return ((rnd(lo * c_lo) + rnd(hi * s_lo)).astype(dtype),",
           (_ATTN + "test_matches_einsum_path[1-32-8-128-256-None-131-"
            "interpret]",)),
    Mutant("gemv-prmt-odd-half-gets-even-x", "pallas_kernels/gemv_4bit.py",
           "zip(_fold(hi, folds), _fold(xe, folds),\n"
           "                                  _fold(lo, folds), _fold(xo, folds))",
           "zip(_fold(hi, folds), _fold(xe, folds),\n"
           "                                  _fold(lo, folds), _fold(xe, folds))",
           (_GEMV_TWIN,)),
    Mutant("warp-second-tile-reads-first-tiles-sums",
           "pallas_kernels/warp_mma.py",
           "sel = ((q // 16) == n // 2) & ((q % 4) == j)",
           "sel = ((q // 16) == n // 2) & ((q % 4) == j % 2)",
           ("tests/kernels/warp_mma_test.py::"
            "test_twin_reads_back_each_rows_dot_product[2-64]",)),
    Mutant("warp-one-absmax-per-tile-block", "pallas_kernels/gemv_4bit.py",
           "parts = max(1, blocksize // 2 // p)",
           "parts = 1",
           ("tests/kernels/gemv_4bit_test.py::"
            "test_interpret_matches_dequant_matmul"
            "[5-33-768-256-nf4-float16-True-config21-False]",)),
    Mutant("quantize-bucket-ties-go-up", "pallas_kernels/quantize_4bit.py",
           "return lo + jnp.where(x > t_ref[lo], 1, 0)",
           "return lo + jnp.where(x >= t_ref[lo], 1, 0)",
           ("tests/kernels/quantize_4bit_test.py::"
            "test_gather_tree_gives_the_same_codes",)),
    Mutant("quantize-smem-off-by-default", "pallas_kernels/quantize_4bit.py",
           "smem_threads=32 * num_warps if shared else 0,",
           "smem_threads=0,",
           ("tests/kernels/quantize_4bit_test.py::test_smem_defaults",)),
    Mutant("quantize-smem-threshold-offset", "pallas_kernels/quantize_4bit.py",
           '_SMEM_THRESHOLDS}];",',
           '_SMEM_THRESHOLDS - 4}];",',
           ("tests/kernels/quantize_4bit_test.py::"
            "test_smem_fill_ptx_holds_the_tables",)),
    Mutant("quantize-smem-fill-skips-the-thresholds",
           "pallas_kernels/quantize_4bit.py",
           "for c in range(-(-chunks // threads)):",
           "for c in range(chunks // threads):",
           ("tests/kernels/quantize_4bit_test.py::"
            "test_smem_fill_ptx_holds_the_tables",)),
    Mutant("quantize-l2-hints-never-asked",
           "jaxbnb/_src/quant/ops.py",
           "bool(compress_statistics))",
           "False)",
           ("tests/kernels/quantize_4bit_test.py::"
            "test_double_quantization_asks_for_the_hints",)),
    Mutant("quantize-l2-hints-swapped", "pallas_kernels/quantize_4bit.py",
           'dict(eviction_policy="evict_last") if evict',
           'dict(eviction_policy="evict_first") if evict',
           ("tests/kernels/quantize_4bit_test.py::"
            "test_l2_hints_lower_on_the_stream_and_the_absmax",)),
    Mutant("time-jax-short-call-not-subtracted",
           "jaxbnb/_src/tools/measure.py",
           "        t -= call(short)",
           "        call(short)",
           ("tests/tools/bench_test.py::"
            "test_time_jax_takes_the_difference_of_a_long_and_a_short_call",)),
    Mutant("nested-kernel-offset-not-subtracted",
           "pallas_kernels/quantize_nested.py",
           "v = pltriton.load(x_ref, mask=mask, other=0) - off_ref[0]",
           "v = pltriton.load(x_ref, mask=mask, other=0)",
           ("tests/kernels/quantize_nested_test.py::"
            "test_the_offset_is_subtracted_inside",)),
    Mutant("quantize-max-trusted-with-nans-in-interpret",
           "pallas_kernels/quantize_4bit.py",
           'quant_type == "nf4", max_skips_nan=not interpret,',
           'quant_type == "nf4", max_skips_nan=True,',
           ("tests/kernels/quantize_4bit_test.py::"
            "test_interpret_matches_reference[2368-64-nf4-bfloat16-None]",)),
    Mutant("nested-max-trusted-with-nans-in-interpret",
           "pallas_kernels/quantize_nested.py",
           "max_skips_nan=not interpret, count=count",
           "max_skips_nan=True, count=count",
           ("tests/kernels/quantize_nested_test.py::"
            "test_matches_the_reference_search[10240-2-interpret]",)),
    Mutant("nested-kernel-mean-without-its-factor",
           "pallas_kernels/quantize_nested.py",
           "mean_factor(count), interpret)",
           "np.float32(1), interpret)",
           ("tests/kernels/quantize_nested_test.py::"
            "test_the_mean_made_inside[8525-interpret]",)),
    Mutant("round-to-excess-precision", "pallas_kernels/_backend.py",
           "return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)",
           "return x.astype(jnp.bfloat16).astype(jnp.float32)",
           (_GEMV_TWIN,)),
    # ----------------------------------------------------------- models
    Mutant("tp-shard-absmax-from-code-0", "jaxbnb/_src/quant/ops.py",
           "index = first + jnp.arange(qs.absmax.shape[0], dtype=jnp.int32)",
           "index = jnp.arange(qs.absmax.shape[0], dtype=jnp.int32)",
           ("tests/models/tensor_parallel_test.py::"
            "test_greedy_tokens_match_single_device[tensor=4-nf4-dq]",)),
    Mutant("rope-off", "jaxbnb/_src/models/llama.py",
           "q, k = rope.apply_rope(q, cos, sin), rope.apply_rope(k, cos, sin)",
           "q, k = q, k",
           (_LOGITS + "[llama3]",)),
    Mutant("rope-rotation-reversed", "jaxbnb/_src/models/rope.py",
           "jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)",
           "jnp.concatenate([x[..., half:], -x[..., :half]], axis=-1)",
           (_LOGITS + "[llama3]",)),
    Mutant("kv-cache-slot-off", "jaxbnb/_src/models/llama.py",
           "start = (jnp.asarray(layer, jnp.int32), zero, index, zero, zero)",
           "start = (jnp.asarray(layer, jnp.int32), zero, index + 1, zero, "
           "zero)",
           (_DECODE + "[llama3]",)),
    Mutant("causal-mask-future-leak", "jaxbnb/_src/models/llama.py",
           "allowed = (k_slot[None, :] <= q_slot[:, None])[None]",
           "allowed = (k_slot[None, :] <= q_slot[:, None] + 1)[None]",
           (_LOGITS + "[llama3]",)),
    Mutant("sliding-window-off-by-one", "jaxbnb/_src/models/llama.py",
           "masks[w] = allowed & (dist < w)",
           "masks[w] = allowed & (dist <= w)",
           (_LOGITS + "[mistral]",)),
    Mutant("gqa-grouping-interleaved", "jaxbnb/_src/models/llama.py",
           "q = q.reshape(b, t, nkv, g, d)",
           "q = q.reshape(b, t, g, nkv, d).swapaxes(2, 3)",
           (_LOGITS + "[llama3]",)),
    # The model's RMSNorm formula (`rms_norm.reference`, via norm_kernel).
    Mutant("rmsnorm-weight-dropped", "pallas_kernels/rms_norm.py",
           "return weight.astype(x.dtype) * h.astype(x.dtype)",
           "return h.astype(x.dtype)",
           (_LOGITS + "[llama3]",)),
    Mutant("rmsnorm-eps-dropped", "pallas_kernels/rms_norm.py",
           "keepdims=True) + eps)",
           "keepdims=True))",
           (_LOGITS + "[llama3]", _LOGITS + "[qwen2]", _LOGITS + "[mistral]")),
    Mutant("top-k-ignored", "jaxbnb/_src/models/sampling.py",
           "keep = jnp.where(top_k > 0, rank < top_k, True)",
           "keep = jnp.where(top_k > 0, rank >= 0, True)",
           (_SAMPLING,)),
    Mutant("top-p-ignored", "jaxbnb/_src/models/sampling.py",
           "return keep & keep_p",
           "return keep",
           (_SAMPLING,)),
    Mutant("temperature-ignored", "jaxbnb/_src/models/sampling.py",
           "logits = logits.astype(jnp.float32) / jnp.asarray(temperature, "
           "jnp.float32)",
           "logits = logits.astype(jnp.float32)",
           (_SAMPLING,)),
    Mutant("repetition-penalty-inverted", "jaxbnb/_src/models/sampling.py",
           "jnp.where(logits > 0, logits / penalty, logits * penalty)",
           "jnp.where(logits > 0, logits * penalty, logits / penalty)",
           (_SAMPLING,)),
    # generate(): the sampling options and keys must reach every step.
    Mutant("generate-cache-key-ignores-attention-switch",
           "jaxbnb/_src/models/generate.py",
           "decode_kernel.attention_choice(), *key)",
           "*key)",
           ("tests/models/generate_test.py::"
            "test_attention_switch_is_part_of_the_compile_cache_key",)),
    Mutant("generate-top-p-not-forwarded", "jaxbnb/_src/models/generate.py",
           'top_p=params["top_p"])',
           "top_p=1.0)",
           (_GENERATE_SAMPLING,)),
    Mutant("generate-temperature-not-forwarded",
           "jaxbnb/_src/models/generate.py",
           'temperature=params[\n            "temperature"]',
           "temperature=1.0",
           (_GENERATE_SAMPLING,)),
    Mutant("generate-same-key-every-step", "jaxbnb/_src/models/generate.py",
           "sampling.step_keys(keys, step)",
           "sampling.step_keys(keys, 0)",
           ("tests/models/generate_test.py::"
            "test_each_sampling_step_draws_with_its_own_key",)),
    # ----------------------------------------------------------- quant
    Mutant("4bit-pack-nibbles-swapped", "jaxbnb/_src/quant/reference.py",
           "packed = (q[:, 0] << 4) | q[:, 1]",
           "packed = (q[:, 1] << 4) | q[:, 0]",
           _cases(_Q4, *_BNB4_CASES)),
    Mutant("4bit-unpack-nibbles-swapped", "jaxbnb/_src/quant/reference.py",
           "jnp.stack([packed >> 4, packed & 0xF], axis=-1)",
           "jnp.stack([packed & 0xF, packed >> 4], axis=-1)",
           _cases(_DQ4, *_BNB4_CASES)),
    Mutant("4bit-absmax-not-applied", "jaxbnb/_src/quant/reference.py",
           "return (table[codes] * scale).astype(dtype)",
           "return table[codes].astype(dtype)",
           _cases(_DQ4, *_BNB4_CASES)),
    Mutant("nf4-code-entry-changed", "jaxbnb/_src/quant/codebooks.py",
           "        0.07958029955625534,",
           "        0.08958029955625534,",
           (_BNB4 + "::test_maps_match_bnb", *_cases(_DQ4, *_BNB4_CASES))),
    Mutant("nf4-thresholds-double-rounded", "jaxbnb/_src/quant/codebooks.py",
           "        _float_literal(t)\n",
           "        np.float32(float(t))\n",
           (_Q4 + "[thresh_nf4_float32]",
            "tests/quant/codebooks_test.py")),
    Mutant("fp4-sign-flipped", "jaxbnb/_src/quant/reference.py",
           "sign = jnp.where(x < 0, jnp.uint8(8), jnp.uint8(0))",
           "sign = jnp.where(x > 0, jnp.uint8(8), jnp.uint8(0))",
           _cases(_Q4, *_BNB4_CASES)),
    Mutant("double-quant-offset-dropped", "jaxbnb/_src/quant/ops.py",
           "return deq + qs.offset.astype(jnp.float32)",
           "return deq",
           _cases(_DQ4, *_BNB4_CASES)),
    Mutant("double-quant-offset-not-subtracted", "jaxbnb/_src/quant/kernels.py",
           "q, nested_absmax = quantize_blockwise_flat(absmax - offset, code_np,",
           "q, nested_absmax = quantize_blockwise_flat(absmax, code_np,",
           _cases(_Q4, *_BNB4_CASES)),
    Mutant("int8-outlier-compare-flipped", "jaxbnb/_src/quant/reference.py",
           "outliers = absval >= thr",
           "outliers = absval < thr",
           (_BNB4 + "::test_int8_vectorwise_quant_matches_bnb",)),
    Mutant("int8-negative-outliers-missed", "jaxbnb/_src/quant/reference.py",
           "outliers = absval >= thr",
           "outliers = a2d >= thr",
           (_BNB4 + "::test_int8_vectorwise_quant_matches_bnb",
            "tests/quant/ops_test.py::test_int8_vectorwise_quant_outliers")),
    Mutant("matmul-4bit-grad-uses-w-transposed", "jaxbnb/_src/quant/matmul.py",
           "        g, w, (((1,), (0,)), ((), ())), precision=_PRECISION,",
           "        g, w, (((1,), (1,)), ((), ())), precision=_PRECISION,",
           ("tests/quant/matmul_test.py::test_grad_x_and_bias",)),
    # The same bug where it keeps the shapes right: a square weight
    # (q_proj, o_proj) gets dx = g @ W.T.
    Mutant("matmul-4bit-grad-square-weight-transposed",
           "jaxbnb/_src/quant/matmul.py",
           "  w = dequantize_weight(packed, qs, g.dtype)\n",
           "  w = dequantize_weight(packed, qs, g.dtype)\n"
           "  w = w.T if w.shape[0] == w.shape[1] else w\n",
           ("tests/quant/matmul_test.py::test_grad_x_and_bias",)),
    Mutant("state-dict-drops-nested-absmax", "jaxbnb/_src/quant/weights.py",
           '      out[prefix + "weight." + k] = v',
           '      if k != "nested_absmax":\n'
           '        out[prefix + "weight." + k] = v',
           ("tests/quant/weights_test.py::test_state_dict_and_layout_round_trip",
            "tests/quant/ops_test.py::test_params4bit_state_dict_round_trip")),
    Mutant("orbax-layout-drops-nested-absmax", "jaxbnb/_src/quant/weights.py",
           '_QS_ARRAYS = ("absmax", "code", "offset", "nested_absmax", '
           '"nested_code")',
           '_QS_ARRAYS = ("absmax", "code", "offset", "nested_code")',
           ("tests/quant/weights_test.py::test_state_dict_and_layout_round_trip",
            "tests/io/orbax_io_test.py::test_roundtrip_bit_identical")),
    # ----------------------------------------------------------- layers
    Mutant("hf-skip-without-module-boundary", "jaxbnb/_src/layers/skip.py",
           'if re.match(rf"(?:{pattern}){_BOUNDARY}", path):',
           'if re.match(rf"(?:{pattern})", path):',
           ("tests/layers/quant_config_test.py::"
            "test_skips_reads_entries_as_transformers_5",)),
    Mutant("hf-skip-saved-glob-kept", "jaxbnb/_src/io/convert.py",
           "  skip = _regex_entries(q.skip_modules, sorted(linears))\n",
           "  skip = q.skip_modules\n",
           ("tests/io/convert_test.py::"
            "test_a_saved_glob_skip_entry_becomes_module_paths",)),
    Mutant("int8-merge-rounds-base-to-dtype", "jaxbnb/_src/layers/lora.py",
           "    return ops.int8_vectorwise_dequant(value.CB, value.SCB)\n",
           "    return value.dequantize()\n",
           ("tests/layers/lora_test.py::test_merge_int8_as_peft",)),
    Mutant("gguf-rope-freqs-ignored", "jaxbnb/_src/io/gguf_source.py",
           "      if self._rope_freqs is None:\n",
           "      if True:\n",
           ("tests/io/gguf_source_test.py::"
            "test_llama3_rope_freqs_tensor_becomes_rope_scaling",)),
    Mutant("embedding8bit-reciprocal-scale",
           "jaxbnb/_src/layers/embedding.py",
           "return cb.astype(jnp.float32) * (scb / divisor)[:, None]",
           "return cb.astype(jnp.float32) * (scb * (1 / divisor))[:, None]",
           ("tests/layers/embedding_test.py::"
            "test_embedding8bit_matches_numpy_row_quant",)),
    Mutant("embedding-ids-below-minus-n-wrap", "jaxbnb/_src/layers/embedding.py",
           "    in_range &= ids >= -n\n", "",
           ("tests/layers/embedding_test.py::"
            "test_ids_outside_the_table_give_nan_as_jnp_take",)),
    Mutant("shared-module-replaced-once", "jaxbnb/_src/layers/common.py",
           "  for parent, key, new in edges:\n",
           "  for parent, key, new in edges[:1]:\n",
           ("tests/layers/embedding_test.py::"
            "test_quantize_embeddings_keeps_a_shared_embedding_shared",
            "tests/layers/layers_test.py::"
            "test_quantize_params_nnx_keeps_a_shared_layer_shared")),
    Mutant("quantized-bias-dropped", "jaxbnb/_src/layers/common.py",
           "None if bias is None else bias.astype(dtype))",
           "None)",
           ("tests/layers/layers_test.py::test_linen_dense4bit_equals_dequant_dot",
            _LLAMA + "::test_4bit_model_equals_dequantized_float_model")),
    Mutant("quantized-bias-negated", "jaxbnb/_src/layers/common.py",
           "None if bias is None else bias.astype(dtype))",
           "None if bias is None else -bias.astype(dtype))",
           ("tests/layers/layers_test.py::test_linen_dense4bit_equals_dequant_dot",
            _LLAMA + "::test_4bit_model_equals_dequantized_float_model")),
    Mutant("linear-bias-dropped", "jaxbnb/_src/layers/linear.py",
           "y = y + self.bias[...].astype(jnp.float32)",
           "y = y",
           ("tests/layers/linear_test.py::test_linear_matches_numpy_in_float32",
            _LOGITS + "[qwen2]")),
    Mutant("linear-bias-negated", "jaxbnb/_src/layers/linear.py",
           "y = y + self.bias[...].astype(jnp.float32)",
           "y = y - self.bias[...].astype(jnp.float32)",
           ("tests/layers/linear_test.py::test_linear_matches_numpy_in_float32",
            _LOGITS + "[qwen2]")),
    # ----------------------------------------------------------- optim
    # jaxbnb/_src/optim/rules.py: `update_8bit` (the 2-state branch, then
    # the 1-state one) and `update_32bit`, the reference the CPU runs.
    Mutant("optim-8bit-2state-no-op", "jaxbnb/_src/optim/rules.py",
           "    new = jnp.where(finite, new, pf)\n",
           "    new = pf\n",
           (_STEP + "[adam8bit]", _FIRST_STEP + "[adam]")),
    Mutant("optim-8bit-adam-half-step", "jaxbnb/_src/optim/rules.py",
           "step_size = (-lr * c2) / c1",
           "step_size = (-0.5 * lr * c2) / c1",
           (_STEP + "[adam8bit]", _FIRST_STEP + "[adam]")),
    Mutant("optim-8bit-1state-no-op", "jaxbnb/_src/optim/rules.py",
           "new = jnp.where(finite, _round_to(new, dt), pf)",
           "new = pf",
           (_STEP + "[lion8bit]", _STEP + "[sgd8bit]", _FIRST_STEP + "[lion]")),
    Mutant("optim-8bit-absmax-not-requantized", "jaxbnb/_src/optim/rules.py",
           "    new_s1 = _store_state(s1, True, shape)\n"
           "    new_s2 = _store_state(s2, False, shape)\n",
           "    new_s1 = dataclasses.replace(_store_state(s1, True, shape),\n"
           "                                 absmax=state1.absmax)\n"
           "    new_s2 = dataclasses.replace(_store_state(s2, False, shape),\n"
           "                                 absmax=state2.absmax)\n",
           (_RULES + "::test_8bit_states_requantized_with_new_absmax",
            _STEP + "[adam8bit]")),
    Mutant("tma-first-split-only", "pallas_kernels/gemv_4bit_tma.py",
           "  return sum_splits(part)\n",
           "  return part[0]\n",
           ("tests/kernels/gemv_4bit_tma_test.py::"
            "test_interpret_matches_dequant_matmul"
            "[False-1-1000-4608-config0-bfloat16-nf4]",)),
    Mutant("tma-absmax-offset-dropped", "pallas_kernels/gemv_4bit_tma.py",
           "nested_code.astype(jnp.float32), offset, 256,",
           "nested_code.astype(jnp.float32), 0.0, 256,",
           ("tests/kernels/gemv_4bit_tma_test.py::"
            "test_interpret_matches_dequant_matmul"
            "[False-3-64-4608-config1-float16-fp4]",)),
    Mutant("optim-32bit-adam-half-step", "jaxbnb/_src/optim/rules.py",
           "step_size = -lr * c2 / c1",
           "step_size = -0.5 * lr * c2 / c1",
           _cases(_RULES + "::test_update_32bit_matches_float64_formulas",
                  "[adam-fp32]", "[adam-bf16]")),
    # LAMB's update norm with bnb CPU backend's formula (no bias
    # corrections), LARS's with the weight-decayed gradient: both differ
    # from bnb's CUDA kernels.
    Mutant("lamb-unorm-without-bias-corrections",
           "jaxbnb/_src/optim/rules.py",
           "u = ((s1 * (one / (one - jnp.power(b1, step))))",
           "u = ((s1 * (one / (one - jnp.power(b1, step * 0.0 + 1.0))))",
           (_TRUST + "::test_trajectory_matches_bitsandbytes[lamb]",)),
    Mutant("lars-unorm-after-weight-decay", "jaxbnb/_src/optim/rules.py",
           "pre = jnp.where(step == 1, g_raw, s1 * b1 + g_raw)",
           "pre = jnp.where(step == 1, gf, s1 * b1 + gf)",
           (_TRUST + "::test_trajectory_matches_bitsandbytes[lars_wd]",
            _TRUST + "::test_rules_match_the_cuda_formulas[lars-float32]")),
    # PEFT's per-module alpha and its layer filter.
    Mutant("lora-alpha-pattern-ignored", "jaxbnb/_src/layers/lora.py",
           "alpha = _pattern_value(self.alpha_pattern, path, self.lora_alpha)",
           "alpha = self.lora_alpha",
           ("tests/io/peft_test.py::test_golden_logits_match_peft"
            "[llama3_patterns_layers]",)),
    Mutant("lora-layers-to-transform-ignored", "jaxbnb/_src/layers/lora.py",
           "    if self.layers_to_transform is None or isinstance(names, str) or (",
           "    if True or isinstance(names, str) or (",
           ("tests/io/peft_test.py::test_golden_resave_gives_peft_s_files"
            "[llama3_patterns_layers]",)),
    # modules_to_save: PEFT's plain suffix test (no "." boundary), and the
    # saved copies must be loaded.
    Mutant("modules-to-save-dot-boundary",
           "jaxbnb/_src/layers/modules_to_save.py",
           "    if not any(path.endswith(n) for n in names):",
           "    if not any(path == n or path.endswith('.' + n) for n in names):",
           ("tests/io/peft_test.py::test_golden_logits_match_peft"
            "[llama3_modules_to_save]",)),
    Mutant("modules-to-save-untied-head-not-copied",
           "jaxbnb/_src/layers/modules_to_save.py",
           "  head.weight.set_value(jnp.array(weight, copy=True))",
           "  pass",
           ("tests/io/peft_test.py::test_golden_logits_match_peft"
            "[qwen2_tied_embed_to_save]",)),
    Mutant("modules-to-save-still-adapted", "jaxbnb/_src/layers/lora.py",
           "        re.match(_saved_regex(m), path)",
           "        False",
           ("tests/io/peft_test.py::test_golden_logits_match_peft"
            "[llama3_all_linear_mlp_saved]",)),
    Mutant("modules-to-save-not-loaded", "jaxbnb/_src/io/peft.py",
           "  for name, value in saved_values.items():\n"
           "    params[name].set_value(value)",
           "  for name, value in saved_values.items():\n    pass",
           ("tests/io/peft_test.py::test_golden_logits_match_peft"
            "[mistral_modules_to_save_embed_mlp]",)),
    # LoRA's bias option: the saved biases of modules without an adapter
    # loaded; "lora_only" trains the adapted linears' biases only.
    Mutant("lora-bias-not-loaded", "jaxbnb/_src/io/peft.py",
           "  for var, value in base_values + list(bias_values.values()):",
           "  for var, value in base_values:",
           ("tests/io/peft_test.py::test_golden_logits_match_peft"
            "[qwen2_bias_all]",)),
    Mutant("lora-only-trains-every-bias", "jaxbnb/_src/layers/lora_bias.py",
           'if bias == "all"\n',
           'if bias != "none"\n',
           ("tests/io/peft_test.py::test_golden_resave_gives_peft_s_files"
            "[qwen2_bias_lora_only]",)),
    # lora_bias: B's bias in the forward, scaled in the merge.
    Mutant("lora-b-bias-dropped", "jaxbnb/_src/layers/lora.py",
           "    lora = lora + lora_bias.astype(dt)",
           "    lora = lora",
           ("tests/io/peft_test.py::test_golden_logits_match_peft"
            "[qwen2_lora_bias]",)),
    Mutant("lora-b-bias-merged-unscaled", "jaxbnb/_src/layers/lora.py",
           "bias.astype(b.dtype) + b * self.scaling",
           "bias.astype(b.dtype) + b",
           ("tests/io/peft_test.py::test_golden_merged_equals_unmerged"
            "[qwen2_lora_bias]",)),
    # k past whole 1024s: the codes' rows padded to 8 bytes, not TMA's 16.
    Mutant("codes-tiles-pad-8", "pallas_kernels/gemv_4bit_lut.py",
           "pad = -(k // 64) % _CODES", "pad = -(k // 64) % 8",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_codes_tiles_pads_rows_to_16_bytes",
            "tests/kernels/gemv_4bit_lut_test.py::"
            "test_ptx_emulated_matches_twin")),
    # The Mosaic GPU GEMVs taking k whose chunks leave SMs idle
    # (Qwen2.5-7B's down: slower than Triton).
    Mutant("mosaic-fill-ignored", "pallas_kernels/gemv_4bit.py",
           ">= MOSAIC_MIN_FILL * num_sms", ">= 0 * num_sms",
           ("tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_mosaic_fills_sms",
            "tests/kernels/gemv_4bit_warp_tma_test.py::"
            "test_served_where_it_was_measured_faster")),
    # The table GEMV at k = 1536 (slower than "reduce").
    Mutant("lut-min-k-ignored", "pallas_kernels/gemv_4bit.py",
           "if m != 1 or k < LUT_MIN_K or", "if m != 1 or",
           ("tests/kernels/gemv_4bit_lut_test.py::"
            "test_default_group_is_one_launch_of_the_tables",)),
    # Every layer's kernel traced and lowered again (the 8B decode's
    # lowering 32 times one layer's).
    Mutant("lowered-once-never-hits", "pallas_kernels/lowering.py",
           "hit = _JITTED.get((head, _constants()))", "hit = None",
           ("tests/kernels/lowering_test.py::"
            "test_one_trace_per_distinct_launch",
            "tests/kernels/lowering_test.py::"
            "test_decode_layers_lower_each_kernel_once")),
    # A kernel constant set by a test reusing the function traced before.
    Mutant("lowered-once-ignores-constants", "pallas_kernels/lowering.py",
           "        if k.isupper() and isinstance(v, _SIMPLE):",
           "        if False:",
           ("tests/kernels/lowering_test.py::"
            "test_kernel_constants_key_the_cache",)),
    # JAX 0.12.1: the persistent cache hangs a run of several CPU processes.
    Mutant("compile-cache-on-in-cpu-processes",
           "jaxbnb/_src/tools/compile_cache.py",
           "  if _multi_process_cpu():\n    return None\n", "",
           ("tests/tools/compile_cache_test.py::"
            "test_several_cpu_processes_run_without_the_cache",)),
    Mutant("compile-cache-own-folder-in-cpu-processes-silent",
           "jaxbnb/_src/tools/compile_cache.py",
           "    if _multi_process_cpu():\n      print(",
           "    if False:\n      print(",
           ("tests/tools/compile_cache_test.py::"
            "test_jax_own_cache_folder_in_several_cpu_processes_warns",)),
    # Kernel inputs handed to inline PTX as written refs: JAX 0.12.1 refuses
    # the kernel (older JAX takes it, so this one is killed from 0.12.1 on).
    Mutant("inline-ptx-inputs-written", "pallas_kernels/_backend.py",
           "  if write or \"write\" not in getattr(",
           "  if True or \"write\" not in getattr(",
           ("tests/kernels/backend_test.py::"
            "test_ref_type_declares_read_only_refs",
            "tests/kernels/gemv_4bit_tma_test.py::test_lowers_for_cuda")),
    # A paged state moved back by a jitted identity: on the CPU its type
    # keeps the host memory space, and the step's first op refuses it.
    Mutant("paged-move-by-identity", "jaxbnb/_src/optim/paged.py",
           "    return jax.jit(lambda a: jax.device_put(a, space),",
           "    return jax.jit(lambda a: a,",
           ("tests/optim/paged_test.py::"
            "test_paged_state_moves_back_to_device_memory",)),
)
# fmt: on

# Written next to the copies and loaded with `-p`: records which jaxbnb the
# pytest process imported (at the end, so it never imports jax before the
# tests' conftest sets XLA_FLAGS).
_PROBE = '''
import os, sys


def pytest_sessionfinish(session, exitstatus):
  mod = sys.modules.get("jaxbnb")
  if mod is None:
    try:
      import jaxbnb as mod
    except Exception:  # pylint: disable=broad-except; reported by the check
      mod = None
  with open(os.environ["JAXBNB_MUTATION_PROBE"], "w") as f:
    f.write(getattr(mod, "__file__", "") or "")
'''

_COPIED = ("jaxbnb", "pallas_kernels", "tests", "pyproject.toml", "README.md",
           "docs")
_IGNORE = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.pyc",
                                 ".pytest_cache")


class StaleMutant(Exception):
  """A mutant's text is not found exactly once: the table needs updating."""


def check_table(mutants=MUTANTS, root: pathlib.Path = ROOT) -> None:
  """Raises StaleMutant unless every mutant applies exactly once."""
  names = [m.name for m in mutants]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise StaleMutant(f"duplicate mutant names: {dupes}")
  problems = []
  for m in mutants:
    if m.old == m.new:
      problems.append(f"{m.name}: `new` equals `old`")
    if not m.tests:
      problems.append(f"{m.name}: no tests selected")
    for t in m.tests:
      if not (root / t.split("::")[0]).is_file():
        problems.append(f"{m.name}: test file of {t!r} not found")
    src = root / m.path
    if not src.is_file():
      problems.append(f"{m.name}: {m.path} not found")
      continue
    count = src.read_text(encoding="utf-8").count(m.old)
    if count != 1:
      problems.append(f"{m.name}: the old text occurs {count} times in "
                      f"{m.path} (must be exactly once):\n"
                      + textwrap.indent(m.old, "    | "))
  if problems:
    raise StaleMutant("stale mutation table (tests/mutation.py):\n  "
                      + "\n  ".join(problems))


def make_copy(dest: pathlib.Path) -> pathlib.Path:
  dest.mkdir(parents=True)
  for name in _COPIED:
    src = ROOT / name
    if src.is_dir():
      shutil.copytree(src, dest / name, ignore=_IGNORE, symlinks=True)
    elif src.is_file():
      shutil.copy2(src, dest / name)
  return dest


def apply(m: Mutant, tree: pathlib.Path) -> None:
  """Applies `m` to the copy at `tree` (never to the working tree)."""
  assert tree.resolve() != ROOT, "refusing to mutate the working tree"
  src = tree / m.path
  text = src.read_text(encoding="utf-8")
  if text.count(m.old) != 1:
    raise StaleMutant(f"{m.name}: old text occurs {text.count(m.old)} times "
                      f"in {m.path}")
  src.write_text(text.replace(m.old, m.new), encoding="utf-8")


def _env(tree: pathlib.Path, probe_dir: pathlib.Path,
         probe_out: pathlib.Path) -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  # The copy first: it shadows the editable install's finder, which sits
  # after the path-based finder on sys.meta_path (asserted by the probe).
  env["PYTHONPATH"] = os.pathsep.join([str(tree), str(probe_dir)])
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  env["JAXBNB_MUTATION_PROBE"] = str(probe_out)
  env.pop("PYTEST_ADDOPTS", None)
  return env


@dataclasses.dataclass
class Result:
  name: str
  status: str  # "killed", "survived", "error", "timeout"
  seconds: float
  rc: int | None
  detail: str  # the killing test, or why it is an error
  output: str


_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def run_pytest(tree: pathlib.Path, tests, probe_dir: pathlib.Path,
               timeout: float, label: str) -> tuple[int | None, str, float,
                                                    str]:
  """pytest on `tests` in `tree`: (rc, output, seconds, imported jaxbnb)."""
  probe_out = tree.parent / f"{label}.probe"
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         "-p", "no:randomly", "-p", "_mutation_probe", *tests]
  start = time.monotonic()
  try:
    proc = subprocess.run(cmd, cwd=tree, env=_env(tree, probe_dir, probe_out),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout, check=False)
    rc, out = proc.returncode, proc.stdout
  except subprocess.TimeoutExpired as e:
    out = e.stdout or ""
    rc = None
    out = out if isinstance(out, str) else out.decode(errors="replace")
  seconds = time.monotonic() - start
  imported = probe_out.read_text() if probe_out.exists() else ""
  return rc, out, seconds, imported


def _inside(path: str, tree: pathlib.Path) -> bool:
  try:
    return pathlib.Path(path).resolve().is_relative_to(tree.resolve())
  except (OSError, ValueError):
    return False


def check_isolation(tree: pathlib.Path, probe_dir: pathlib.Path) -> str:
  """`import jaxbnb` in the pytest environment resolves inside the copy."""
  probe_out = tree.parent / "isolation.probe"
  code = ("import jaxbnb, pallas_kernels; "
          "print(jaxbnb.__file__); print(pallas_kernels.__file__)")
  out = subprocess.run([sys.executable, "-c", code], cwd=tree,
                       env=_env(tree, probe_dir, probe_out),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, check=False).stdout
  files = out.split()
  if len(files) != 2 or not all(_inside(f, tree) for f in files):
    raise SystemExit(
        "mutation check: the copy's jaxbnb is not the one imported (the "
        f"editable install wins?); imported:\n{out}")
  return files[0]


def run_mutant(m: Mutant, work: pathlib.Path, probe_dir: pathlib.Path,
               timeout: float, keep: bool) -> Result:
  tree = make_copy(work / m.name / "tree")
  try:
    apply(m, tree)
    rc, out, seconds, imported = run_pytest(tree, m.tests, probe_dir, timeout,
                                            m.name)
  finally:
    if not keep:
      shutil.rmtree(work / m.name, ignore_errors=True)
  if rc is None:
    return Result(m.name, "timeout", seconds, rc,
                  f"no result in {timeout:.0f}s", out)
  if not _inside(imported, tree):
    return Result(m.name, "error", seconds, rc,
                  f"imported jaxbnb from {imported or '?'}, not the copy", out)
  failed = _FAILED.findall(out)
  if rc == 1 and failed:
    return Result(m.name, "killed", seconds, rc, failed[0][1], out)
  if rc == 0:
    return Result(m.name, "survived", seconds, rc, "all selected tests pass",
                  out)
  why = {1: "exit 1 without a failed test", 2: "interrupted (collection or "
         "import error)", 3: "pytest internal error", 4: "usage error",
         5: "no tests collected"}.get(rc, f"exit {rc}")
  return Result(m.name, "error", seconds, rc, why, out)


def baseline_selection(mutants) -> list[str]:
  """The union of the selections (a file given whole covers its tests)."""
  out: list[str] = []
  for m in mutants:
    for t in m.tests:
      if t not in out:
        out.append(t)
  files = {t for t in out if "::" not in t}
  return [t for t in out if "::" not in t or t.split("::")[0] not in files]


BASELINE = "(baseline: unmutated)"


def run_baseline(selection, work: pathlib.Path, probe_dir: pathlib.Path,
                 timeout: float, keep: bool) -> Result:
  """The union of the selections on an unmutated copy: it must pass."""
  tree = make_copy(work / "baseline" / "tree")
  try:
    rc, out, seconds, imported = run_pytest(tree, selection, probe_dir,
                                            timeout, "baseline")
  finally:
    if not keep:
      shutil.rmtree(work / "baseline", ignore_errors=True)
  lines = out.strip().splitlines()
  summary = lines[-1].strip("= ") if lines else ""
  if not _inside(imported, tree):
    return Result(BASELINE, "error", seconds, rc,
                  f"imported jaxbnb from {imported or '?'}, not the copy", out)
  if rc != 0:
    return Result(BASELINE, "failed", seconds, rc,
                  f"exit {rc}: {summary}", out)
  return Result(BASELINE, "passed", seconds, rc,
                f"{len(selection)} selections: {summary}", out)


def _tail(text: str, lines: int = 25) -> str:
  return textwrap.indent("\n".join(text.rstrip().splitlines()[-lines:]),
                         "    | ")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m tests.mutation",
      description="Apply curated semantic mutants to a temporary copy of the "
      "source and check that the fast tests catch each one.")
  parser.add_argument("--jobs", type=int, default=2,
                      help="mutants run in parallel (default 2)")
  parser.add_argument("--list", action="store_true",
                      help="print the mutant table and exit")
  parser.add_argument("--only", action="append", default=[], metavar="NAME",
                      help="run only this mutant (repeatable; comma lists)")
  parser.add_argument("--timeout", type=float, default=600,
                      help="seconds per pytest run (default 600)")
  parser.add_argument("--keep", action="store_true",
                      help="keep the temporary copies (for debugging)")
  parser.add_argument("--verbose", action="store_true",
                      help="print the pytest output of every mutant")
  args = parser.parse_args(argv)

  check_table()
  mutants = list(MUTANTS)
  if args.only:
    wanted = [n for o in args.only for n in o.split(",") if n]
    unknown = sorted(set(wanted) - {m.name for m in mutants})
    if unknown:
      parser.error(f"unknown mutant(s) {unknown}; see --list")
    mutants = [m for m in mutants if m.name in wanted]

  if args.list:
    for m in mutants:
      print(f"{m.name}\n  {m.path}\n  - {m.old!r}\n  + {m.new!r}")
      for t in m.tests:
        print(f"    {t}")
    print(f"{len(mutants)} mutants")
    return 0

  start = time.monotonic()
  work = pathlib.Path(tempfile.mkdtemp(prefix="jaxbnb-mutation-"))
  try:
    probe_dir = work / "probe"
    probe_dir.mkdir()
    (probe_dir / "_mutation_probe.py").write_text(_PROBE, encoding="utf-8")
    imported = check_isolation(make_copy(work / "isolation" / "tree"),
                               probe_dir)
    print(f"isolation: pytest runs import the copy's jaxbnb ({imported})")
    shutil.rmtree(work / "isolation", ignore_errors=True)

    # The baseline is the longest run: it goes first, the mutants fill the
    # other workers and its verdict gates the result at the end.
    selection = baseline_selection(mutants)
    results, base = [], None
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
      futures = [pool.submit(run_baseline, selection, work, probe_dir,
                             args.timeout * 2, args.keep)]
      futures += [pool.submit(run_mutant, m, work, probe_dir, args.timeout,
                              args.keep) for m in mutants]
      for fut in concurrent.futures.as_completed(futures):
        r = fut.result()
        print(f"{r.status.upper():9s} {r.name:42s} {r.seconds:5.0f}s  "
              f"{r.detail}", flush=True)
        if r.name == BASELINE:
          base = r
          if r.status != "passed" or args.verbose:
            print(_tail(r.output, 40))
          continue
        results.append(r)
        if args.verbose or r.status != "killed":
          print(_tail(r.output))
  finally:
    if not args.keep:
      shutil.rmtree(work, ignore_errors=True)
    else:
      print(f"copies kept in {work}")

  order = {m.name: i for i, m in enumerate(mutants)}
  results.sort(key=lambda r: order[r.name])
  killed = [r for r in results if r.status == "killed"]
  bad = [r for r in results if r.status != "killed"]
  print(f"\n{len(killed)} of {len(results)} mutants killed "
        f"(baseline {base.seconds:.0f}s, total "
        f"{time.monotonic() - start:.0f}s with {args.jobs} jobs)")
  for r in bad:
    print(f"  {r.status}: {r.name} ({r.detail})")
  if base.status != "passed":
    print(f"the selected tests fail on the unmutated copy ({base.detail}): "
          "fix them first; no kill above means anything")
    return 2
  return 0 if not bad else 1


if __name__ == "__main__":
  sys.exit(main())
