"""One loraswap replica on Ray Serve: loraswap's own runtime (base model, registry, engine) and FastAPI app, called
in process with each request the router forwards (``service.scale.exchange``), so that every route behaves as in
``loraswap serve`` and the engine mixes adapters within its own batches.

Adapter affinity is Ray Serve's model multiplexing: the router sends a request with its adapter as the multiplexed
model id, and the replica calls its multiplexed loader (``hold``) with it. The loader's bounded LRU
(``max_num_models_per_replica`` = ``Settings.max_resident``, the device slots) is the set of adapters Ray Serve
tells its routers this replica holds, so later requests for them come here. The loader makes the adapter resident
in no other way than the engine does: every replica registers every adapter (the adapters folder, and admin changes
sent to all), and the engine fills a device slot when it admits the request, evicting its least recently used one;
Ray Serve's LRU evicts in the same order, as it sees the same requests, so its eviction needs no callback of ours.

Every call says how many admin changes the router's log holds; a replica behind applies those it lacks first
(``adapter_changes``), so one that started after them serves as the others do.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from prometheus_client import Counter, generate_latest
from ray import serve
from starlette.types import Message

from service.errors import UnknownAdapter
from service.http.app import create_app
from service.lora.adapter_files import AdapterWeights
from service.runtime import Runtime
from service.scale.adapter_changes import Follower
from service.scale.exchange import HttpReply, HttpRequest, collected, exchange
from service.scale.routing import NO_ADAPTER, REPLICA_HEADER
from service.settings import Settings, worded

ROUTER_NAME = "Router"  # the router's deployment, which keeps the log of admin changes

ADAPTER_REQUESTS = Counter(
    "loraswap_scale_adapter_requests", "Requests for a registered adapter that reached this replica, by whether the "
    "adapter was resident on arrival (in a device slot, or merged into the base weights)", ["resident"])
ADAPTER_HOLDS = Counter(
    "loraswap_scale_adapter_holds", "Adapters Ray Serve's multiplexing added to the ones this replica holds (its "
    "multiplexed loader's calls: a request for an adapter absent from the replica's bounded LRU)")


class LoraswapReplica:
    """A Ray Serve deployment class: one loraswap runtime, started (model and adapters loaded) before the replica
    takes requests. Its methods are called through the router's deployment handle."""

    def __init__(self, settings: Settings, named: Callable[[str], str] = worded, sharing: int = 1):
        """``named`` and ``sharing`` (the replicas that share its device's memory): as ``Runtime`` takes them
        (``scale``'s names its settings as its command line gave them)."""
        self.runtime = Runtime(settings, named, sharing=sharing)
        self.runtime.start()  # raises what stops the service from starting: Ray Serve then fails the replica
        self.app = create_app(rt=self.runtime)
        self.name = serve.get_replica_context().replica_tag
        self.changes = Follower(lambda change: collected(self.app, change), self.fetch_changes)

        async def hold(adapter: str) -> AdapterWeights:
            ADAPTER_HOLDS.inc()
            return self.runtime.registry.lookup(adapter)

        # an instance attribute, so that the bound comes from the settings (Ray Serve finds it on the instance)
        self.hold = serve.multiplexed(max_num_models_per_replica=settings.max_resident)(hold)

    async def stream(self, request: HttpRequest, logged: int) -> AsyncIterator[Message]:
        """The app's reply to ``request`` as ASGI messages (``exchange``), its start naming this replica in
        ``REPLICA_HEADER``. First the admin changes up to ``logged`` are applied, and the request's multiplexed model
        id (its adapter) is held (``affinity``)."""
        await self.changes.catch_up(logged)
        await self.affinity(serve.get_multiplexed_model_id())
        async for message in exchange(self.app, request):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REPLICA_HEADER.encode(), self.name.encode())]}
            yield message

    async def change(self, request: HttpRequest, number: int) -> tuple[str, HttpReply]:
        """This replica's name and the app's whole reply to the admin change ``request``, number ``number`` of the
        router's log (sent to every replica)."""
        return self.name, await self.changes.change(request, number)

    async def metrics(self, logged: int) -> tuple[str, str]:
        """This replica's name and its Prometheus metrics (the text format), once the admin changes up to ``logged``
        are applied."""
        await self.changes.catch_up(logged)
        return self.name, generate_latest().decode()

    async def fetch_changes(self, start: int, end: int) -> list[HttpRequest]:
        """The admin changes numbered ``start`` up to ``end`` (excluded), from the router's log."""
        router = serve.get_deployment_handle(ROUTER_NAME, app_name=serve.get_replica_context().app_name)
        return await router.adapter_changes.remote(start, end)

    async def affinity(self, adapter: str) -> None:
        """Count a request for ``adapter`` by whether it is resident, and hold it in the multiplexed LRU. Nothing for
        the bare base model (``NO_ADAPTER``) or an adapter not registered here (the app answers 404)."""
        if adapter == NO_ADAPTER:
            return
        registry = self.runtime.registry
        try:
            resident = registry.is_resident(registry.lookup(adapter))
            ADAPTER_REQUESTS.labels(resident=str(resident).lower()).inc()
            await self.hold(adapter)
        except UnknownAdapter:  # unregistered meanwhile
            return

    def __del__(self) -> None:  # Ray Serve calls it when it stops the replica
        self.runtime.stop()
