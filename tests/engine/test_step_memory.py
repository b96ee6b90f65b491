"""A prefill step's activations as the memory check counts them (service.model.step_memory), held against the engine's
own steps: the resident set of a fresh process, with glibc's tcache off as the server runs (``service.model.malloc``),
at its peak during a full prefill pass of ``max_prefill_tokens`` tokens over its size before the pass, on each tiny
base. (SmolLM2, measured the same way, in step_memory's docstring.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from service.model.device_room import kv_bytes_per_token
from service.model.malloc import tunables_with_tcache_off
from service.model.step_memory import prefill_bytes
from service.settings import Settings

ROWS, PROMPT = 8, 256  # a full pass of the CPU's default budget, 2048 tokens, each row of the longest prompt
MEASURE = f"""
import json, sys, tempfile
from loadtest.host_memory import PeakRss
from service.engine.prefill import Prefill
from service.engine.requests import Generation
from service.engine.sampling import Decoding
from service.runtime import Runtime
from service.settings import Settings

rises, advance = [], Prefill.advance
def measured(self, *args):
    with PeakRss() as peak:
        advance(self, *args)
    rises.append((len(self.ids) * self.width, peak.rise))
Prefill.advance = measured
runtime = Runtime(Settings(base_model=sys.argv[1], dtype=sys.argv[2], device="cpu", adapters_dir=tempfile.mkdtemp(),
                           max_input_tokens={PROMPT}, prefix_cache_bytes=0))
runtime.start()
def run(prompts):
    works = [Generation(prompt, None, Decoding(max_new_tokens=1), False, ignore_eos=True) for prompt in prompts]
    for future in runtime.engine.submit_together(works):
        future.result()
run([[7] * 16])  # what a first pass allocates once (kernels' caches) is not a step's
rises.clear()
run([[10 + row] * {PROMPT} for row in range({ROWS})])
runtime.stop()
print(json.dumps(rises))
"""


@pytest.mark.parametrize(("base", "dtype"), [("tiny_llama_dir", torch.float32), ("tiny_gpt2_dir", torch.float32),
                                             ("tiny_neox_dir", torch.float32), ("tiny_llama_dir", torch.bfloat16)])
def test_a_full_prefill_pass_rises_no_more_than_the_check_counts(base, dtype, request):
    base_dir = request.getfixturevalue(base)
    environ = {**os.environ, "GLIBC_TUNABLES": tunables_with_tcache_off(dict(os.environ)) or "",
               "CUDA_VISIBLE_DEVICES": ""}
    ran = subprocess.run([sys.executable, "-c", MEASURE, str(base_dir), str(dtype).removeprefix("torch.")],
                         capture_output=True, text=True, env=environ, timeout=300)
    assert ran.returncode == 0, ran.stderr
    passes = json.loads(ran.stdout.splitlines()[-1])
    assert [tokens for tokens, _ in passes] == [ROWS * PROMPT], passes  # one pass, whole
    config = AutoConfig.from_pretrained(base_dir)
    per_token = kv_bytes_per_token(config, dtype)
    counted, _ = prefill_bytes(Settings(), config, dtype, torch.device("cpu"), PROMPT, per_token)
    assert 0 < passes[0][1] <= counted, (passes, counted)
