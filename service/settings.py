"""All service settings in one place (env prefix ``LORASWAP_``; CLI flags override)."""
from __future__ import annotations

import difflib
import errno
import ipaddress
import json
import os
import re
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from service.engine.merge_policy import MAX_COOLDOWN_GROWTH

REPO_ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
CPU_PREFILL_TOKENS = 2048  # max_prefill_tokens unset, on the CPU: 10 prompts of 192 tokens (docs/benchmarks.md)
CPU_BATCH_WINDOW_MS, GPU_BATCH_WINDOW_MS = 0.0, 5.0  # batch_window_ms unset
CPU_DRAFT_TOKENS = 4  # draft_tokens unset, on the CPU (docs/benchmarks.md, "Draft tokens from the prompt")
CPU_PREFILL_CHUNK = 512  # prefill_chunk unset, on the CPU (docs/benchmarks.md, "Prefill without chunking")
MIN_PROMPT_TOKENS = 16  # the shortest longest-prompt a server may be set to (max_input_tokens)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # the devices the engine runs on (torch.device names)
DEVICES = "auto, cpu, cuda or cuda:N"  # DEVICE_PATTERN in words
ADAPTER_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,63}"  # what an adapter may be named: a plain identifier (adapter_files)
ADAPTER_NAME_RULE = "a plain identifier ([A-Za-z_][A-Za-z0-9_]*, at most 64 characters)"  # ADAPTER_NAME in words
ADAPTER_CONFIG_FILE = "adapter_config.json"  # what makes a folder an adapter's (peft's CONFIG_NAME)
INT64 = 2**63  # torch's sizes and counts are 64-bit integers: a setting beyond is an OverflowError there
INT64_RULE = f"at most {INT64 - 1} (a 64-bit integer, as torch takes)"  # int64's bound in words
# the longest a thread waits (Condition.wait, threading.Timer; 292 years): a wait set longer is an OverflowError there
WAIT_MAX_S = threading.TIMEOUT_MAX
MOST_DEFAULT_STRIDE = 128  # answer_stride unset: min(a window's context tokens // 2, this); Hugging Face's doc_stride
# what each key's being unset means (Settings.admin_key, Settings.api_key)
UNSET_KEY = {"admin_key": "refuses the admin routes", "api_key": "leaves the routes that run the model open"}
HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a host name or IPv4 address of a URL (an IPv6 one is in brackets)
PREFIX = "LORASWAP_"  # every variable loraswap reads begins so: the settings' (``variable``) and ``OTHER_VARIABLES``
# the LORASWAP_ variables loraswap reads that set no setting, each read by its own module, which takes its name here
DATA_DIR_VARIABLE = "LORASWAP_DATA_DIR"  # training.data: the data sets' folder (--data-dir's default)
LOADTEST_ADAPTERS_VARIABLE = "LORASWAP_LOADTEST_ADAPTERS"  # loadtest/locustfile.py: the adapters its users send to
WITHOUT_BITSANDBYTES = "LORASWAP_WITHOUT_BITSANDBYTES"  # service.scale: 1 for a Ray process that never quantizes
OTHER_VARIABLES = (DATA_DIR_VARIABLE, LOADTEST_ADAPTERS_VARIABLE, WITHOUT_BITSANDBYTES)
# a setting's name in a message's words (max_new_tokens): an identifier with an underscore, not part of a path
SETTING_WORD = re.compile(r"(?<![\w/.-])[a-z]+(?:_[a-z0-9]+)+(?![\w/-]|\.\w)")


def known_host(host: str | None) -> bool:
    """Whether ``host``, a URL's (``urlsplit``'s ``hostname``, brackets gone), is a host name, an IPv4 address or an
    IPv6 one: a name's labels (between dots; one dot may end it) are 1-63 characters that neither start nor end with
    '-' (a review: ``x..y`` failed in the idna codec, naming no option; ``-x`` was accepted)."""
    if not host:
        return False
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        labels = host.removesuffix(".").split(".")
        return HOST_NAME.fullmatch(host) is not None and all(
            0 < len(label) <= 63 and not label.startswith("-") and not label.endswith("-") for label in labels)
    return True


def listening_host(host: str) -> str:
    """A validator of the host the server listens on: PydanticCustomError unless it is a host name or an IP address
    (``known_host``)."""
    if not known_host(host):
        raise PydanticCustomError("host", "Input should be a host name or an IP address")
    return host


def int64(value: Any) -> Any:
    """``value``; ValueError ('must be ' INT64_RULE) for an integer past 64 bits, as torch's sizes and counts are (a
    review: ``--max-batch 2**63`` failed the start with an OverflowError and torch's C++ frames). The one check of
    the bound: Settings' fields and the commands' integer options (``command.bounded``) both apply it."""
    if isinstance(value, int) and not -INT64 <= value < INT64:
        raise ValueError(f"must be {INT64_RULE}")
    return value


def usable_path(path: str | Path) -> str | Path:
    """``path`` as given; OSError where the file system refuses the name itself rather than finding nothing under it:
    a component over 255 bytes (ENAMETOOLONG), a folder on the way it may not enter (EACCES), a file on the way
    (ENOTDIR: a review, ``--cache-dir /etc/passwd/x`` failed once the command ran, naming no option), a symlink loop
    (ELOOP): no folder can ever be made under such a name. Nothing there yet (ENOENT) passes: what that means is for
    its reader to say (a missing adapters folder is warned of, as one made later serves; a missing data file is an
    error)."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
    return path


def refusing_unusable(path: Any) -> Any:
    """A validator of a path setting: ``usable_path``'s OSError as a ValueError that says why (a name the file system
    refuses can never name a folder, so it is refused at once, where a folder absent is only warned of)."""
    try:
        return usable_path(path)
    except OSError as exc:
        raise ValueError(f"the file system refuses this path: {exc.strerror or exc}") from None


UsablePath = Annotated[Path, AfterValidator(refusing_unusable)]
UsableName = Annotated[str, AfterValidator(refusing_unusable)]  # a name (smollm2) or a path


def path_list(value: Any) -> Any:
    """A list of paths from an environment variable: a JSON list (``["/a", "/b"]``: text that starts with ``[`` or
    ``{`` is read as JSON), else one path or several joined by ``os.pathsep`` (``/a:/b``, as in PATH; empty pieces
    name none). A list (a flag's value) is left as it is. ValueError (json's) for text that is not JSON."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith(("[", "{")):
        return json.loads(value)
    return [piece for piece in value.split(os.pathsep) if piece]


# pydantic-settings reads a list from the environment as JSON only: NoDecode hands path_list the text as it is
PathList = Annotated[list[UsablePath], NoDecode, BeforeValidator(path_list)]


def matching(pattern: str, kind: str, rule: str) -> AfterValidator:
    """A validator of text that ``pattern`` must match whole: PydanticCustomError of type ``kind`` saying ``rule``
    for any other (pydantic's own ``pattern`` says only "String should match pattern" and the regular expression)."""
    def check(text: str) -> str:
        if not re.fullmatch(pattern, text):
            raise PydanticCustomError(kind, rule)
        return text

    return AfterValidator(check)


# a name some adapter could have (adapter_files.check_name registers no other), or none or base for the bare base
NAMES_AN_ADAPTER = matching(ADAPTER_NAME, "adapter_name", f"Input should name an adapter: {ADAPTER_NAME_RULE}, or "
                            "none or base for the bare base")
AdapterName = Annotated[str, NAMES_AN_ADAPTER]
Device = Annotated[str, matching(DEVICE_PATTERN, "device", f"Input should be {DEVICES} (GPU N)")]


class UpperCaseEnv(EnvSettingsSource):
    """pydantic-settings' environment source, reading only the variables spelt in upper case (``LORASWAP_MAX_BATCH``):
    its own reads every spelling (``case_sensitive`` False), so that ``loraswap_max_batch=abc`` failed a command in
    the name of a flag never given; ``case_sensitive`` True would look for ``LORASWAP_max_batch``. Another spelling is
    ignored, and warned of (``unknown_variables``)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:  # pydantic-settings' hook: the variables it reads
        upper = {name: value for name, value in os.environ.items() if name == name.upper()}
        return parse_env_vars(upper, False, self.env_ignore_empty, self.env_parse_none_str)


class Settings(BaseSettings):
    """Runtime configuration of the server and the engine."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, allow_inf_nan=False)  # no setting is unbounded by inf

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **others: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' hook: the values given (flags), then the upper-case variables (``UpperCaseEnv``)."""
        return init_settings, UpperCaseEnv(settings_cls)

    # base model
    base_model: UsableName = Field("smollm2",
                                   description="'smollm2' (embedded default) or a Hugging Face model directory")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the base's dtype. auto: bfloat16 on a GPU, float32 on the CPU (peft's outputs to float32 "
        "rounding); bfloat16 on the CPU computes the linear layers through oneDNN where torch's oneDNN has bfloat16 "
        "(torch.ops.mkldnn._is_mkldnn_bf16_supported; else a warning at start): 1.2-1.4x float32's requests/s on a "
        "2-vCPU AMD EPYC with AVX512-BF16, answers within bfloat16 rounding, its logits (and logprobs) rounded to "
        "bfloat16, so near-ties fall to the lower token id (docs/benchmarks.md, \"bfloat16 on the CPU\")")
    quantize: Literal["none", "nf4"] = "none"
    device: Device = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N' (GPU N)")
    cache_dir: UsablePath = Field(Path.home() / ".cache" / "loraswap",
                                  description="where the converted base model is cached")

    # adapters
    adapters_dir: UsablePath = Field(REPO_ADAPTERS, description="adapters loaded at start (one PEFT folder each); "
                                    "warned of at start when not a folder; a name the file system refuses (too long) "
                                    "is a usage error")
    adapter_roots: PathList = Field(default_factory=list, description="extra folders POST /adapters may load from, "
                                    "each warned of at start when not a folder, a usage error when a name the file "
                                    "system refuses (the flag: several separated "
                                    f"by spaces; the environment: a path, several joined by {os.pathsep!r}, or a "
                                    "JSON list)")
    max_resident: int = Field(8, ge=1, description="adapters kept in device slots at once (LRU); refused before the "
                              "model loads where their LoRA banks cannot exist (model.device_room); an adapter "
                              "registered past the memory the start left the adapters (their host copies and the "
                              "banks at their widest: a power of two of slots, at most this, x the largest rank) is "
                              "refused with a 507 (lora.adapter_memory)")
    max_rank: int = Field(64, ge=1, description="largest LoRA rank a slot holds")
    qa_adapter: AdapterName | None = Field("squad", description="adapter /answer uses when the request names none "
                                           "(the bare base while none of that name is registered; none: the bare "
                                           "base)")
    nli_adapter: AdapterName | None = Field("nli", description="adapter /nli uses when the request names none (the "
                                            "bare base while none of that name is registered; none: the bare base)")

    # engine
    max_batch: int = Field(32, ge=1, description="most requests in one batch; refused before the model loads where a "
                           "full batch's KV cache of the longest requests cannot exist: past 2**63 bytes, or past "
                           "the device's memory with the weights and the other caches (model.device_room)")
    batch_window_ms: float | None = Field(
        None, ge=0, description="how long an idle scheduler waits to fill a batch; requests that come later join the "
        f"running batch between its decoding steps. None: {CPU_BATCH_WINDOW_MS} ms on the CPU (a wait there costs the "
        f"one request more than batching saves: docs/benchmarks.md), {GPU_BATCH_WINDOW_MS} ms on a GPU")
    max_queue: int = Field(256, ge=1, description="queued requests before 429")
    max_queue_wait: float = Field(30.0, ge=0, description="seconds a request may wait in the queue for a batch before "
                                  "it is refused with 429 and Retry-After (the server is past capacity; once it shuts "
                                  "down, 503 without Retry-After), so that no "
                                  "request waits without bound; once one part of a request (a long context's window, "
                                  "a choice, a label's scoring) joined a batch, its other parts are not refused for "
                                  "their wait; refused as the wait runs out, whatever the engine runs meanwhile (a "
                                  "long prompt's prefill pass, an adapter load); 0: no bound")
    max_new_tokens: int = Field(64, ge=1, description="most tokens a request generates (per choice); OpenAI's routes "
                                "refuse a max_tokens above it and take it for an absent one")
    max_choices: int = Field(8, ge=1, description="most choices (n) one request to OpenAI's routes may ask for")
    max_input_tokens: int = Field(1024, ge=MIN_PROMPT_TOKENS, description="longest prompt accepted (413 beyond); an "
                                  "extractive /answer context too long for one prompt is split into windows that fit")
    answer_stride: int | None = Field(
        None, ge=0, description="tokens two neighbouring windows of a long /answer context share (Hugging Face's "
        "doc_stride): a span this long lies whole inside a window; below max_input_tokens. None: half "
        f"the context tokens a window holds beside the question, at most {MOST_DEFAULT_STRIDE} (Hugging Face's "
        "question-answering pipeline: min(max_seq_len // 2, 128))")
    max_answer_windows: int = Field(16, ge=1, description="most windows a long /answer context is split into (413 "
                                    "beyond; no more than max_queue, as they queue together): the hard cap on a "
                                    "context's length")
    merge_after: int = Field(4, ge=1, description="merge an adapter after this many admissions in a row (a new batch, "
                             "or requests joining a running one) have only it in play")
    merge_cooldown: int = Field(8, ge=0, description="admissions to wait after an unmerge before merging again; "
                                f"doubles (up to {MAX_COOLDOWN_GROWTH}x) after each merge that did not last that long, "
                                "back to this after one that did")
    auto_merge: bool = True
    prefill_chunk: int | None = Field(
        None, ge=0, description="prompt tokens that requests joining a running batch run between two of its decoding "
        "steps (the larger of this and the running rows), bounding how long running rows wait; 0 runs whole prompts. "
        f"None: {CPU_PREFILL_CHUNK} on the CPU (a stream beside a 20,000-character /answer waited 1.1 s at most "
        "between tokens, against 3.3 s whole, at no cost measured on the usual loads), 0 on a GPU (docs/benchmarks.md)")
    max_prefill_tokens: int | None = Field(
        None, ge=1, description="prompt tokens one prefill pass takes from the queue, counted as the pass runs them: "
        "its rows x its longest prompt, as it left-pads them (a longer prompt goes alone); "
        "the rest join at the next pause, so a burst's prefill memory is bounded (vLLM's max_num_batched_tokens); "
        "the memory check before the model loads counts a pass of so many tokens' activations, of max_batch rows "
        f"x the longest prompt at most. None: {CPU_PREFILL_TOKENS} on the CPU, no bound on a GPU (memory is not short "
        "there, and fewer, larger passes are faster)")
    draft_tokens: int | None = Field(
        None, ge=0, description="speculative decoding: the draft tokens a decoding step feeds a generation after its "
        "last token, looked up where its last tokens occurred before in its prompt or output (prompt lookup decoding, "
        "vLLM's ngram); it then takes every token its own strategy picks in agreement with them, so the output is the "
        "same (up to float rounding), in fewer steps. At most this many, except that on the CPU a step may fill the "
        "rows its linear layers pad to anyway (one generation alone: up to 7 with 4); a step feeds 64 tokens in all "
        "at most, so large batches get fewer or none. 0: off. None: "
        f"{CPU_DRAFT_TOKENS} on the CPU, 0 on a GPU (steps with drafts run without CUDA graphs)")
    cuda_graphs: bool = Field(True, description="replay decoding steps as CUDA graphs (GPU only)")
    onednn: bool = Field(True, description="compute the base's float32 linear layers with oneDNN, not MKL (CPU only; "
                         "1.2-1.4x on an AMD EPYC host, not measured on Intel's: docs/benchmarks.md), those that "
                         "read one input (q/k/v, gate/up) as one product")
    prefix_cache_bytes: int = Field(
        256 * 2**20, ge=0, description="bytes of prompt keys and values kept for reuse by later prompts that begin "
        "with the same tokens for the same adapter (least recently used dropped first); 0 turns prefix caching off; "
        "past the device's memory with the weights and the other caches it is refused before the model loads")
    prefix_block_tokens: int = Field(16, ge=1, description="prefix caching granularity in tokens: prompts' keys and "
                                     "values are kept in blocks of this many; a prompt reuses the longest cached run "
                                     "of blocks that begins it, then the tokens it shares with the start of a cached "
                                     "block after that run")

    # http
    # a review: 'a b' was taken, the model loaded, then uvicorn failed with exit 3
    host: Annotated[str, AfterValidator(listening_host)] = Field("127.0.0.1", description="the host name or IP address "
                                                                 "to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    admin_key: str | None = Field(None, description="bearer key for admin routes; none refuses them; an empty one "
                                  "is refused at start")
    api_key: str | None = Field(None, description="bearer key for the routes that run the model (/answer, /nli, "
                                "/v1/completions, /v1/chat/completions) and those that list the models (/v1/models, "
                                "and GET /adapters without the admin key); none leaves them open; an empty one is "
                                "refused at start")
    max_body_bytes: int = Field(4 * 2**20, ge=1, description="largest request body in bytes: a larger one is refused "
                                "(413) before it is read whole")
    drain_seconds: float = Field(1.0, ge=0, description="on SIGTERM, how long /ready reports false before shutdown")

    @field_validator("*")
    @classmethod
    def _int64(cls, value: Any) -> Any:
        """ValueError for an integer setting past 64 bits (``int64``)."""
        return int64(value)

    @field_validator("answer_stride")
    @classmethod
    def _stride_below_prompt(cls, stride: int | None, info: ValidationInfo) -> int | None:
        """ValueError for a stride of at least max_input_tokens: two windows would share a whole prompt, and every
        long context would be refused (413) for it."""
        longest = info.data.get("max_input_tokens")  # absent when it was invalid itself (its own error)
        if stride is not None and longest is not None and stride >= longest:
            raise ValueError(f"must be below max_input_tokens ({longest}), not {stride}: neighbouring windows of a "
                             "long /answer context cannot share a whole prompt; lower it, or leave it unset")
        return stride

    def window_stride(self, room: int) -> int:
        """The tokens neighbouring windows of a long /answer context share, when a window holds ``room`` tokens of
        context (what the prompt's longest length leaves beside the question): ``answer_stride``, or when unset
        min(room // 2, MOST_DEFAULT_STRIDE), Hugging Face's default doc_stride taken of the context's room rather
        than of the whole prompt, so that windows always move on by half of it at least."""
        if self.answer_stride is not None:
            return self.answer_stride
        return min(room // 2, MOST_DEFAULT_STRIDE)

    @field_validator("max_queue_wait", "drain_seconds", "batch_window_ms")
    @classmethod
    def _waitable(cls, wait: float | None, info: ValidationInfo) -> float | None:
        """ValueError for a wait longer than a thread can wait (``WAIT_MAX_S``, in the field's unit): such a setting
        was taken, and ``--batch-window-ms 1e20`` killed the engine thread (OverflowError) at its first request,
        ``--max-queue-wait 1e20`` the queue's timer, ``--drain-seconds 1e20`` the shutdown's."""
        most = WAIT_MAX_S * (1000 if info.field_name == "batch_window_ms" else 1)
        if wait is not None and wait > most:
            raise ValueError(f"must be at most {most:.0f}, the longest a thread can wait (292 years)")
        return wait

    @field_validator("admin_key", "api_key")
    @classmethod
    def _key_a_header_can_carry(cls, key: str | None, info: ValidationInfo) -> str | None:
        """ValueError for an empty key (one rule for both: unset means no key, so an empty one is a mistake, as
        ``-e LORASWAP_ADMIN_KEY=`` is; a review: an empty admin key was taken and refused the admin routes without a
        word), and for a key no ``Authorization`` header could match: one that begins or ends with a space or a tab (a
        field value is read without them: RFC 9110 5.5), or holds another control character."""
        if key == "":
            raise ValueError(f"must not be empty: give a key, or leave it unset, which {UNSET_KEY[info.field_name]}")
        if key and (key != key.strip(" \t") or any(ord(c) < 32 or ord(c) == 127 for c in key)):
            raise ValueError("must not begin or end with a space or a tab, nor hold a control character: an "
                             "Authorization header's value is read without them (RFC 9110 5.5), so no client could "
                             "send it")
        return key

    @model_validator(mode="after")
    def _keys_differ(self) -> Settings:
        if self.api_key is not None and self.api_key == self.admin_key:
            # named by their fields, which the CLI names as given (a review: it named neither --api-key nor --admin-key)
            raise ValueError("api_key must differ from admin_key: whoever runs the model could administer it")
        return self


def setting(name: str) -> Any:
    """The value of the one setting ``name``: its ``LORASWAP_`` variable, else its default. The other variables are
    overridden by their defaults, so that one invalid variable fails only what reads it (a review: an invalid
    LORASWAP_MAX_BATCH failed ``eval --max-batch 4``, ``loadtest`` and ``side-by-side``). Raises pydantic's
    ValidationError where this one is invalid."""
    others = {other: field.get_default(call_default_factory=True) for other, field in Settings.model_fields.items()
              if other != name}
    return getattr(Settings(**others), name)


def variable(name: str) -> str:
    """The environment variable that sets setting ``name``: ``LORASWAP_MAX_RANK`` for ``max_rank``."""
    return Settings.model_config["env_prefix"] + name.upper()


def known_variables() -> list[str]:
    """Every ``LORASWAP_`` variable loraswap reads: each setting's (``variable``), then ``OTHER_VARIABLES``."""
    return [*map(variable, Settings.model_fields), *OTHER_VARIABLES]


def unknown_variables(environ: Mapping[str, str] = os.environ) -> list[str]:
    """A warning for each variable of ``environ`` that begins with ``LORASWAP_`` in any case and that loraswap does
    not read (``known_variables``; another spelling than upper case is not read either: ``UpperCaseEnv``), naming the
    known one nearest to it (``difflib``), where one is near: a mistyped name (``LORASWAP_MAX_BATHC``) or one in
    lower case would otherwise be ignored without a word, leaving its setting at its default (``LORASWAP_APIKEY``
    leaves the routes that run the model open). Warnings, not errors, as vLLM warns of an unknown ``VLLM_`` variable:
    a container's environment may hold variables meant for another program."""
    known = known_variables()
    warnings = []
    for name in sorted(environ):
        if not name.upper().startswith(PREFIX) or name in known:
            continue
        hint = ""
        if name.upper() in known:
            hint = f": variables are read by their upper-case names; set {name.upper()}"
        elif nearest := nearest_variable(name.upper(), known):
            hint = f": did you mean {nearest}?"
        warnings.append(f"{name} is no variable loraswap reads, and is ignored{hint}")
    return warnings


def nearest_variable(name: str, known: list[str]) -> str | None:
    """The variable of ``known`` whose name after ``PREFIX`` is nearest to ``name``'s (``difflib``, a ratio of 0.75 at
    least), else None: over the whole names the prefix they share made every name near one (a review: LORASWAP_GPU,
    LORASWAP_FOO and LORASWAP_X were each asked "did you mean LORASWAP_PORT?")."""
    nearest = difflib.get_close_matches(name.removeprefix(PREFIX), [each.removeprefix(PREFIX) for each in known], n=1,
                                        cutoff=0.75)
    return PREFIX + nearest[0] if nearest else None


def worded(text: str, name: Callable[[str], str] = variable, settings: Collection[str] = Settings.model_fields) -> str:
    """``text`` with each of ``settings`` (by default every setting) that it names by its field (``SETTING_WORD``:
    ``max_rank``, as the service's checks word them) named by ``name``: by default as an operator sets it without a
    command, by its variable (``LORASWAP_MAX_RANK``); ``loraswap serve`` names it as it was given (``--max-rank``:
    ``cli.main.as_given``)."""
    return SETTING_WORD.sub(lambda word: name(word[0]) if word[0] in settings else word[0], text)
