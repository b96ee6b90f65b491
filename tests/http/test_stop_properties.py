"""Stop strings on /v1/completions and /v1/chat/completions for any prompt and stops (hypothesis), greedy on the tiny
Llama, streamed or not: the text holds no stop string, it is a prefix of the text generated without stops, and where
it is shorter a stop string follows it there, one that begins no later than any stop string's first occurrence in
that text ends; with no stop string in that text, it is that text, finish reason and all."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.http.test_openai_streaming import chunks, joined, whole
from tests.server_helpers import ready_client, settings_in

CAP = 10  # the server's max_new_tokens
ROUTES = ("/v1/completions", "/v1/chat/completions")
PROMPT = st.lists(st.sampled_from(["The", " Normans", " gave", " their", " name", " to", " שלום", " 日本", "\n", "é"]),
                  min_size=1, max_size=6).map("".join)
ALPHABET = " etaoinsrh.,\n'é日"  # what the tiny Llama writes often, and characters of two and three UTF-8 bytes


@pytest.fixture(scope="module")
def client(tiny_llama_dir, llama_adapters, tmp_path_factory):
    with ready_client(settings_in(tmp_path_factory.mktemp("stops"), tiny_llama_dir, llama_adapters,
                                  max_new_tokens=CAP)) as client:
        yield client


@pytest.fixture(scope="module")
def unstopped(client):
    """(text, finish reason) of a route's completion of a prompt without stops, once per route and prompt (greedy:
    the same every time)."""
    known: dict[tuple[str, str], tuple[str, str]] = {}

    def completion(route: str, prompt: str) -> tuple[str, str]:
        if (route, prompt) not in known:
            known[route, prompt] = completed(client, route, prompt, stream=False)
        return known[route, prompt]

    return completion


def completed(client, route: str, prompt: str, stream: bool, **fields) -> tuple[str, str]:
    """(text, finish reason) of the one choice of a greedy completion of ``prompt`` on adapter one."""
    asked = {"prompt": prompt} if route == "/v1/completions" else {"messages": [{"role": "user", "content": prompt}]}
    reply = client.post(route, json={"model": "one", "temperature": 0, "max_tokens": CAP, "stream": stream,
                                     **asked, **fields})
    assert reply.status_code == 200, reply.text
    return (joined(chunks(reply), route) if stream else whole(reply.json(), route))[0]


@settings(max_examples=15, deadline=None)
@given(route=st.sampled_from(ROUTES), prompt=PROMPT, stream=st.booleans(), data=st.data())
def test_the_text_ends_before_the_first_stop_string_met(client, unstopped, route, prompt, stream, data):
    free, free_reason = unstopped(route, prompt)
    # a stop cut from the free text (met) or none, and stops drawn (often not met); 1 to 4 of them, as OpenAI allows
    start = data.draw(st.integers(0, max(len(free) - 1, 0)))
    cut = free[start:start + data.draw(st.integers(0, 4))]
    drawn = data.draw(st.lists(st.text(ALPHABET, min_size=1, max_size=3), max_size=3))
    stops = list(dict.fromkeys(([cut] if cut else []) + drawn))[:4] or ["never met"]
    text, reason = completed(client, route, prompt, stream, stop=stops)
    assert not any(stop in text for stop in stops), (text, stops)
    assert free.startswith(text), (text, free)
    met = [free.find(stop) for stop in stops if stop in free]
    if not met:
        assert (text, reason) == (free, free_reason)
        return
    assert reason == "stop" and any(free[len(text):].startswith(stop) for stop in stops), (text, free, stops)
    assert len(text) >= min(met), (text, free, stops)
