"""Seeded sampling alone and under load: four seeded n=8 completions (temperature 1, 30 tokens, over squad, base and
nli) sent one at a time, again one at a time, then all four at once; counts the choices whose text differs from the
first pass. Run against a server on PORT (defaults): python seeds_under_load.py PORT (output: seeds_under_load.txt)."""
import json
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = ["The history of the Normans", "Super Bowl 50 was", "In a small village there lived",
           "The theory of relativity"]
MODELS = ["squad", "base", "nli", "base"]


def ask(port: int, index: int) -> list[str]:
    body = {"model": MODELS[index], "prompt": PROMPTS[index], "n": 8, "seed": index, "temperature": 1.0,
            "max_tokens": 30}
    request = urllib.request.Request(f"http://localhost:{port}/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    choices = json.loads(urllib.request.urlopen(request).read())["choices"]
    return [choice["text"] for choice in sorted(choices, key=lambda choice: choice["index"])]


def differing(first: list[list[str]], second: list[list[str]]) -> int:
    return sum(a != b for texts_a, texts_b in zip(first, second) for a, b in zip(texts_a, texts_b))


def main() -> None:
    port = int(sys.argv[1])
    alone = [ask(port, index) for index in range(4)]
    again = [ask(port, index) for index in range(4)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda index: ask(port, index), range(4)))
    print(f"alone vs again: {differing(alone, again)} of 32 differ; "
          f"alone vs together: {differing(alone, together)} of 32 differ")


if __name__ == "__main__":
    main()
