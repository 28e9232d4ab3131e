"""One QLoRA / LLM.int8 training step lowered for CUDA on an abstract H200
(`helpers.lowered_for_h200`: no GPU needed), kernel mode "pallas".

The forward and the backward pass of the frozen quantized base run the
GPU kernels; the GPU tests run them on the device machine's JAX, while CI
installs the newest one. A JAX release that breaks their tracing or
lowering inside `jax.grad`, `lax.scan` and an `nnx.Optimizer` update fails
here, on the CPU. (The numbers: tests/train/step_test.py.)
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import jaxbnb
from jaxbnb import models
from jaxbnb import train
from jaxbnb._src.train import step as step_lib
from jaxbnb.lora import LoRAConfig
from tests import helpers
from tests.train import common


@pytest.mark.parametrize("quant,kernels", [
    (models.QuantizationConfig.nf4(compute_dtype="bfloat16"),
     {"jaxbnb_dequantize_4bit", "jaxbnb_gemv_4bit_mma"}),
    (models.QuantizationConfig(load_in_8bit=True),
     {"jaxbnb_int8_gemm", "jaxbnb_int8_gemm_overflow"}),
], ids=["qlora-nf4-dq", "llm-int8"])
def test_train_step_lowers_for_cuda_with_the_kernels(quant, kernels):
  model = common.lora_model(quantization=quant, dtype=jnp.bfloat16,
                            lora=LoRAConfig(r=4, target_modules="all-linear"))
  opt = nnx.Optimizer(model, train.make_optimizer(
      train.TrainConfig(steps=2, seq_len=16)), wrt=nnx.LoRAParam)
  graphdef, changing, frozen = nnx.split((model, opt), step_lib.MUTABLE, ...)
  batch = {k: jax.ShapeDtypeStruct((1, 4, 16), jnp.int32 if k == "input_ids"
                                   else jnp.bool_)
           for k in ("input_ids", "attention_mask", "loss_mask")}
  with jaxbnb.kernel_mode("pallas"):
    text = helpers.lowered_for_h200(
        lambda c, f, b: step_lib._train_step(graphdef, c, f, b, False),
        changing, frozen, batch)
  assert set(re.findall(r"jaxbnb_[a-z0-9_]+", text)) >= kernels
