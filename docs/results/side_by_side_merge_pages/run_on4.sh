#!/bin/bash
# llama.cpp F32, loraswap at HEAD and at caf9d3d (merged copies kept in memory), each with its defaults (prompt caching on)
cd /tmp/llamacpp
FLAGS="--lora gguf/squad-f32.gguf,gguf/nli-f32.gguf --lora-init-without-apply -t 2 -np 8 -c 8192 --host 127.0.0.1"
build/bin/llama-server -m gguf/smollm2-135m-instruct-f32.gguf $FLAGS --port 8081 > /tmp/sbs/llama_on4.log 2>&1 & f32=$!
export CUDA_VISIBLE_DEVICES= HF_HUB_OFFLINE=1
PY=/work/main/.venv/bin/python
(cd /work/main && exec $PY -m service.cli.main serve --port 8000) > /tmp/sbs/new_on4.log 2>&1 & new=$!
(cd /tmp/old3 && exec $PY -m service.cli.main serve --port 8001) > /tmp/sbs/nm_on4.log 2>&1 & nm=$!
for port in 8000 8001; do until curl -s localhost:$port/ready | grep -q true; do sleep 2; done; done
until curl -s localhost:8081/health | grep -q ok; do sleep 1; done
uptime
cd /work/main && $PY -m service.cli.main side-by-side \
  --system llama_f32=llamacpp@http://127.0.0.1:8081 --pid llama_f32=$f32 \
  --system loraswap=loraswap@http://127.0.0.1:8000 --pid loraswap=$new \
  --system loraswap_caf9d3d=loraswap@http://127.0.0.1:8001 --pid loraswap_caf9d3d=$nm \
  --questions 96 --rounds 2 --warmup 0 --cache-prompt --json /tmp/sbs/on4.json --markdown /tmp/sbs/on4.md
uptime
kill $f32 $new $nm; wait
