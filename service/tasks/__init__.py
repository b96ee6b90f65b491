"""The tasks on top of the engine: prompts shared with training, question answering and NLI, and streamed
completions (text deltas, stop strings, logprobs) for the OpenAI routes."""
