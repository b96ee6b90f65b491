"""The chat template an adapter folder ships: read, size-checked and compiled once, when the adapter is loaded."""
from __future__ import annotations

import os
from pathlib import Path

from transformers.tokenization_utils_base import TOKENIZER_CONFIG_FILE
from transformers.utils import CHAT_TEMPLATE_FILE
from transformers.utils.chat_template_utils import _compile_jinja_template

from service import strict_json
from service.errors import AdapterError
from service.lora.bounded_read import adapter_file, read_bounded

# an adapter's chat template: real ones are a few KB (gpt-oss's and Gemma 4's, among the longest, about 16 KB);
# compiling one of this size took 1.1 s and 121 MB peak RSS on the CPU host, one of 1 MiB 4.9-11.9 s and 0.3-1.3 GB
# (docs/results/chat_template_cost/); transformers keeps up to 128 compiled (its lru_cache); rendering costs ~100x
# the size
MAX_CHAT_TEMPLATE_BYTES = 256 * 2**10
MAX_TOKENIZER_CONFIG_BYTES = 16 * 2**20  # its tokenizer_config.json (a base's added tokens can take a few MB)


def read_chat_template(folder: Path) -> str | None:
    """The chat template an adapter folder ships, as transformers reads a tokenizer's: ``chat_template.jinja``, else
    the ``chat_template`` of ``tokenizer_config.json`` (see ``default_template``); None when it ships none. Raises
    AdapterError for a file that cannot be read, a template over MAX_CHAT_TEMPLATE_BYTES or a tokenizer_config.json
    over MAX_TOKENIZER_CONFIG_BYTES (their sizes checked before they are read), and for a template Jinja cannot
    compile (a syntax error: every chat request would fail on it, ``compiled``). Either file, where it is there at all,
    must be a regular file (a FIFO, a folder or a device is refused, not passed over: the adapter would serve chat with
    the base's template) inside the folder (AdapterPathRefused for a symlink out of it, as for its config)."""
    template_file, config = adapter_file(folder, CHAT_TEMPLATE_FILE), adapter_file(folder, TOKENIZER_CONFIG_FILE)
    try:
        if os.path.lexists(template_file):
            template = read_bounded(template_file, MAX_CHAT_TEMPLATE_BYTES)
        elif os.path.lexists(config):
            text = read_bounded(config, MAX_TOKENIZER_CONFIG_BYTES)
            template = default_template(strict_json.loads(text).get("chat_template"))
        else:
            template = None
    # unreadable, not UTF-8, not JSON, nested too deeply, not a JSON object
    except (OSError, ValueError, AttributeError, RecursionError) as exc:
        raise AdapterError(f"the adapter's chat template cannot be read: {exc}") from None
    if template is not None and len(template.encode("utf-8")) > MAX_CHAT_TEMPLATE_BYTES:
        raise AdapterError(f"the chat_template of the adapter's {TOKENIZER_CONFIG_FILE} has more than "
                           f"{MAX_CHAT_TEMPLATE_BYTES} bytes: too large to be a chat template")
    return None if template is None else compiled(template)


def compiled(template: str) -> str:
    """``template``, once Jinja compiled it as ``apply_chat_template`` does (transformers' cached
    ``_compile_jinja_template``: its sandboxed environment and extensions; the render then reuses it); AdapterError
    for a template it cannot compile: Jinja's TemplateSyntaxError or TemplateAssertionError (an unknown filter), or
    what Python raises compiling the code Jinja writes (SyntaxError past 20 nested loops, RecursionError for deep
    nesting). A template that compiles may still fail on some messages: that request is a 422
    (``http.chat.chat_prompt``)."""
    try:
        _compile_jinja_template(template)
    except Exception as exc:  # whatever the template's text makes Jinja or Python raise
        raise AdapterError(f"the adapter's chat template does not compile: {type(exc).__name__}: {exc}") from None
    return template


def default_template(template) -> str | None:
    """``tokenizer_config.json``'s ``chat_template``: a template, or named ones (``[{"name", "template"}]``) of which
    the one named default; None when absent. AdapterError for anything else."""
    if template is None or isinstance(template, str):
        return template
    entries = template if isinstance(template, list) else []
    named = {entry.get("name"): entry.get("template") for entry in entries if isinstance(entry, dict)}
    if not isinstance(named.get("default"), str):
        raise AdapterError("the adapter's tokenizer_config.json has a chat_template that is neither a template nor "
                           "named templates with one named default")
    return named["default"]
