"""Checkpoints and files in and out.

What lives here: checkpoint readers (`checkpoint_source`: safetensors,
torch `.bin`; `gguf_source`: GGUF), Hugging Face / bitsandbytes conversion
(`convert`), orbax checkpoints (`orbax_io`), tokenizers (`tokenizer`) and
memory estimates (`estimate`).

May import: `models`, `layers`, `quant`. transformers, tokenizers, gguf,
torch and orbax are optional (the `jaxbnb[hf]` and `jaxbnb[orbax]` extras)
and are imported inside the functions that need them.
"""
