"""Adapter training: data preparation, LoRA/QLoRA training, sweeps, merging and evaluation."""
