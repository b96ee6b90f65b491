"""POST LONG /answer requests (default 1) whose contexts are SQuAD dev contexts joined up to CHARS characters (the
l-th from paragraph 300 l on, its first paragraph's first question asked) and, a second later, SHORT /answer requests
at once, each a later SQuAD dev paragraph with its first question (one window each); print each one's status, the
seconds it took and the head of its body. Usage: long_answer.py PORT CHARS [SHORT [LONG]]"""
import gzip
import json
import sys
import threading
import time
import urllib.error
import urllib.request

SQUAD_DEV = "/work/shared/data/squad/dev-v1.1.json.gz"


def answer(port: int, name: str, context: str, question: str) -> None:
    body = json.dumps({"context": context, "question": question}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/answer", body, {"content-type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    print(name, status, f"{time.perf_counter() - started:.1f} s", len(context), "chars", text[:300], flush=True)


def joined(paragraphs: list[dict], chars: int) -> str:
    context = ""
    for paragraph in paragraphs:
        if len(context) >= chars:
            break
        context += paragraph["context"] + "\n\n"
    return context[:chars]


def main(port: int, chars: int, short: int = 0, long: int = 1) -> None:
    with gzip.open(SQUAD_DEV) as handle:
        paragraphs = [p for article in json.load(handle)["data"] for p in article["paragraphs"]]
    asks = [(f"long{'' if long == 1 else n}", joined(paragraphs[300 * n:], chars),
             paragraphs[300 * n]["qas"][0]["question"]) for n in range(long)]
    later = paragraphs[len(paragraphs) - short:]
    asks += [(f"short{i}", p["context"], p["qas"][0]["question"]) for i, p in enumerate(later)]
    threads = [threading.Thread(target=answer, args=(port, *ask)) for ask in asks]
    for number, thread in enumerate(threads):
        thread.start()
        time.sleep(1.0 if number == long - 1 else 0)
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:5]))
