"""Domain errors carry no HTTP status; one table maps them, and the OpenAPI error documentation comes from it."""
from __future__ import annotations

import inspect
import re

import pytest
from fastapi.testclient import TestClient

from service import errors
from service.http.app import create_app
from service.http.errors import HTTP_REPLIES, STATUS, FieldRefused, blaming, error_replies, param_of, status_of
from service.http.routes import APP_DEPENDENCIES
from service.settings import Settings

DOMAIN_ERRORS = [kind for _, kind in inspect.getmembers(errors, inspect.isclass) if issubclass(kind, Exception)
                 and kind.__module__ == errors.__name__
                 and kind not in (errors.RequestAbandoned, errors.UnsafeEnvironment)  # never replied to
                 and kind is not errors.NamesSettings]  # a base of some, never raised itself


def example(kind: type[Exception]) -> Exception:
    return kind("a message", 3) if kind is errors.TemplateBacklog else kind("a message")


@pytest.mark.parametrize("kind", DOMAIN_ERRORS, ids=lambda kind: kind.__name__)
def test_every_domain_error_has_a_status_and_none_carries_one(kind):
    assert 400 <= status_of(kind) < 600
    assert not hasattr(example(kind), "status")


@pytest.mark.parametrize("kind", [kind for kind in DOMAIN_ERRORS if status_of(kind) in (429, 503)],
                         ids=lambda kind: kind.__name__)
def test_each_429_and_503_says_when_to_retry_unless_it_never_passes(kind):
    """Whole seconds (RFC 9110's delay-seconds), sent as Retry-After; a failed service none (it said 1 s), nor one
    shutting down (its clients go elsewhere: it said 1 s, and a 429 past max_queue_wait 'retry later')."""
    retry_after = example(kind).retry_after
    if kind in (errors.EngineFailed, errors.EngineStopped):
        assert retry_after is None
    else:
        assert isinstance(retry_after, int) and retry_after >= 1


def test_a_subclass_takes_its_own_status_before_its_bases():
    assert status_of(errors.UnknownAdapter) == 404 and status_of(errors.AdapterError) == 422
    assert status_of(errors.AdapterMerged) == status_of(errors.AdapterConflict) == 409
    assert status_of(errors.EngineFailed) == 503


def test_the_openapi_error_replies_are_the_table_and_the_errors_docstrings():
    spec = create_app(Settings()).openapi()  # the model is not loaded: the lifespan never runs here
    replies = spec["paths"]["/answer"]["post"]["responses"]
    documented = {status: reply["description"] for status, reply in replies.items() if status[0] in "45"}
    assert documented == {
        "400": HTTP_REPLIES[400], "401": HTTP_REPLIES[401], "403": HTTP_REPLIES[403], "422": HTTP_REPLIES[422],
        "404": "No adapter of that name is registered.",
        "413": f"{HTTP_REPLIES[413]} The prompt has more tokens than the server accepts.", "415": HTTP_REPLIES[415],
        "429": "The queue holds as many requests as it may; retry later.",
        "503": "The model is loading, or the service is shutting down (draining or stopped), and takes no new "
               "requests. The server "
               "could not render the chat template, for trouble of its own, not the template's; retry later.",
    }
    v1 = spec["paths"]["/v1/completions"]["post"]["responses"]  # OpenAI's status of a prompt past the context
    assert "The prompt has more tokens" in v1["400"]["description"] and v1["413"]["description"] == HTTP_REPLIES[413]
    merged = error_replies(errors.AdapterPathRefused, 403)[403]["description"]
    assert merged == f"{errors.AdapterPathRefused.__doc__.strip()} {HTTP_REPLIES[403]}"
    assert set(STATUS) >= {errors.AdapterError, errors.EngineStopped, errors.QueueFull, errors.InputTooLong}


@pytest.mark.parametrize("kind", DOMAIN_ERRORS, ids=lambda kind: kind.__name__)
def test_only_an_error_that_is_the_requests_fault_blames_a_field(kind):
    """A review: vLLM's load route traced every AdapterError to ``lora_path``, NoFreeSlot (a 503) too, which was sent
    as a 503 blaming the field, without its Retry-After. A 5xx is the server's fault and a 429 passes: they pass as
    they are, naming no field; a 4xx is raised naming the field its kind (or a base of it) is traced to."""
    error, fields = example(kind), {kind: "here", Exception: "anywhere"}
    with pytest.raises(Exception) as raised, blaming(fields, str):
        raise error
    if status_of(kind) >= 500 or status_of(kind) == 429:
        assert raised.value is error and param_of(error, fields) is None
    else:
        assert isinstance(raised.value, FieldRefused) and raised.value.status_code == status_of(kind, openai=True)
        assert raised.value.param == param_of(error, fields) == "here"


def test_every_route_documents_the_statuses_the_app_wide_dependencies_answer():
    """A review: GET routes answered 400 for Authorization sent twice (``single_headers``, a dependency of the whole
    app), and their OpenAPI entries listed no 400. Each route of the schema, sent a header twice, is answered so, and
    documents it, with every status the app's dependencies may answer."""
    app = create_app(Settings())  # the model is not loaded: the lifespan never runs here
    assert [dependency.dependency for dependency in app.router.dependencies] == list(APP_DEPENDENCIES)
    spec, client = app.openapi(), TestClient(app)
    app_wide = {str(status) for statuses in APP_DEPENDENCIES.values() for status in statuses}
    twice = [("Authorization", "Bearer a"), ("Authorization", "Bearer b")]
    assert set(spec["paths"]) >= {"/health", "/ready", "/metrics", "/v1/models", "/adapters", "/answer"}
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            reply = client.request(method, re.sub(r"\{\w+\}", "x", path), headers=twice)
            assert reply.status_code == 400 and app_wide <= set(operation["responses"]), (method, path, reply.text)
