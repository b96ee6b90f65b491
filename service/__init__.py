"""loraswap: serve many task-specific LoRA adapters on one frozen base model."""
