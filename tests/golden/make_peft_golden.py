"""Writes tests/golden/peft/: PEFT LoRA adapters on the tiny llama fixtures.

Run from the repository root with PyTorch, transformers and peft (the float
cases run on CPU; the nf4 case needs bitsandbytes and a CUDA GPU):

  .oracle/bin/python tests/golden/make_peft_golden.py
  .oracle/bin/python tests/golden/make_peft_golden.py --skip-4bit  # no GPU
  .oracle/bin/python tests/golden/make_peft_golden.py --only CASE  # one case

Each case loads a base model from tests/golden/llama/<base> (float32, eager
attention), applies `peft.get_peft_model` with `init_lora_weights=False`
(A and B both random, so the adapters change the output; DoRA magnitudes
are then scaled by random factors so DoRA differs from LoRA), saves the
adapter with PEFT's `save_pretrained` into tests/golden/peft/<case>/
(adapter_config.json + adapter_model.safetensors; README.md removed) and
writes expected.npz there:

  ids [2, 8], targets [2, 8]     fixed input ids and loss targets
  logits [2, 8, V]               the PEFT model's float32 logits (eval mode)
  loss                           mean over tokens of -log_softmax(logits)[t]
  grad/<key>                     d loss / d each adapter tensor, under its
                                 key in adapter_model.safetensors
  merged_logits [2, 8, V]        logits after merge_and_unload()

The *_bias_* cases train biases too (LoraConfig `bias`); random noise is
added to them, so that the saved biases differ from the base model's.

The *_modules_to_save* cases also train whole modules (PEFT's
`modules_to_save`); their copies are scaled by random factors so that they
differ from the base, and are saved under the modules' own names
(base_model.model.lm_head.weight).

llama3_lm_head_auto adapts lm_head, so PEFT's default
save_embedding_layers="auto" also saves the untied head's own weight as
base_model.model.lm_head.base_layer.weight (no gradient: not trainable).

VERSIONS.txt records the package versions and any case that was skipped
(with --skip-4bit); the tests skip exactly the cases listed there and fail
on any other missing fixture. `--only` regenerates the named cases and
records their versions on lines of their own in VERSIONS.txt. Never imported by the tests: torch, peft and
transformers are imported inside main() only.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "golden", "peft")
BASES = os.path.join("tests", "golden", "llama")
BATCH, SEQ = 2, 8

# case -> (base model, quantize to nf4?, LoraConfig arguments)
CASES = {
    # all-linear (q/k/v biases, tied embeddings: no lm_head adapter).
    "qwen2_r4_all_linear": ("qwen2", False, dict(
        r=4, lora_alpha=8, target_modules="all-linear")),
    # rsLoRA on a name list; the dropout only shows in the config (eval).
    "llama3_r8_rslora_qv": ("llama3", False, dict(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
        use_rslora=True, lora_dropout=0.1)),
    # DoRA on a regex selection (sliding-window model).
    "mistral_dora_regex": ("mistral", False, dict(
        r=4, lora_alpha=8,
        target_modules=r".*\.(q_proj|o_proj|up_proj|down_proj)",
        use_dora=True)),
    # QLoRA + DoRA: NF4 double-quantized base (float32 compute) on a GPU;
    # the DoRA norm comes from the dequantized weight.
    "llama3_nf4_dora": ("llama3", True, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"],
        use_dora=True)),
    # lm_head adapted on an untied model: the saved file also holds the
    # head's base weight (PEFT's default save_embedding_layers="auto").
    "llama3_lm_head_auto": ("llama3", False, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])),
    # Per-module ranks and alphas (a suffix key and a full-path key), on
    # the layers that layers_to_transform/layers_pattern select.
    "llama3_patterns_layers": ("llama3", False, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, "model.layers.1.mlp.down_proj": 6},
        alpha_pattern={"down_proj": 3, "q_proj": 16},
        layers_to_transform=[1], layers_pattern="layers")),
    # The same with rsLoRA, one layer index (an int) and PEFT's default
    # layer-index rule (no layers_pattern).
    "mistral_rslora_patterns": ("mistral", False, dict(
        r=8, lora_alpha=8, target_modules=["k_proj", "o_proj", "up_proj"],
        use_rslora=True, rank_pattern={"up_proj": 4},
        alpha_pattern={r"self_attn\.o_proj": 2}, layers_to_transform=0)),
    # Whole modules trained beside the adapters (PEFT's plain suffix test:
    # "norm" also selects every input_layernorm/post_attention_layernorm).
    "llama3_modules_to_save": ("llama3", False, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
        modules_to_save=["lm_head", "norm"])),
    # The embeddings and one whole MLP block (its three float linears).
    "mistral_modules_to_save_embed_mlp": ("mistral", False, dict(
        r=4, lora_alpha=16, target_modules=["k_proj", "o_proj"],
        modules_to_save=["embed_tokens", "layers.1.mlp"])),
    # On a model with tied embeddings PEFT trains an untied copy: of the
    # head (the input keeps the embeddings), or of the embeddings (the head
    # keeps the original).
    "qwen2_tied_head_to_save": ("qwen2", False, dict(
        r=4, lora_alpha=8, target_modules=["q_proj"],
        modules_to_save=["lm_head"])),
    "qwen2_tied_embed_to_save": ("qwen2", False, dict(
        r=4, lora_alpha=8, target_modules=["v_proj"],
        modules_to_save=["embed_tokens"])),
    # A module to save gets no adapter: all-linear adapts the attention
    # only, the MLPs are trained whole.
    "llama3_all_linear_mlp_saved": ("llama3", False, dict(
        r=4, lora_alpha=8, target_modules="all-linear",
        modules_to_save=["mlp"])),
    # Trained biases (Qwen2's q/k/v have them): every bias of the model,
    # saved as q_proj.base_layer.bias for the adapted q_proj and as
    # k_proj.bias / v_proj.bias for the others; or only the adapted
    # layers' (v_proj's stays the base model's and is not saved).
    "qwen2_bias_all": ("qwen2", False, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], bias="all")),
    "qwen2_bias_lora_only": ("qwen2", False, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
        bias="lora_only")),
    # A bias on B (lora_bias; random as nn.Linear's with init False),
    # merged into the base biases (q/v have them).
    "qwen2_lora_bias": ("qwen2", False, dict(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
        lora_bias=True)),
}


def saved_key(name: str) -> str:
  """A PEFT parameter name -> its key in adapter_model.safetensors."""
  name = name.replace(".lora_magnitude_vector.default.weight",
                      ".lora_magnitude_vector")
  # a modules_to_save copy is saved under the module's own names
  name = name.replace(".modules_to_save.default.", ".")
  return name.replace(".default.", ".")


def make_case(case, base, quantize, lora_kwargs, seed):
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  folder = os.path.join(BASES, base)
  kw = dict(dtype=torch.float32, attn_implementation="eager")
  device = "cpu"
  if quantize:
    device = "cuda"
    kw["quantization_config"] = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
    kw["device_map"] = {"": 0}
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kw)
  model.name_or_path = folder  # recorded as base_model_name_or_path
  model.eval()

  torch.manual_seed(seed)
  config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False,
                           **lora_kwargs)
  pm = peft.get_peft_model(model, config)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_magnitude_vector" in name:
        noise = 1 + 0.2 * torch.randn(p.shape, generator=gen)
        p.mul_(noise.to(p.device))
      if ".modules_to_save." in name:  # the trained copies differ too
        noise = 1 + 0.2 * torch.randn(p.shape, generator=gen)
        p.mul_(noise.to(p.device))
      if name.endswith(".bias") and p.requires_grad:  # trained biases
        noise = 0.1 * torch.randn(p.shape, generator=gen)
        p.add_(noise.to(p.device))
  pm.eval()

  out = os.path.join(OUT, case)
  if os.path.exists(out):
    shutil.rmtree(out)
  pm.save_pretrained(out)
  readme = os.path.join(out, "README.md")
  if os.path.exists(readme):
    os.remove(readme)

  with open(os.path.join(folder, "config.json")) as f:
    vocab = json.load(f)["vocab_size"]
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(BATCH, SEQ)).astype(np.int64)
  targets = rng.integers(0, vocab, size=(BATCH, SEQ)).astype(np.int64)
  t_ids = torch.from_numpy(ids).to(device)
  t_targets = torch.from_numpy(targets).to(device)

  logits = pm(input_ids=t_ids).logits.float()
  logp = torch.log_softmax(logits, dim=-1)
  loss = -logp.gather(-1, t_targets[..., None]).mean()
  loss.backward()
  grads = {}
  for name, p in pm.named_parameters():
    if p.requires_grad:
      assert p.grad is not None, name
      grads["grad/" + saved_key(name)] = p.grad.detach().cpu().numpy()

  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  saved = safetensors.numpy.load_file(
      os.path.join(out, "adapter_model.safetensors"))
  trained = [k for k in saved if not k.endswith(".base_layer.weight")]
  assert sorted(trained) == sorted(k[len("grad/"):] for k in grads), (
      sorted(saved), sorted(grads))

  with torch.no_grad():
    merged = pm.merge_and_unload()
    merged_logits = merged(input_ids=t_ids).logits.float().cpu().numpy()

  np.savez_compressed(
      os.path.join(out, "expected.npz"), ids=ids, targets=targets,
      logits=logits.detach().cpu().numpy(),
      loss=np.float32(loss.item()), merged_logits=merged_logits, **grads)
  print(case, "loss", float(loss), "adapter tensors", len(saved))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--skip-4bit", action="store_true",
                      help="skip the cases that need bitsandbytes on a GPU")
  parser.add_argument("--only", nargs="+", choices=sorted(CASES),
                      help="regenerate only these cases")
  args = parser.parse_args()
  import peft  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  os.chdir(ROOT)  # base_model_name_or_path is recorded relative to it
  os.makedirs(OUT, exist_ok=True)
  skipped = []
  if args.only:  # the other cases and their VERSIONS lines stay as they are
    seeds = {case: seed for seed, case in enumerate(CASES)}
    for case in args.only:
      base, quantize, kw = CASES[case]
      make_case(case, base, quantize, kw, seeds[case])
    path = os.path.join(OUT, "VERSIONS.txt")
    with open(path) as f:
      lines = [l for l in f.read().splitlines()
               if l.split(":")[0] not in args.only]
    for case in args.only:
      lines.append(f"{case}: torch {torch.__version__}, transformers "
                   f"{transformers.__version__}, peft {peft.__version__}, "
                   f"python {sys.version.split()[0]}")
    with open(path, "w") as f:
      f.write("\n".join(lines) + "\n")
    return
  for seed, (case, (base, quantize, kw)) in enumerate(CASES.items()):
    if quantize and args.skip_4bit:
      skipped.append(case)
      continue
    make_case(case, base, quantize, kw, seed)
  lines = [f"torch {torch.__version__}",
           f"transformers {transformers.__version__}",
           f"peft {peft.__version__}",
           f"python {sys.version.split()[0]}"]
  if not args.skip_4bit:
    import bitsandbytes  # pylint: disable=g-import-not-at-top
    lines.append(f"bitsandbytes {bitsandbytes.__version__}")
    lines.append(f"device {torch.cuda.get_device_name(0)}")
  lines += [f"skipped {case} (run without --skip-4bit on a CUDA machine)"
            for case in skipped]
  with open(os.path.join(OUT, "VERSIONS.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
