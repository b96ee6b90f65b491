"""POST one /answer whose context is SQuAD dev contexts joined up to CHARS characters (the first holds the answer);
print the status, the seconds it took and the head of the body. Usage: long_answer.py PORT CHARS"""
import gzip
import json
import sys
import time
import urllib.error
import urllib.request

SQUAD_DEV = "/work/shared/data/squad/dev-v1.1.json.gz"


def main(port: int, chars: int) -> None:
    with gzip.open(SQUAD_DEV) as handle:
        paragraphs = [p for article in json.load(handle)["data"] for p in article["paragraphs"]]
    context = ""
    for paragraph in paragraphs:
        if len(context) >= chars:
            break
        context += paragraph["context"] + "\n\n"
    body = json.dumps({"context": context[:chars], "question": paragraphs[0]["qas"][0]["question"]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/answer", body, {"content-type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            status, text = reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    print(status, f"{time.perf_counter() - started:.1f} s", len(context[:chars]), "chars", text[:300])


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
