"""POST /v1/completions takes every field of OpenAI's completions request: each is honoured, or accepted at the
values that change nothing here and refused by name (422) otherwise; unknown fields are refused too."""
from __future__ import annotations

import json

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from service.engine.strategies import MAX_TEMPERATURE
from tests.http.replies import error_message
from tests.server_helpers import ready_client, settings_in

PROMPT = "The Normans gave their name to"
GREEDY = {"model": "base", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
CAP = 32  # the server's max_new_tokens here

# values of OpenAI's fields that change nothing here (null is every field's default)
NO_OPS = [("n", 1), ("n", None), ("best_of", 1), ("best_of", None), ("echo", False), ("echo", None),
          ("logprobs", None), ("frequency_penalty", 0), ("frequency_penalty", 0.0), ("frequency_penalty", -0.0),
          ("frequency_penalty", None), ("presence_penalty", 0), ("presence_penalty", None), ("logit_bias", {}),
          ("logit_bias", None), ("suffix", None), ("stop", None), ("stop", []), ("stream", False), ("stream", None),
          ("stream_options", None), ("user", "user-1234"), ("user", None), ("seed", None), ("top_p", 1),
          ("top_p", None), ("prompt", [PROMPT])]

# values this server cannot honour: refused, naming the field (stream, stop, logprobs and n: test_openai_streaming)
NOT_SUPPORTED = [("best_of", 2), ("frequency_penalty", 0.5), ("presence_penalty", -1), ("logit_bias", {"50": 5}),
                 ("logit_bias", {"50": 0}), ("suffix", "!"), ("suffix", ""), ("prompt", [PROMPT, PROMPT]),
                 ("prompt", [1, 2, 3]), ("prompt", [[1, 2, 3]]), ("prompt", [])]


@pytest.fixture(scope="module")
def client(tiny_gpt2_dir, gpt2_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai_fields")
    settings = settings_in(root, tiny_gpt2_dir, gpt2_adapters, max_new_tokens=CAP)
    with ready_client(settings) as client:
        yield client


def complete(client, status: int = 200, **fields) -> dict:
    reply = client.post("/v1/completions", json={**GREEDY, **fields})
    assert reply.status_code == status, reply.text
    return reply.json()


def refusal(client, **fields) -> str:
    """The message of the 422 that refuses a completion request with ``fields``."""
    reply = client.post("/v1/completions", json={**GREEDY, **fields})
    assert reply.status_code == 422, reply.text
    return error_message(reply)


def choice(reply: dict) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of a one-choice reply."""
    return reply["choices"][0]["text"], reply["choices"][0]["finish_reason"], reply["usage"]["completion_tokens"]


@pytest.mark.parametrize("field,value", NO_OPS)
def test_values_that_change_nothing_are_accepted(client, field, value):
    assert choice(complete(client, **{field: value})) == choice(complete(client))


@pytest.mark.parametrize("field,value", NOT_SUPPORTED)
def test_what_is_not_implemented_is_refused_by_name(client, field, value):
    error = refusal(client, **{field: value})
    assert f"body.{field}: " in error and "not supported yet" in error, error


@pytest.mark.parametrize("field,value", [("colour", "red"), ("colour", None), ("stop_sequences", [","]),
                                         ("n", True), ("n", 1.0), ("n", 0), ("stream", 0), ("echo", "true"),
                                         ("max_tokens", "5"), ("logit_bias", {"50": 0.5}), ("logprobs", 6),
                                         ("logprobs", True), ("stop", ""), ("stop", ["a", "b", "c", "d", "e"]),
                                         ("stream_options", {"include_usage": True})])
def test_unknown_fields_and_wrong_types_are_refused_by_name(client, field, value):
    assert f"body.{field}" in refusal(client, **{field: value})


@torch.no_grad()
def test_temperature_zero_is_transformers_greedy(client, tiny_gpt2_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ids = tokenizer(PROMPT, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    greedy = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    for seed in (1, 2):  # the seed plays no part in greedy decoding, nor does top_p
        assert choice(complete(client, seed=seed, top_p=0.5))[0] == greedy
    assert choice(complete(client, temperature=-0.0))[0] == greedy


def test_sampling_follows_temperature_top_p_and_seed(client):
    sampled = {"temperature": 2.0, "max_tokens": 8}
    first = complete(client, seed=7, **sampled)
    assert choice(complete(client, seed=7, **sampled)) == choice(first)
    assert len({choice(complete(client, seed=seed, **sampled))[0] for seed in range(6)}) > 1
    greedy = choice(complete(client, max_tokens=8))
    assert choice(complete(client, seed=3, temperature=2.0, top_p=1e-6, max_tokens=8)) == greedy  # top token only


def test_max_tokens_bounds_the_completion_and_null_is_the_servers_cap(client):
    for max_tokens in (1, 3, 16, CAP):
        _, reason, tokens = choice(complete(client, max_tokens=max_tokens))
        assert tokens <= max_tokens and (reason == "length") == (tokens == max_tokens)
    assert choice(complete(client, max_tokens=None)) == choice(complete(client, max_tokens=CAP))
    absent = {key: value for key, value in GREEDY.items() if key != "max_tokens"}
    reply = client.post("/v1/completions", json=absent)
    assert reply.status_code == 200 and choice(reply.json()) == choice(complete(client, max_tokens=CAP))


@pytest.mark.parametrize("max_tokens", [CAP + 1, 4096, 10**30])
def test_max_tokens_above_the_servers_cap_is_refused_naming_the_cap(client, max_tokens):
    reply = client.post("/v1/completions", json={**GREEDY, "max_tokens": max_tokens})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["param"] == "max_tokens"
    assert f"body.max_tokens: Input should be less than or equal to {CAP}" in error_message(reply)


@pytest.mark.parametrize("fields", [{}, {"echo": True}, {"echo": True, "logprobs": 1}, {"stream": True}],
                         ids=["alone", "echo", "echo-logprobs", "stream"])
def test_max_tokens_0_is_refused_saying_why(client, fields):
    """A review: max_tokens 0 was pydantic's 'greater than or equal to 1', where OpenAI's legacy completions (and
    vLLM's) take it with echo, to score the prompt; this server computes no prompt's logprobs, and says so."""
    reply = client.post("/v1/completions", json={**GREEDY, "max_tokens": 0, **fields})
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "max_tokens", reply.text
    assert reply.json()["error"]["code"] == "not_supported"
    assert "max_tokens 0 is not supported: OpenAI takes it with echo true to score the prompt" in error_message(reply)
    assert "this server does not compute a prompt's logprobs" in error_message(reply)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_chats_budget_of_0_is_refused_saying_why(client, field, stream):
    """A review: /v1/chat/completions kept pydantic's bare 'greater than or equal to 1' for max_tokens or
    max_completion_tokens 0, where /v1/completions says why (ea08fe4); a chat has no echo: it says what the server
    does not do, in the same shape."""
    chat = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "Hi"}],
                                                     field: 0, "stream": stream})
    assert chat.status_code == 422 and chat.json()["error"]["param"] == field, chat.text
    assert chat.json()["error"]["code"] == "not_supported"
    assert f"{field} 0 is not supported: a reply of no tokens would answer nothing, and this server does not " \
        "compute the prompt's logprobs" in error_message(chat)
    assert "(a chat has no echo)" in error_message(chat) and f"send {field} 1 or more" in error_message(chat)


def test_echo_puts_the_prompt_before_the_completion(client):
    plain, echoed = complete(client), complete(client, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    assert echoed["usage"] == plain["usage"]


def test_the_openai_client_in_process(client):
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)
    plain = api.completions.create(model="one", prompt=PROMPT, max_tokens=5, temperature=0)
    every_no_op = api.completions.create(
        model="one", prompt=[PROMPT], max_tokens=5, temperature=0, n=1, best_of=1, echo=False, logprobs=None,
        frequency_penalty=0, presence_penalty=0, logit_bias={}, stop=None, stream=False, suffix=None, user="u", seed=1,
        stream_options=None)
    assert every_no_op.choices[0].text == plain.choices[0].text and len(every_no_op.choices) == 1
    echoed = api.completions.create(model="one", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text
    for refused in ({"best_of": 2}, {"presence_penalty": 0.5}, {"suffix": "x"}, {"max_tokens": CAP + 1},
                    {"n": 9}):
        with pytest.raises(openai.UnprocessableEntityError) as raised:
            api.completions.create(model="one", prompt=PROMPT, **{"max_tokens": 5, **refused})
        field = next(iter(refused))
        assert f"body.{field}: " in str(raised.value) and raised.value.param == field, str(raised.value)


@pytest.mark.parametrize("route,body", [("/v1/completions", {"prompt": PROMPT}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]})])
@pytest.mark.parametrize("model,served", [("base", "base"), ("none", "base"), ("NONE", "base"), ("Base", "base"),
                                          ("one", "one")])
def test_a_reply_names_the_model_that_served_it_by_its_id(client, route, body, model, served):
    """"NONE" (the bare base, in any case) was echoed as "NONE", not the id /v1/models lists, "base"."""
    reply = client.post(route, json={"model": model, "max_tokens": 2, **body})
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == served


# the edges of temperature (0 to 2 on every route, as OpenAI's API and vLLM take it), as JSON carries them: a number,
# or the NaN and infinities of Python's json (1e400 reads as infinity), which no JSON encoder writes
TEMPERATURES = [("0", True), ("2", True), ("2.0", True), ("1e-300", True), ("2.0001", False), ("10", False),
                ("-0.5", False), ("NaN", False), ("Infinity", False), ("-Infinity", False), ("1e400", False)]
ANSWER_BODY = {"context": "The Normans gave their name to Normandy.", "question": "Who gave their name?"}


def with_temperature(route: str, temperature: str) -> bytes:
    """A request body of ``route`` whose temperature is the JSON text ``temperature``, set where the route reads it."""
    if route == "/answer":
        body = {**ANSWER_BODY, "decoding": {"strategy": "temperature", "temperature": "T", "seed": 1,
                                            "max_new_tokens": 4}}
    else:
        body = {**GREEDY, "max_tokens": 4, "seed": 1, "temperature": "T"}
    return json.dumps(body).replace('"T"', temperature).encode()


@pytest.mark.parametrize("route,field", [("/v1/completions", "temperature"), ("/answer", "decoding.temperature")])
@pytest.mark.parametrize("temperature,accepted", TEMPERATURES)
def test_temperature_takes_0_to_2_on_every_route(client, route, field, temperature, accepted):
    reply = client.post(route, content=with_temperature(route, temperature),
                        headers={"Content-Type": "application/json"})
    if accepted:
        assert reply.status_code == 200, reply.text
    else:
        assert reply.status_code == 422, reply.text
        assert f"body.{field}" in error_message(reply)


def test_the_api_schema_says_temperature_takes_0_to_2(client):
    schemas = client.app.openapi()["components"]["schemas"]
    for model in ("CompletionIn", "ChatCompletionIn", "DecodingIn"):
        bounds = [option for option in schemas[model]["properties"]["temperature"]["anyOf"] if "maximum" in option]
        assert bounds == [{"type": "number", "minimum": 0.0, "maximum": MAX_TEMPERATURE}] and MAX_TEMPERATURE == 2
