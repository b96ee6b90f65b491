"""POST one /answer whose context is SQuAD dev contexts joined up to CHARS characters (the first holds the answer)
and, a second later, SHORT /answer requests at once, each a later SQuAD dev paragraph with its first question (one
window each); print each one's status, the seconds it took and the head of its body.
Usage: long_answer.py PORT CHARS [SHORT]"""
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


def main(port: int, chars: int, short: int) -> None:
    with gzip.open(SQUAD_DEV) as handle:
        paragraphs = [p for article in json.load(handle)["data"] for p in article["paragraphs"]]
    context = ""
    for paragraph in paragraphs:
        if len(context) >= chars:
            break
        context += paragraph["context"] + "\n\n"
    asks = [("long", context[:chars], paragraphs[0]["qas"][0]["question"])]
    later = paragraphs[len(paragraphs) - short:]
    asks += [(f"short{i}", p["context"], p["qas"][0]["question"]) for i, p in enumerate(later)]
    threads = [threading.Thread(target=answer, args=(port, *ask)) for ask in asks]
    for number, thread in enumerate(threads):
        thread.start()
        time.sleep(1.0 if number == 0 else 0)
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
