"""The systems the side-by-side comparison (``loadtest.side_by_side``) sends its requests to, each behind one
``ask(http, item) -> Reply``: loraswap's task routes, llama.cpp's ``/completion`` and any OpenAI-style
``/v1/completions``. Every system decodes greedily, at most NEW_TOKENS tokens, an answer stopping at a newline; an
NLI pair is one token of the ``nli`` adapter (loraswap's ``/nli`` scores the three labels in one pass; a
completion endpoint generates one token, the label it begins)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.workload import Item
from service.tasks.prompts import ANSWER_STOP, NLI_LABELS

NEW_TOKENS = 32  # most tokens of an answer
ADAPTERS = {"squad": "squad", "nli": "nli"}  # the adapter each task is served with (the shipped ones)
KINDS = ("loraswap", "loraswap-free", "llamacpp", "openai")


@dataclass
class Reply:
    """A system's reply: ``text``, the answer or the predicted label; ``timings``, the server's own account of the
    request where it gives one (llama.cpp: prompt_n, prompt_ms, predicted_n, predicted_ms, ...)."""

    text: str
    timings: dict | None = None


def label_of(token_text: str) -> str:
    """The NLI label a generated token begins (`` ent`` -> entailment), or the token itself, stripped, when it begins
    none of them or is blank (then it counts as wrong)."""
    stripped = token_text.strip()
    matches = [label for label in NLI_LABELS if stripped and label.startswith(stripped)]
    return matches[0] if len(matches) == 1 else stripped


def posted(http: httpx.Client, path: str, body: dict) -> dict:
    """The JSON reply to ``body`` POSTed at ``path``; httpx.HTTPStatusError for a reply that is not a 2xx."""
    response = http.post(path, json=body)
    response.raise_for_status()
    return response.json()


def bearer(key: str | None) -> dict[str, str]:
    """The header that sends API key ``key`` (none for None or an empty key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class Loraswap:
    """loraswap's own routes: ``/answer`` (greedy; ``extractive``: decoded under the span constraint, else freely as
    the other systems decode, kind ``loraswap-free``) and ``/nli``."""

    url: str
    extractive: bool = True

    def prepare(self, http: httpx.Client) -> None:
        """Nothing to look up."""

    def ask(self, http: httpx.Client, item: Item) -> Reply:
        """The answer or label for ``item``; httpx errors for a failed request."""
        if item.task == "nli":
            return Reply(posted(http, "/nli", {**item.fields, "adapter": ADAPTERS["nli"]})["label"])
        body = {**item.fields, "adapter": ADAPTERS["squad"], "extractive": self.extractive,
                "decoding": {"strategy": "greedy", "max_new_tokens": NEW_TOKENS}}
        return Reply(posted(http, "/answer", body)["answer"])


@dataclass
class LlamaCpp:
    """llama.cpp's ``llama-server`` ``/completion``, the adapters loaded with ``--lora`` and chosen per request by
    id (files named after the adapters: ``squad*.gguf``, ``nli*.gguf``). ``cache_prompt``: whether requests may
    reuse a slot's cached prompt (the comparison turns it off)."""

    url: str
    cache_prompt: bool = False
    lora_ids: dict[str, int] = field(default_factory=dict)

    def prepare(self, http: httpx.Client) -> None:
        """Find each adapter's id in the server's ``/lora-adapters``; ValueError when an adapter has no file, or
        more than one, named after it."""
        loaded = http.get("/lora-adapters").raise_for_status().json()
        self.lora_ids = {name: lora_id(loaded, name) for name in ADAPTERS.values()}

    def ask(self, http: httpx.Client, item: Item) -> Reply:
        """The answer or label for ``item``, with the server's timings; httpx errors for a failed request."""
        nli = item.task == "nli"
        chosen = ADAPTERS[item.task]
        body = {"prompt": item.prompt, "n_predict": 1 if nli else NEW_TOKENS, "temperature": 0, "top_k": 1,
                "stop": [] if nli else [ANSWER_STOP], "cache_prompt": self.cache_prompt,
                "lora": [{"id": i, "scale": float(name == chosen)} for name, i in self.lora_ids.items()]}
        reply = posted(http, "/completion", body)
        text = reply["content"]
        return Reply(label_of(text) if nli else text.strip(), reply.get("timings"))


def lora_id(loaded: list[dict], name: str) -> int:
    """The id of the one adapter in llama.cpp's ``/lora-adapters`` list whose file name starts with ``name``;
    ValueError when there is none or more than one."""
    ids = [entry["id"] for entry in loaded if Path(entry["path"]).name.startswith(name)]
    if len(ids) != 1:
        raise ValueError(f"the server has {len(ids)} LoRA files named {name}*, not one: {loaded}")
    return ids[0]


@dataclass
class OpenAI:
    """An OpenAI-style ``/v1/completions`` (loraswap's, vLLM's, ...), the adapter named by ``model``."""

    url: str

    def prepare(self, http: httpx.Client) -> None:
        """Nothing to look up."""

    def ask(self, http: httpx.Client, item: Item) -> Reply:
        """The answer or label for ``item``; httpx errors for a failed request."""
        nli = item.task == "nli"
        body = {"model": ADAPTERS[item.task], "prompt": item.prompt, "max_tokens": 1 if nli else NEW_TOKENS,
                "temperature": 0}
        if not nli:
            body["stop"] = [ANSWER_STOP]
        text = posted(http, "/v1/completions", body)["choices"][0]["text"]
        return Reply(label_of(text) if nli else text.strip())


def endpoint(kind: str, url: str, cache_prompt: bool = False) -> Loraswap | LlamaCpp | OpenAI:
    """The client of a system of ``kind`` (one of KINDS) at ``url``; ValueError for another kind."""
    if kind in ("loraswap", "loraswap-free"):
        return Loraswap(url, extractive=kind == "loraswap")
    if kind == "llamacpp":
        return LlamaCpp(url, cache_prompt)
    if kind == "openai":
        return OpenAI(url)
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
