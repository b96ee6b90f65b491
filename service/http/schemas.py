"""HTTP request and response bodies (validation only; no tensors here)."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from service.engine.sampling import Decoding


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be blank")
    return text


Text = Annotated[str, Field(min_length=1, max_length=100_000), AfterValidator(_not_blank)]
# request bodies: no unknown fields, no coercion ("7" or true for 7), no NaN or infinity (JSON has neither, Python's
# parser takes them, and 1e400 reads as infinity)
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class DecodingIn(BaseModel):
    """Per-request decoding strategy and its parameters."""

    model_config = STRICT
    strategy: Literal["greedy", "top_k", "nucleus", "temperature"] = "greedy"
    temperature: float = Field(1.0, gt=0, le=10)
    top_k: int = Field(50, ge=1, le=100_000)
    top_p: float = Field(0.9, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    def to_decoding(self, default_seed: int) -> Decoding:
        fields = self.model_dump()
        fields["seed"] = default_seed if self.seed is None else self.seed
        return Decoding(**fields)


class ErrorOut(BaseModel):
    """Every error reply: a clear message (422 replies add pydantic's ``detail`` list)."""

    error: str


class AnswerIn(BaseModel):
    model_config = STRICT
    context: Text
    question: Text
    adapter: str | None = None
    extractive: bool = True
    decoding: DecodingIn = Field(default_factory=DecodingIn)


class AnswerOut(BaseModel):
    answer: str
    start: int | None
    end: int | None
    adapter: str | None
    tokens: int
    latency_ms: float


class NliIn(BaseModel):
    model_config = STRICT
    premise: Text
    hypothesis: Text
    adapter: str | None = None


class NliOut(BaseModel):
    label: Literal["entailment", "neutral", "contradiction"]
    probabilities: dict[str, float]
    adapter: str | None


class AdapterIn(BaseModel):
    model_config = STRICT
    name: str
    path: str


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


class CompletionIn(BaseModel):
    """OpenAI's /v1/completions request: each field is honoured, or accepted only at the values that change nothing
    here and refused by name otherwise; unknown fields are refused. A null field takes its default, as in OpenAI."""

    model_config = STRICT
    model: str
    prompt: Annotated[str, BeforeValidator(_one_prompt, json_schema_input_type=str | list[str]),
                      Field(min_length=1, max_length=100_000)]
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=10)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    echo: bool = False  # true: the prompt, then the completion
    user: str | None = None  # the end user's id, for OpenAI's abuse monitoring: nothing to do here
    n: Annotated[int, only(1)] = 1
    best_of: Annotated[int, only(1)] = 1
    stream: Annotated[bool, only(False)] = False
    stream_options: Annotated[dict | None, only()] = None
    stop: Annotated[str | list[str] | None, only([])] = None
    logprobs: Annotated[int | None, only()] = None
    frequency_penalty: Annotated[float, only(0)] = 0.0
    presence_penalty: Annotated[float, only(0)] = 0.0
    logit_bias: Annotated[dict[str, int] | None, only({})] = None
    suffix: Annotated[str | None, only()] = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None or key not in cls.model_fields}
        return data

    def to_decoding(self, default_seed: int) -> Decoding:
        seed = default_seed if self.seed is None else self.seed
        if self.temperature == 0:
            return Decoding("greedy", max_new_tokens=self.max_tokens, seed=seed)
        strategy = "nucleus" if self.top_p < 1 else "temperature"
        return Decoding(strategy, self.temperature, top_p=self.top_p, max_new_tokens=self.max_tokens, seed=seed)
