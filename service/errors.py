"""The service's domain errors, all in one place. None carries an HTTP status: the HTTP layer maps each class to one
in a single table (``service.http.errors.STATUS``), and documents its routes' error replies from that table. The
first line of each docstring is what the API documentation says the error means. An error that passes (a full queue,
a model still loading) says when a retry may succeed: ``retry_after``, in whole seconds (RFC 9110's delay-seconds),
which the HTTP layer sends as Retry-After; one that never passes by itself says None.
"""
from __future__ import annotations


class NamesSettings(Exception):
    """An error whose message may name the server's settings, by their fields as the service's checks word them
    (``max_rank``): ``settings``, those it names, which whoever shows it names as the server's operator sets them (a
    reply: ``Runtime.named``, ``--max-rank`` or ``LORASWAP_MAX_RANK``; a review: a rank refused over HTTP said
    "(max_rank)", a name no operator sets)."""

    def __init__(self, *args, settings: tuple[str, ...] = ()):
        super().__init__(*args)
        self.settings = settings


class AdapterError(NamesSettings):
    """An adapter the engine cannot serve exactly, or a request about adapters that cannot be honoured."""


class NonFiniteLogits(AdapterError):
    """The model gave NaN or infinite logits for a request: its adapter's weights overflow in the forward pass (or the
    dtype is too narrow for them). Any answer from them would be meaningless, so the request is refused, not served."""

    def __init__(self, adapter: str | None):
        super().__init__(f"{f'adapter {adapter!r}' if adapter else 'the base model'} gave NaN or infinite logits for "
                         "this request (weights that overflow in the forward pass): no answer can be computed from "
                         "them")


class UnknownAdapter(AdapterError):
    """No adapter of that name is registered."""


class AdapterNameRefused(AdapterError):
    """The adapter name is one no adapter can have: not a plain identifier, or a name of the bare base model."""


class AdapterPathMissing(AdapterError):
    """The adapter path is not a folder."""


class AdapterPathRefused(AdapterError):
    """The adapter path lies outside the configured adapter roots."""


class AdapterConflict(AdapterError):
    """The adapter name is taken, or the adapter is merged, or merging is impossible on this base."""


class AdapterPathAmbiguous(AdapterConflict):
    """The relative adapter path names a folder in more than one adapter root: which one is meant is not known."""


class AdapterMerged(AdapterConflict):
    """The adapter is merged into the base weights, so it cannot be unregistered as it is."""

    def __init__(self, name: str):
        super().__init__(f"adapter {name!r} is merged into the base; unmerge it first")


class NoFreeSlot(AdapterError):
    """A batch needs more adapters at once than there are device slots."""

    retry_after: int | None = 1  # slots are freed as the batch's rows finish


class NoRoomForAdapter(AdapterError):
    """The server has no memory left for the adapter: with it the registered adapters' host copies and LoRA banks
    would take more than the room its start left them (``lora.adapter_memory``); delete an adapter first."""


class UnsafeEnvironment(Exception):
    """An environment variable holds a value that would crash a library the model runs on: refused before the model
    loads, never in reply to a request. ``off``: the boolean setting that, false, avoids the crash, named after
    ``message`` as its ``LORASWAP_`` variable (``settings.variable``; the CLI names it as its command takes it:
    ``off_switch``)."""

    def __init__(self, message: str, off: str | None = None):
        from service.settings import variable  # here: the render processes import this module, not pydantic

        self.message, self.off = message, off
        super().__init__(f"{message} ({variable(off)}=false)" if off else message)


class InputTooLong(NamesSettings):
    """The prompt has more tokens than the server accepts."""


class TemplateRefused(Exception):
    """A chat template (an adapter's own: its code is the adapter's) refused or failed to render a prompt."""


class RenderUnavailable(Exception):
    """The server could not render the chat template, for trouble of its own, not the template's; retry later.
    Its render process was killed or frozen from outside, or failed to start; the next render starts a new one."""

    retry_after: int | None = 1  # the next render starts a new process at once


class NoSpan(Exception):
    """An extractive answer cannot be held to a span of the context: the context has no text a token can begin an
    answer with, or the model's vocabulary does not say which bytes its tokens spell."""


class QueueFull(NamesSettings):
    """The queue holds as many requests as it may; retry later."""

    # the queue moves at each batch the engine takes (a decoding step apart: milliseconds to a second), and no longer
    # wait is known to be enough; the server bounds the queue and the wait in it instead (max_queue, max_queue_wait)
    retry_after: int | None = 1


class TemplateBacklog(QueueFull):
    """A chat template known to be slow has as many prompts waiting to be rendered with it as the server queues for
    it; retry later. ``retry_after``: the seconds the prompts ahead of a retry may take to render, each up to
    its renders' deadlines (``template_sandbox.Renderer.refusal``)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class QueueTimeout(QueueFull):
    """A request waited in the queue longer than ``max_queue_wait`` seconds without any of its parts joining a batch:
    the server is past capacity; retry later."""


class EngineStopped(NamesSettings):
    """The model is loading, or the service is shutting down (draining or stopped), and takes no new requests.

    A request refused as the service shuts down, new or queued and not begun (its wait past ``max_queue_wait``, the
    queue full, a forced stop), is this, a 503 without ``retry_after``: the server is going away, and its client's
    retry belongs to another (the load balancer's). A 429 'retry later' (QueueFull) sent it back to this one."""

    retry_after: int | None = None


class StillLoading(EngineStopped):
    """The model is still loading: the service takes requests once it is ready (``/ready``)."""

    retry_after = 1  # /ready is polled each second while the model loads


class EngineFailed(EngineStopped):
    """The service failed to start, or its engine thread died of an unexpected error: every queued, running and new
    request fails with this until it is restarted (no ``retry_after``: it does not pass by itself)."""


class RequestAbandoned(Exception):
    """The request was withdrawn by its caller (its client went away) before it finished."""
