"""LoRA adapters: adapter files, the registry, the batched layers and the slot mapping."""
