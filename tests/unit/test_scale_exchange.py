"""An ASGI app called in process with a request carried as data (``service.scale.exchange``): its reply message by
message as it sends them, the client's departure told to it, its failure raised. No Ray needed."""
from __future__ import annotations

import asyncio

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from service.scale.exchange import HttpRequest, collected, exchange


def request(path: str, body: bytes = b"", method: str = "POST") -> HttpRequest:
    return HttpRequest(method, path, b"x=1", ((b"content-type", b"application/json"), (b"x-a", b"b")), body,
                       ("10.0.0.1", 5))


def recording_app(seen: list) -> Starlette:
    """/echo: what it received; /stream: three pieces; /wait: a piece, then what it receives next (kept in ``seen``:
    the client's departure), then another; /fail: raises."""
    async def echo(req: Request) -> JSONResponse:
        return JSONResponse({"method": req.method, "path": req.url.path, "query": req.url.query,
                             "x-a": req.headers["x-a"], "body": (await req.body()).decode(), "client": req.client.host},
                            status_code=201)

    async def stream(req: Request) -> StreamingResponse:
        async def pieces():
            for piece in (b"a", b"b", b"c"):
                yield piece

        return StreamingResponse(pieces())

    async def wait(req: Request) -> StreamingResponse:
        async def pieces():
            yield b"a"
            seen.append(await req.receive())
            yield b"b"

        return StreamingResponse(pieces())

    async def fail(req: Request):
        raise RuntimeError("broken")

    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/stream", stream, methods=["POST"]),
                             Route("/wait", wait, methods=["POST"]),
                             Route("/fail", fail, methods=["POST"])])


def test_a_whole_reply_carries_the_request_as_sent():
    reply = asyncio.run(collected(recording_app([]), request("/echo", b'{"k": 1}')))
    assert reply.status == 201
    assert (b"content-type", b"application/json") in reply.headers
    assert reply.body == (b'{"method":"POST","path":"/echo","query":"x=1","x-a":"b","body":"{\\"k\\": 1}",'
                          b'"client":"10.0.0.1"}')


def test_a_streamed_reply_comes_message_by_message_and_a_departure_is_told():
    seen: list = []

    async def first_two() -> list[dict]:
        messages = exchange(recording_app(seen), request("/wait"))
        taken = [await anext(messages), await anext(messages)]
        await messages.aclose()  # the client goes after the first piece
        return taken

    start, body = asyncio.run(first_two())
    assert (start["type"], start["status"]) == ("http.response.start", 200)
    assert (body["body"], body["more_body"]) == (b"a", True)
    assert seen == [{"type": "http.disconnect"}]


def test_a_streamed_reply_whole_and_its_end():
    seen: list = []

    async def every() -> list[dict]:
        return [message async for message in exchange(recording_app(seen), request("/stream"))]

    messages = asyncio.run(every())
    assert [message.get("body") for message in messages[1:-1]] == [b"a", b"b", b"c"]
    assert not messages[-1].get("more_body", False)


def test_an_application_that_fails_answers_500_or_raises():
    reply = asyncio.run(collected(Starlette(routes=recording_app([]).routes), request("/fail")))
    assert reply.status == 500  # Starlette's own error reply comes first

    async def bare(scope, receive, send):
        raise RuntimeError("no reply at all")

    with pytest.raises(RuntimeError, match="no reply at all"):
        asyncio.run(collected(bare, request("/any")))
