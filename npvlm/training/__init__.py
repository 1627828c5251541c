"""Training: which parameters get gradients and what a pass keeps (`grads`), optimizers and
schedules (`optim`), LoRA adapters (`lora`), JSONL examples and batches (`data`), and the
fine-tuning loop with its saved state (`loop`), which `python -m npvlm.finetune` runs."""
