"""HTTP request and response bodies (validation only; no tensors here)."""
from __future__ import annotations

import json
import sys
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.engine.logprobs import MOST_TOP_LOGPROBS
from service.engine.sampling import Decoding
from service.engine.strategies import MAX_TEMPERATURE, SAMPLING_DEFAULTS, SEED, Strategy, unread, unread_reason
from service.settings import NAMES_AN_ADAPTER
from service.tasks.labels import MOST_LABEL_CHARACTERS, MOST_LABELS
from service.tasks.prompt_styles import ADAPTER_STYLE, PromptStyle, pair_example


def lone_surrogate(text: str) -> dict | None:
    """Where ``text`` holds a lone surrogate (JSON's ``"\\ud800"``, which Python's parser takes), which UTF-8 cannot
    encode: the first's ``code`` (``U+D800``) and the character it is ``at``; None where it holds none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return {"code": f"U+{ord(text[exc.start]):04X}", "at": exc.start}
    return None


def _unicode(value: Any) -> Any:
    """A string of a request body, unless it holds a lone surrogate (``lone_surrogate``): UTF-8 cannot encode one, so
    neither the tokenizer nor a reply could. Anything else is left to the type."""
    if isinstance(value, str) and (where := lone_surrogate(value)) is not None:
        raise PydanticCustomError("string_unicode", "Input should be text that UTF-8 can encode, not a lone surrogate "
                                  "({code} at character {at})", where)
    return value


def key_surrogate(data: Any) -> ValidationError | None:
    """The refusal of the first key (in objects at any depth of ``data``, within arrays too) that holds a lone
    surrogate (``lone_surrogate``), located at it with the key spelt with its escapes (``\\ud800``); None where no
    key holds one. (pydantic refused such a key as the whole body, "unable to parse raw data as a unicode string",
    or named it with a U+FFFD for each of its bytes.)"""
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, inner in items:
            if isinstance(key, str) and (where := lone_surrogate(key)) is not None:
                spelt = key.encode("utf-8", "backslashreplace").decode("utf-8")
                return problem_at((*path, spelt), "string_unicode", "A key should be text that UTF-8 can encode, not "
                                  "a lone surrogate ({code} at character {at})", where, key)
            if isinstance(inner, (dict, list)):
                stack.append(((*path, key), inner))
    return None


# every string of a request body is Unicode text, which UTF-8 can encode: a plain one is Str; a constrained one puts
# UNICODE after its Field (a validator before the constraints would turn pydantic's string errors into generic ones)
UNICODE = BeforeValidator(_unicode)
Str = Annotated[str, UNICODE]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


def _past_floats(value: Any, validate: ValidatorFunctionWrapHandler) -> Any:
    """A float field's validation (``validate``) of ``value``, an integer past the largest float included (``2**1100``,
    or one of more digits than Python converts, ``strict_json.PAST_ANY_BOUND``): refused as the largest float of its
    sign is, by the field's own bound ("less than or equal to 10", as ``2**70`` is), or as not a finite number (as
    ``1e400`` is) where no bound refuses that float. pydantic refused such an integer as "a valid number" (a review),
    naming no bound."""
    if not isinstance(value, int) or abs(value) <= sys.float_info.max:
        return validate(value)
    try:
        validate(sys.float_info.max if value > 0 else -sys.float_info.max)
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise PydanticCustomError(problem["type"], problem["msg"], problem.get("ctx")) from None
    raise PydanticCustomError("finite_number", "Input should be a finite number")


# a float of a request body: its bounds (a Field's, or validators before this) refuse integers past every float too
PAST_FLOATS = WrapValidator(_past_floats)
Float = Annotated[float, PAST_FLOATS]
Text = Annotated[str, Field(min_length=1, max_length=100_000), UNICODE, AfterValidator(_not_blank)]
AdapterName = Annotated[str, UNICODE, NAMES_AN_ADAPTER]  # whether one of that name is registered: the route's 404
# request bodies: no unknown fields, no coercion ("7" or true for 7), no NaN or infinity (JSON has neither, Python's
# parser takes them, and 1e400 reads as infinity)
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


@dataclass(frozen=True)
class ServerCaps:
    """A server's caps on request fields, past the schema's bounds (its settings): ``tokens``, the most tokens a
    request generates, and ``choices``, the most choices (``n``) it asks for; each (the cap, the words that say
    whose it is)."""

    tokens: tuple[int, str]
    choices: tuple[int, str]


# the caps of the server whose request is being read: set before FastAPI validates its body (``routes.inference``),
# so that a field past its cap is refused beside the request's other faults, in one 422 (a review: the route checked
# the caps once the body was valid, and a client fixing one fault then met the next); None outside a request
SERVER_CAPS: ContextVar[ServerCaps | None] = ContextVar("server_caps", default=None)


def capped(cap: str) -> AfterValidator:
    """A validator of an integer field that the server caps (``cap``: a field of ``ServerCaps``): a 422 past it
    (``less_than_equal``), naming the cap and whose it is."""

    def check(value: int) -> int:
        caps = SERVER_CAPS.get()
        if caps is None:
            return value
        most, whose = getattr(caps, cap)
        if value > most:
            raise PydanticCustomError("less_than_equal", f"Input should be less than or equal to {{le}}, {whose}",
                                      {"le": most})
        return value

    return AfterValidator(check)


class RequestObject(BaseModel):
    """An object of a request body: typed strictly (``STRICT``), and refused at the first key in it that holds a lone
    surrogate (``key_surrogate``), named."""

    model_config = STRICT

    @model_validator(mode="before")
    @classmethod
    def _keys_unicode(cls, data: Any) -> Any:
        refusal = key_surrogate(data)
        if refusal is not None:
            raise refusal
        return data


class NullIsDefault(RequestObject):
    """A request body in which a null field takes its default, as OpenAI's API reads null (clients send None as
    null), but for the fields ``NULL_IS_A_VALUE`` names, where null means something of its own (``AnswerIn.adapter``:
    the bare base, where leaving it out asks the QA adapter). A required field has no default: null is refused as
    its value, naming it (a review: ``"model": null`` was dropped, then said "Field required", code ``missing``)."""

    NULL_IS_A_VALUE: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields
                    or key in cls.NULL_IS_A_VALUE or cls.model_fields[key].is_required()}
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler) -> dict:
        """The schema says what ``_null_is_default`` takes: null for every field that has a default."""
        schema = handler.resolve_ref_schema(handler(core_schema))
        for name, field in cls.model_fields.items():
            prop = schema["properties"].get(field.alias or name)
            if field.is_required() or prop is None or {"type": "null"} in prop.get("anyOf", ()):
                continue
            meta = {key: prop.pop(key) for key in ("title", "description", "default") if key in prop}
            schema["properties"][field.alias or name] = {"anyOf": [prop, {"type": "null"}], **meta}
        return schema


ANSWER_TOKENS = 32  # /answer's token budget when the request names none (at most the server's max_new_tokens)


class DecodingIn(NullIsDefault):
    """Per-request decoding strategy and its parameters."""

    model_config = STRICT
    strategy: Strategy = "greedy"
    # 0: greedy, whatever the strategy; at most MAX_TEMPERATURE, as on /v1
    temperature: Float = Field(SAMPLING_DEFAULTS["temperature"], ge=0, le=MAX_TEMPERATURE)
    top_k: int = Field(SAMPLING_DEFAULTS["top_k"], ge=1, le=100_000)
    top_p: Float = Field(SAMPLING_DEFAULTS["top_p"], gt=0, le=1)
    max_new_tokens: Annotated[int, capped("tokens")] = Field(ANSWER_TOKENS, ge=1)  # the server's cap beyond
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @field_validator("max_new_tokens", mode="before")
    @classmethod
    def _generates(cls, budget: Any) -> Any:
        """0 is refused saying why (it was pydantic's 'greater than or equal to 1')."""
        return not_zero("max_new_tokens", budget, "an answer is generated, at least one token (this server does not "
                        "score an answer given)")

    @field_validator("top_k", mode="before")
    @classmethod
    def _keeps_tokens(cls, top_k: Any) -> Any:
        """0 is refused saying why (it was pydantic's 'greater than or equal to 1'): transformers takes it for no top-k
        filtering, which here is another strategy."""
        return not_zero("top_k", top_k, "top_k is how many of the likeliest tokens strategy 'top_k' samples from "
                        "(transformers takes 0 for all of them: here, strategy 'temperature')")

    @field_validator(*SAMPLING_DEFAULTS, SEED)
    @classmethod
    def _read_by_the_strategy(cls, value: Any, info: ValidationInfo) -> Any:
        """A parameter given that the strategy does not read would be dropped without a word: refused (422) at its
        field, ``seed`` too (greedy draws nothing). greedy takes ``temperature`` 0, which means greedy. A field's
        check, beside the request's other faults (a review: a model validator's, it ran only once every field was
        valid)."""
        strategy, name = info.data.get("strategy"), info.field_name  # no strategy: its own fault
        temperature = value if name == "temperature" else info.data.get("temperature")
        if strategy is not None and unread(strategy, {name}, temperature):
            raise refused(name, unread_reason(strategy, name=name))
        return value

    def to_decoding(self, default_seed: int, max_new_tokens: int) -> Decoding:
        """The engine's decoding: greedy at temperature 0 (the limit of sampling as the temperature falls, and what
        OpenAI's routes take it for); ``default_seed`` when the request names none; at most ``max_new_tokens`` new
        tokens (the route's ``token_budget``)."""
        fields = {**self.model_dump(), "max_new_tokens": max_new_tokens}
        fields["seed"] = default_seed if self.seed is None else self.seed
        if self.temperature == 0:
            fields["strategy"] = "greedy"
        return Decoding(**fields)


class ErrorOut(BaseModel):
    """Every error reply: a clear message (422 replies add pydantic's ``detail`` list)."""

    error: str


class OpenAIError(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, rate_limit_error "
                      "or server_error, from the status")
    param: str | None = Field(description="the request field at fault, when one is")
    code: str | None = Field(description="what went wrong, in snake case (model_not_found, queue_full, "
                             "extra_forbidden), when known")


class OpenAIErrorOut(BaseModel):
    """Every error reply on ``/v1/*``: OpenAI's shape, whose ``message`` OpenAI's clients show."""

    error: OpenAIError


class AnswerIn(NullIsDefault):
    NULL_IS_A_VALUE = frozenset({"adapter"})
    model_config = STRICT
    context: Text
    question: Text
    adapter: AdapterName | None = None
    extractive: bool = True
    decoding: DecodingIn = Field(default_factory=DecodingIn)
    # how the model is asked (service.tasks.prompt_styles): the adapters' template, or an instruction in the chat
    # template without (zero_shot) or with (one_shot) a worked example
    prompt_style: PromptStyle = ADAPTER_STYLE

    def token_budget(self) -> int | None:
        """The most tokens the request asks to generate (None where it names none), as ``OpenAIIn.token_budget``."""
        given = "max_new_tokens" in self.decoding.model_fields_set
        return self.decoding.max_new_tokens if given else None


class AnswerOut(BaseModel):
    answer: str
    start: int | None
    end: int | None
    adapter: str | None
    tokens: int
    score: float | None = Field(description="extractive answers: the mean log-probability (natural log) of the "
                                "answer's tokens and its ending under the model; the best of a long context's "
                                "windows wins by it. null for a free answer")
    latency_ms: float


def _distinct(labels: list[str]) -> list[str]:
    if len(set(labels)) != len(labels):
        raise ValueError("labels must be distinct")
    return labels


Label = Annotated[str, Field(min_length=1, max_length=MOST_LABEL_CHARACTERS), UNICODE, AfterValidator(_not_blank)]
# a request's own candidate labels, scored over their whole tokenization (service.tasks.labels)
Labels = Annotated[list[Label], Field(min_length=2, max_length=MOST_LABELS), AfterValidator(_distinct)]


class NliIn(NullIsDefault):
    NULL_IS_A_VALUE = frozenset({"adapter"})
    model_config = STRICT
    premise: Text
    hypothesis: Text
    adapter: AdapterName | None = None
    labels: Labels | None = None  # None: the three NLI labels, scored by their first tokens
    prompt_style: PromptStyle = ADAPTER_STYLE  # as AnswerIn's

    @field_validator("prompt_style")
    @classmethod
    def _example_for_the_labels(cls, style: str, info: ValidationInfo) -> str:
        """one_shot needs a worked example labelled with the labels scored (``prompt_styles.pair_example``)."""
        labels = info.data.get("labels")
        if style == "one_shot" and labels is not None:
            try:
                pair_example(labels)
            except ValueError as exc:
                raise refused("prompt_style", f"'one_shot' with these labels: {exc}") from None
        return style


class NliOut(BaseModel):
    label: str  # one of the labels scored
    probabilities: dict[str, float]
    adapter: str | None


class AdapterIn(NullIsDefault):
    """POST /adapters: an adapter's name and folder; ``replace``: a name taken is given these weights (409 without)."""

    model_config = STRICT
    name: Str
    path: Str
    replace: bool = False


class NoFields(RequestObject):
    """The body of a route that takes none: no body, or an empty JSON object (a field is refused by name)."""

    model_config = STRICT


def only(*accepted: Any) -> AfterValidator:
    """A field of OpenAI's request that this server does not implement: accepted at ``accepted``, the values that
    change nothing here (null is its default, see ``CompletionIn``); any other value is refused (422) by name."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if value not in accepted:
            allowed = " or ".join(json.dumps(v) for v in (None, *accepted))
            raise PydanticCustomError("not_supported", "{field} is not supported yet; only {allowed} is accepted",
                                      {"field": info.field_name, "allowed": allowed})
        return value

    return AfterValidator(check)


def _one_prompt(prompt: Any) -> Any:
    """A list holding one string is that string; several prompts or token ids are not supported yet."""
    if not isinstance(prompt, list):
        return prompt
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise PydanticCustomError("not_supported", "prompt as a list of several prompts or of token ids is not supported "
                              "yet; send one string")


class StreamOptions(RequestObject):
    model_config = STRICT
    include_usage: bool = False  # true: a last chunk, with no choices, carries the usage


StopString = Annotated[str, Field(min_length=1, max_length=1000), UNICODE]


def _listed(value: Any) -> Any:
    """A string is the list of that one string, checked as one here: its error is the field's, ``stop``, not
    ``stop.0``, an item the request did not send (a review)."""
    if not isinstance(value, str):
        return value
    try:
        return [STOP_STRING.validate_python(value)]
    except ValidationError as exc:
        problem = exc.errors()[0]
        raise PydanticCustomError(problem["type"], problem["msg"]) from None


STOP_STRING = TypeAdapter(StopString)


def refused(field: str, reason: str) -> PydanticCustomError:
    """The error of a field refused at the value it has, given the other fields: "{field} {reason}"."""
    return PydanticCustomError("not_supported", "{field} {reason}", {"field": field, "reason": reason})


def not_zero(field: str, value: Any, why: str) -> Any:
    """``value`` (a field's, before its type is checked) as it is, unless it is the integer 0, which other servers
    take: refused, saying ``why`` it is not here (pydantic's 'greater than or equal to 1' said nothing of it)."""
    if type(value) is int and value == 0:
        raise refused(field, f"0 is not supported: {why}; send {field} 1 or more")
    return value


class OpenAIIn(NullIsDefault):
    """The fields OpenAI's /v1/completions and /v1/chat/completions requests share: each is honoured, or accepted only
    at the values that change nothing here and refused by name otherwise; unknown fields are refused. A null field
    takes its default, as in OpenAI. ``max_tokens`` and ``n`` are bounded by the server's settings (``SERVER_CAPS``:
    ``max_new_tokens``, ``max_choices``)."""

    model_config = STRICT
    model: Annotated[str, Field(min_length=1), UNICODE]  # "" names nothing: 422 (an unknown name: 404)
    max_tokens: Annotated[int, capped("tokens")] | None = Field(None, ge=1)  # None: the server's cap
    temperature: Float = Field(1.0, ge=0, le=MAX_TEMPERATURE)  # 0: greedy; OpenAI's 0 to 2
    top_p: Float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)  # choice i samples with choice_seed(seed, i)
    user: Str | None = None  # the end user's id, for OpenAI's abuse monitoring: nothing to do here
    n: Annotated[int, capped("choices")] = Field(1, ge=1)  # choices, decoded in one batch
    stream: bool = False  # true: server-sent events
    stream_options: StreamOptions | None = None  # only with stream
    stop: Annotated[list[StopString], BeforeValidator(_listed, json_schema_input_type=StopString | list[StopString]),
                    Field(max_length=4)] = []  # at most 4; the text ends before the first met
    frequency_penalty: Annotated[float, only(0), PAST_FLOATS] = 0.0
    presence_penalty: Annotated[float, only(0), PAST_FLOATS] = 0.0
    logit_bias: Annotated[dict[Str, int] | None, only({})] = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, options: StreamOptions, info: ValidationInfo) -> StreamOptions:
        if info.data.get("stream") is False:  # absent where invalid: its own fault, which this one would repeat
            raise refused("stream_options", "is only allowed with stream true")
        return options

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def token_budget(self) -> int | None:
        """The most tokens the request asks to generate (None for the server's default)."""
        return self.max_tokens

    def to_decoding(self, default_seed: int, max_new_tokens: int) -> Decoding:
        seed = default_seed if self.seed is None else self.seed
        if self.temperature == 0:
            return Decoding("greedy", max_new_tokens=max_new_tokens, seed=seed)
        strategy = "nucleus" if self.top_p < 1 else "temperature"
        return Decoding(strategy, self.temperature, top_p=self.top_p, max_new_tokens=max_new_tokens, seed=seed)


# a completion's prompt: one string, as itself or as a list of it (how the API schema documents it)
PromptText = Annotated[str, Field(min_length=1, max_length=100_000)]
OnePrompt = Annotated[list[PromptText], Field(min_length=1, max_length=1)]


class CompletionIn(OpenAIIn):
    """OpenAI's /v1/completions request (see ``OpenAIIn``)."""

    prompt: Annotated[PromptText, UNICODE, BeforeValidator(_one_prompt, json_schema_input_type=PromptText | OnePrompt)]
    echo: bool = False  # true: the prompt, then the completion
    best_of: int | None = Field(None, ge=1)  # only n: "the best n of best_of" is not implemented
    logprobs: int | None = Field(None, ge=0, le=5)  # each token's logprob, and the k most likely tokens'
    suffix: Annotated[Str | None, only()] = None

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _generates(cls, max_tokens: Any) -> Any:
        """0 is refused saying why (it was pydantic's 'greater than or equal to 1'): OpenAI's legacy completions take
        it with echo, to score the prompt (its logprobs, generating nothing), as vLLM does; this server computes no
        prompt's logprobs (``_not_of_the_prompt``)."""
        return not_zero("max_tokens", max_tokens, "OpenAI takes it with echo true to score the prompt (its logprobs, "
                        "generating nothing), and this server does not compute a prompt's logprobs")

    @field_validator("best_of")
    @classmethod
    def _best_of_n(cls, best_of: int, info: ValidationInfo) -> int:
        n = info.data.get("n")  # absent where invalid (past the server's cap too): its own fault
        if n is not None and best_of != n:
            raise refused("best_of", "other than n is not supported yet (picking the best of more choices)")
        return best_of

    @field_validator("logprobs")
    @classmethod
    def _not_of_the_prompt(cls, logprobs: int, info: ValidationInfo) -> int:
        if info.data.get("echo"):
            raise refused("logprobs", "with echo is not supported yet (the prompt's logprobs are not computed)")
        return logprobs


MessageText = Annotated[str, Field(max_length=100_000), UNICODE]


def problem_at(loc: tuple[str | int, ...], kind: str, message: str, context: dict, value: Any) -> ValidationError:
    """A problem (pydantic's ``kind``, ``message`` formatted with ``context``) of ``value``, found at ``loc`` inside
    the value a validator checks: raised there, pydantic puts that value's own location before ``loc``."""
    return ValidationError.from_exception_data("located", [InitErrorDetails(
        type=PydanticCustomError(kind, message, context), loc=loc, input=value)])


class TextPart(RequestObject):
    """A part of a message's content: only text parts are supported yet."""

    model_config = STRICT
    type: Literal["text"]
    text: MessageText

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, part: Any) -> Any:
        """A part of another type (image_url, input_audio, file) is refused at its ``type``, alone (ValidationError,
        not_supported): not also for lacking ``text`` and for its own fields."""
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise problem_at(("type",), "not_supported", "content parts of type {type} are not supported yet; only "
                             "text parts are", {"type": repr(kind)}, kind)
        return part


def _text(parts: list[TextPart]) -> str:
    """The text of a list holding one text part; several parts are not supported yet (PydanticCustomError)."""
    if len(parts) != 1:
        raise PydanticCustomError("not_supported", "content as a list of other than one text part is not supported "
                                  "yet; send a string")
    return parts[0].text


# the two forms of a message's content; validated alone, so that a problem's location in one is where it lies in the
# request ("messages.0.content.0.text"), naming no form, as a union's would ("content.list[TextPart].0.text")
CONTENT_STRING, CONTENT_PARTS = TypeAdapter(MessageText), TypeAdapter(list[TextPart])


def _content(content: Any) -> str:
    """A message's text: ``content`` as a string, or a list holding one text part. Raises ValidationError for a
    problem inside either form, located within it; PydanticCustomError (string_or_parts) for neither form."""
    if isinstance(content, str):
        return CONTENT_STRING.validate_python(content, strict=True)
    if isinstance(content, list):
        return _text(CONTENT_PARTS.validate_python(content, strict=True))
    raise PydanticCustomError("string_or_parts", "Input should be a string or a list of text parts")


MessageContent = Annotated[str, PlainValidator(_content, json_schema_input_type=MessageText | list[TextPart])]


def _developer_is_system(role: str) -> str:
    """OpenAI's ``developer`` role, its newer name for the instructions ``system`` gave ("with o1 models and newer,
    developer messages replace the previous system messages": its chat API reference), as ``system``: the role chat
    templates know (a review: newer OpenAI clients send it, and it was a 422)."""
    return "system" if role == "developer" else role


# a message's author, OpenAI's ``name`` ("an optional name for the participant", on system, developer, user and
# assistant messages): its reference said "a-z, A-Z, 0-9, and underscores, with a maximum length of 64 characters", and
# its API refuses what does not match ^[a-zA-Z0-9_-]{1,64}$ (hyphens too); so no name spells a control token
ParticipantName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$"), UNICODE]


class ChatMessage(RequestObject):
    """One message of a conversation; fields of OpenAI's messages other than these (tool_calls, refusal) are refused.
    ``name`` is passed to the chat template as vLLM passes it (a template that reads ``message.name`` renders it; one
    that does not ignores it); absent or null, the message has none."""

    model_config = STRICT
    role: Annotated[Literal["system", "developer", "user", "assistant"], AfterValidator(_developer_is_system)]
    content: MessageContent
    name: ParticipantName | None = None

    def to_template(self) -> dict[str, str]:
        """The message as the chat template reads it: ``role``, ``content``, and ``name`` where it has one."""
        return self.model_dump(exclude_none=True)


class ChatCompletionIn(OpenAIIn):
    """OpenAI's /v1/chat/completions request (see ``OpenAIIn``): ``messages`` are rendered with the chat template;
    ``max_completion_tokens`` is ``max_tokens``' newer name (both given: they must agree)."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, capped("tokens")] | None = Field(None, ge=1)
    logprobs: bool = False  # each token's logprob
    top_logprobs: int | None = Field(None, ge=0, le=MOST_TOP_LOGPROBS)  # and the k most likely tokens': needs logprobs
    response_format: Annotated[dict | None, only({"type": "text"})] = None
    # OpenAI's storing of the completion for its dashboard: none is stored here, so only false (null: false) is taken
    store: Annotated[bool, only(False)] = False
    # tags of a stored completion (OpenAI's bounds: 16 pairs, keys of 64 characters, values of 512): nothing to do here
    metadata: dict[Annotated[str, Field(max_length=64), UNICODE], Annotated[str, Field(max_length=512), UNICODE]] | \
        None = Field(None, max_length=16)
    # whether tool calls may come several at once: this server takes no tools, so any value changes nothing (vLLM's)
    parallel_tool_calls: bool | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top_logprobs: int, info: ValidationInfo) -> int:
        if info.data.get("logprobs") is False:  # absent where invalid: its own fault, which this one would repeat
            raise refused("top_logprobs", "needs logprobs true")
        return top_logprobs

    @field_validator("max_tokens", "max_completion_tokens", mode="before")
    @classmethod
    def _generates(cls, budget: Any, info: ValidationInfo) -> Any:
        """0 is refused saying why (it was pydantic's 'greater than or equal to 1', where /v1/completions says why):
        a chat has no echo, so a reply of no tokens would score nothing, and this server does not compute a prompt's
        logprobs."""
        return not_zero(info.field_name, budget, "a reply of no tokens would answer nothing, and this server does not "
                        "compute the prompt's logprobs, which OpenAI's legacy completions return for 0 with echo true "
                        "(a chat has no echo)")

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_budget(cls, budget: int | None, info: ValidationInfo) -> int | None:
        """Refused, as the field at fault (a review: the whole body's error named no param), where ``max_tokens``
        (validated before it) is given and differs."""
        if None not in (budget, info.data.get("max_tokens")) and budget != info.data["max_tokens"]:
            raise PydanticCustomError("conflict", "max_tokens and max_completion_tokens differ; send one of them")
        return budget

    def token_budget(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().token_budget()


class LoraAdapterIn(NullIsDefault):
    """vLLM's POST /v1/load_lora_adapter request; ``load_inplace``: a name taken is given these weights."""

    model_config = STRICT
    lora_name: Str
    lora_path: Str
    load_inplace: bool = False


class LoraNameIn(NullIsDefault):
    """vLLM's POST /v1/unload_lora_adapter request. ``lora_int_id`` (vLLM's number for the adapter) is taken and not
    read, as vLLM's route does not read it: the name says which adapter."""

    model_config = STRICT
    lora_name: Str
    lora_int_id: int | None = Field(None, ge=-2**63, le=2**63 - 1)  # any 64-bit integer, as vLLM's (not read)
