"""When a request queued behind a long prefill pass hears that its wait ran past --max-queue-wait.

Serves the embedded SmolLM2 from the checkout in the working directory (``loraswap serve --max-batch 1
--max-queue-wait BOUND``, on PORT), sends one long request (a completion of CHARS characters of SQuAD text, or an
/answer of them), then 0.3 s later two short completions; prints each reply's status and seconds. Run it from two
checkouts to compare them side by side (the data: $LORASWAP_DATA_DIR, or ../shared/data beside this checkout):
    python docs/results/queue_timer/refusal_times.py PORT CHARS completion|answer BOUND
"""
import gzip
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

port, chars, first_route, bound = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
url = f"http://127.0.0.1:{port}"
env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
command = [sys.executable, "-m", "service.cli.entry", "serve", "--port", str(port), "--max-batch", "1",
           "--max-queue-wait", bound]
server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def ready() -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def timed(path: str, body: dict) -> tuple[int, float]:
    sent = time.monotonic()
    reply = httpx.post(f"{url}{path}", json=body, timeout=300)
    return reply.status_code, round(time.monotonic() - sent, 1)


try:
    deadline = time.monotonic() + 600
    while not ready():
        assert server.poll() is None and time.monotonic() < deadline, "the server did not get ready"
        time.sleep(1)
    data = Path(os.environ.get("LORASWAP_DATA_DIR", Path(__file__).resolve().parents[4] / "shared" / "data"))
    with gzip.open(data / "squad" / "dev-v1.1.json.gz") as squad_file:
        squad = json.load(squad_file)
    text = " ".join(p["context"] for article in squad["data"][:3] for p in article["paragraphs"])[:chars]
    first = (("/answer", {"context": text, "question": "What is it?"}) if first_route == "answer" else
             ("/v1/completions", {"model": "base", "prompt": text, "max_tokens": 4}))
    with ThreadPoolExecutor(3) as pool:
        long_one = pool.submit(timed, *first)
        time.sleep(0.3)
        short = [pool.submit(timed, "/v1/completions", {"model": "base", "prompt": "Hi", "max_tokens": 8})
                 for _ in range(2)]
        print(json.dumps({"short": [future.result() for future in short], "long": long_one.result()}))
finally:
    server.terminate()
    server.wait(60)
