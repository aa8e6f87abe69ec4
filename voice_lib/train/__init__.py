"""Training: the loop, base pretraining, LoRA fine-tuning."""
