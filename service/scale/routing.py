"""Where the router sends a request, read from the request alone (no Ray here): the adapter it is for, which becomes
its Ray Serve multiplexed model id (``adapter_of``), and whether it changes the adapters, so that every replica must
see it (``changes_adapters``)."""
from __future__ import annotations

from service import strict_json
from service.errors import AdapterError
from service.lora.adapter_files import adapter_or_base, check_name
from service.settings import Settings

# the body field that names the adapter of a request that runs the model, by route
ADAPTER_FIELDS = {"/answer": "adapter", "/nli": "adapter", "/v1/completions": "model", "/v1/chat/completions": "model"}
# the admin routes outside /adapters that change the adapters (vLLM's)
VLLM_ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
READ_ONLY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
NO_ADAPTER = ""  # Ray Serve's multiplexed model id of a request routed without affinity
REPLICA_HEADER = "x-loraswap-replica"  # the reply header that names the replica that served it


def default_adapters(settings: Settings) -> dict[str, str | None]:
    """The adapter each route uses when a request names none (``Settings.qa_adapter``, ``nli_adapter``)."""
    return {"/answer": settings.qa_adapter, "/nli": settings.nli_adapter}


def adapter_of(method: str, path: str, body: bytes, defaults: dict[str, str | None]) -> str:
    """The adapter a request runs the model with, as a multiplexed model id: the body's ``adapter`` (``/answer``,
    ``/nli``; absent: the route's entry in ``defaults``) or ``model`` (``/v1/completions``, ``/v1/chat/completions``).
    ``NO_ADAPTER`` for the bare base model, for any other request, and for a body the replica will refuse (not a
    JSON object, a name that is no plain identifier): it goes to any replica, which answers it."""
    field = ADAPTER_FIELDS.get(path)
    if method != "POST" or field is None:
        return NO_ADAPTER
    try:
        payload = strict_json.loads(body)
    except (ValueError, RecursionError):  # not UTF-8, not JSON or a key named twice (ValueError), nested too deeply
        return NO_ADAPTER
    if not isinstance(payload, dict):
        return NO_ADAPTER
    name = payload[field] if field in payload else defaults.get(path)
    if not isinstance(name, str) or adapter_or_base(name) is None:
        return NO_ADAPTER
    try:
        return check_name(name)
    except AdapterError:
        return NO_ADAPTER


def changes_adapters(method: str, path: str) -> bool:
    """Whether a request changes the adapters (registers, unregisters, merges, unmerges): the admin routes under
    ``/adapters`` but its listing, and vLLM's load and unload routes."""
    if method in READ_ONLY_METHODS:
        return False
    return path == "/adapters" or path.startswith("/adapters/") or path in VLLM_ADMIN_PATHS
