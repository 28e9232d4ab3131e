"""Fine-tuning LoRA/QLoRA adapters: data, loss, train step, loop."""
