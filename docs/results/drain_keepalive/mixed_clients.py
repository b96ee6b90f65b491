"""A review's client (docs/results/drain_keepalive/streams.md): 40 clients on one kept-alive pool, SIGTERM at 6 s.

    python mixed_clients.py PORT SERVER_PID [CLIENTS]
"""
import asyncio
import collections
import os
import signal
import sys
import time

import httpx

PORT = int(sys.argv[1])
PID = int(sys.argv[2])
NCL = int(sys.argv[3]) if len(sys.argv) > 3 else 40
U = f"http://127.0.0.1:{PORT}"
res = collections.Counter()
samples = {}
stop = False


def body(i):
    k = i % 4
    if k == 0:
        return (
            "/answer",
            {"context": "The Normans gave their name to Normandy, a region in France.", "question": "What region?"},
            False,
        )
    if k == 1:
        return "/nli", {"premise": "A man plays guitar.", "hypothesis": "A man plays music."}, False
    if k == 2:
        return (
            "/v1/completions",
            {"model": "squad", "prompt": "Tell me a story about", "max_tokens": 48, "stream": True},
            True,
        )
    return (
        "/v1/chat/completions",
        {"model": "base", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 48},
        False,
    )


async def client(i, c):
    n = 0
    while not stop:
        p, b, st = body(i + n)
        n += 1
        try:
            if st:
                async with c.stream("POST", p, json=b) as r:
                    txt = (await r.aread()).decode()
                    done = "-done" if "[DONE]" in txt else "-NODONE"
                    tag = f"{p} {r.status_code} stream{done}{'-errevent' if 'error' in txt else ''}"
            else:
                r = await c.post(p, json=b)
                txt = r.text
                tag = f"{p} {r.status_code}"
                if r.status_code != 200:
                    tag += f" ra={r.headers.get('retry-after')} conn={r.headers.get('connection')}"
        except httpx.ConnectError:
            tag = "connect-refused"
            await asyncio.sleep(0.2)
        except Exception as e:
            tag = f"{p} EXC {type(e).__name__}"
            txt = repr(e)
            print("EXC at", round(time.time() - t_term, 2), "s after SIGTERM", p, type(e).__name__, flush=True)
        res[tag] += 1
        samples.setdefault(tag, txt[:250])
        if tag == "connect-refused" and time.time() - t_term > 5:
            return


async def main():
    global stop, t_term
    t_term = 1e18
    async with httpx.AsyncClient(base_url=U, timeout=120, limits=httpx.Limits(max_connections=100)) as c:
        tasks = [asyncio.create_task(client(i, c)) for i in range(NCL)]
        await asyncio.sleep(6)
        t_term = time.time()
        os.kill(PID, signal.SIGTERM)
        print("SIGTERM sent")
        while True:
            await asyncio.sleep(0.5)
            try:
                os.kill(PID, 0)
            except ProcessLookupError:
                break
            if time.time() - t_term > 120:
                print("server still alive after 120 s")
                break
        print("server gone after", round(time.time() - t_term, 1), "s")
        await asyncio.sleep(3)
        stop = True
        await asyncio.gather(*tasks)
    for k, v in sorted(res.items()):
        print(v, k)
    for k, v in samples.items():
        if "200" not in k:
            print("SAMPLE", k, "=>", v)


asyncio.run(main())
