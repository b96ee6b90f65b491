"""The engine: the scheduler and its queue, the running batch, prefill, the decoding step, the KV cache,
attention, sampling and the merge policy."""
