"""The scaled service as a Ray Serve application (``build_app``: the router in front of N loraswap replicas), and
``serve_scaled``, which runs it on a Ray cluster (a local one, or one joined by its address) until interrupted."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.context import _get_global_client

from service.cli.command import UsageError, interrupt
from service.scale import WITHOUT_BITSANDBYTES
from service.scale.options import ROUTINGS
from service.scale.preflight import sharing
from service.scale.replica import ROUTER_NAME, LoraswapReplica
from service.scale.round_robin import RoundRobinRouter
from service.scale.router import Router
from service.settings import Settings, worded

log = logging.getLogger(__name__)

APP_NAME = "loraswap"
# Ray Serve's HTTP proxy binds its port with SO_REUSEPORT unless this is 0 (Ray 2.60: proxy.py): a process that took
# the port so too after the preflight found it free (as a second `loraswap scale`'s proxy would) shared it with the
# proxy, the kernel spreading the connections over both; now the proxy cannot listen there (start_serve)
PROXY_REUSE_PORT = "SERVE_SOCKET_REUSE_PORT_ENABLED"


@dataclass(frozen=True)
class ScaleConfig:
    """How to scale: ``replicas`` loraswap replicas, each reserving ``replica_cpus`` CPUs and ``replica_gpus`` GPUs
    of the Ray cluster (Ray's logical resources: a replica is placed on a node that has them free); ``routing``:
    "multiplexed" (to a replica that holds the request's adapter) or "round-robin" (each replica in turn, the
    baseline); ``address``: the Ray cluster to join (None: start one on this machine)."""

    replicas: int
    routing: str = "multiplexed"
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    address: str | None = None


def build_app(settings: Settings, config: ScaleConfig, named: Callable[[str], str] = worded) -> Application:
    """The router (ingress, no CPU reserved: it only reads and forwards) bound to ``config.replicas`` replicas of
    loraswap with ``settings``, naming them in their log and their reasons as ``named`` does (``Runtime``'s: the
    command's ``command.naming``, which pickles, as Ray sends it to each replica). A replica takes as many requests at
    once as its engine batches and queues (``max_batch`` + ``max_queue``; past the queue it answers 429 itself); the
    router as many as all of them. The router's process, and a replica's of a full-precision base, go without
    bitsandbytes, as serve's does (``WITHOUT_BITSANDBYTES`` in their environment). The replicas that share a device
    (``preflight.sharing``; on a cluster's machines, not known here, one) split its memory's room for adapters
    (``Runtime``'s ``sharing``)."""
    if config.routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, not {config.routing!r}")
    per_replica = settings.max_batch + settings.max_queue
    routed = ({"request_router_config": RequestRouterConfig(request_router_class=RoundRobinRouter)}
              if config.routing == "round-robin" else {})
    full_precision = {"runtime_env": {"env_vars": {WITHOUT_BITSANDBYTES: "1"}}}  # its processes go without it
    replica = serve.deployment(LoraswapReplica, name="LoraswapReplica").options(
        num_replicas=config.replicas, max_ongoing_requests=per_replica,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus,
                           **(full_precision if settings.quantize == "none" else {})}, **routed)
    router = serve.deployment(Router, name=ROUTER_NAME).options(  # it runs no model
        num_replicas=1, max_ongoing_requests=per_replica * config.replicas,
        ray_actor_options={"num_cpus": 0, **full_precision})
    return router.bind(replica.bind(settings, named, max(sharing(settings, config), 1)), settings)


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


def on_signals(handler) -> None:
    """``handler`` for SIGINT and SIGTERM."""
    for number in INTERRUPTS:
        signal.signal(number, handler)


@contextlib.contextmanager
def own_signals(handler):
    """SIGINT and SIGTERM go to ``handler`` in the block, which cannot set another handler for either (ray.init sets
    SIGTERM's to its own, ``sys.exit(15)``, as it begins: a review found exit status 134 and Ray's agents left
    running); to ``interrupt`` after it. Not ``signal.pthread_sigmask`` over ray.init, handlers set again after it:
    every process Ray starts in it inherits the mask and ignores SIGTERM (measured), and the mask holds only this
    thread's signals."""
    set_handler = signal.signal

    def keep(signum, new):
        return signal.getsignal(signum) if signum in INTERRUPTS else set_handler(signum, new)

    on_signals(handler)
    signal.signal = keep
    try:
        yield
    finally:
        signal.signal = set_handler
        on_signals(interrupt)


def init_ray(address: str | None) -> None:
    """``ray.init(address)``, loraswap's handlers kept (``own_signals``). Starting a Ray of its own (``address``
    None), SIGINT and SIGTERM are held until it is up, then raise KeyboardInterrupt: one that cut the start of its
    processes short left some (its agents) that no ``ray.shutdown`` ends; its Serve's HTTP proxy is to bind its
    port alone (``PROXY_REUSE_PORT``). UsageError where ``address`` finds no cluster (ray.init's ConnectionError)."""
    held: list[int] = []

    def hold(signum: int, frame) -> None:
        if address is not None:
            return interrupt(signum, frame)
        held.append(signum)

    if address is None:  # its processes inherit this environment
        os.environ[PROXY_REUSE_PORT] = "0"
    with own_signals(hold):
        try:
            ray.init(address=address or "local")  # not RAY_ADDRESS's cluster: None is one of this machine alone
        except ConnectionError as exc:  # auto, with no cluster started here
            raise UsageError(f"--address {address}: {exc}") from None
    if held:
        raise KeyboardInterrupt(signal.Signals(held[0]).name)


def serve_scaled(settings: Settings, config: ScaleConfig, named: Callable[[str], str] = worded) -> None:
    """Serve the HTTP API on ``settings.host``:``settings.port`` from ``config.replicas`` replicas (naming their
    settings as ``named`` does: ``build_app``) until interrupted
    (Ctrl-C or SIGTERM at any point, even where the shell started it with SIGINT ignored), then take the application
    down, and Ray too when it was started here (``take_down``). UsageError where ``config.address`` finds no cluster
    (``init_ray``), or one whose Serve listens elsewhere or runs the application already, or where Serve's HTTP proxy
    cannot listen on the port (``start_serve``). SIGINT's and SIGTERM's handlers are the caller's again on return."""
    handlers = [signal.getsignal(number) for number in INTERRUPTS]
    on_signals(interrupt)
    deploying = False
    try:
        init_ray(config.address)
        start_serve(settings.host, settings.port)
        log.info("starting %d replicas (%s routing); the model loads on each", config.replicas, config.routing)
        deploying = True
        serve.run(build_app(settings, config, named), name=APP_NAME, route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        log.info("interrupted: taking the application down")
    finally:
        on_signals(signal.SIG_IGN)  # a second interrupt does not cut the take-down short (SIGKILL still ends it)
        take_down(config, deploying)
        for number, handler in zip(INTERRUPTS, handlers):
            signal.signal(number, handler)


def start_serve(host: str, port: int) -> None:
    """Start Ray Serve with its HTTP proxies on ``host``:``port``, or join the Serve already running on the cluster
    where they listen there. UsageError, before anything is deployed, where they listen elsewhere: a running Serve
    keeps the HTTP options it started with (``serve.start`` only logs that it ignores others; a review found the
    service on the earlier run's port), and only a restart of Serve, every application on the cluster with it,
    changes them. UsageError too where Serve runs an application ``APP_NAME`` (another run's): ``serve.run`` would
    put this run's in its place (a review found the first run's replaced without a word). Two runs that start at once
    may both pass this check; the later deploy then replaces the earlier. UsageError naming --port where the Serve
    this call starts finds its HTTP proxy cannot listen on ``host``:``port`` (``proxy_cannot_listen``); that Serve is
    ended (on a cluster joined, its controller would restart the proxy without end, and a later run would join it)."""
    running = _get_global_client(raise_if_no_controller_running=False)  # serve.start's own look-up
    if running is not None:
        serving = f"{running.http_config.host}:{running.http_config.port}"
        if (running.http_config.host, running.http_config.port) != (host, port):
            raise UsageError(f"Ray Serve already runs on this cluster, its HTTP proxies on {serving}, not "
                             f"{host}:{port}: give --host and --port of {serving}, or end Serve there first (`serve "
                             "shutdown`, which ends every Serve application of the cluster)")
        existing = serve.status().applications.get(APP_NAME)
        if existing is not None:
            raise UsageError(f"Ray Serve on this cluster already runs the application {APP_NAME} "
                             f"({existing.status.value}, another loraswap scale's) on {serving}: end that run first "
                             "(Ctrl-C or SIGTERM; `serve shutdown` ends every Serve application of the cluster)")
    try:
        serve.start(http_options={"host": host, "port": port})
    except RayTaskError as exc:
        if not proxy_cannot_listen(exc):
            raise
        serve.shutdown()
        raise UsageError(f"--port {port}: Ray Serve's HTTP proxy cannot listen on port {port} of {host} "
                         f"({exc.cause}): a process took the port after loraswap scale found it free, or, on a "
                         "cluster (--address), holds it on the head node: end that process, or give another --port"
                         ) from None


def proxy_cannot_listen(exc: RayTaskError) -> bool:
    """Whether ``exc``, raised by ``serve.start``, is its HTTP proxy's failure to bind its port (Ray 2.60:
    ``ProxyActor.ready`` raises the RuntimeError of ``start_asgi_http_server``, its OSError dropped; ``serve.start``
    raised it as a traceback, exit status 1, once Ray had started, where another process took the port after
    ``preflight.check_scale`` found it free)."""
    return isinstance(exc.cause, RuntimeError) and str(exc.cause).startswith("Failed to bind to address")


def take_down(config: ScaleConfig, deploying: bool) -> None:
    """Take the application down, with Serve and Ray when Ray was started here (waiting for Ray's processes to
    end); on a cluster joined, only the application, where ``deploying`` it began (not another run's of its name,
    where this one was refused)."""
    if ray.is_initialized():
        if config.address is None:
            serve.shutdown()
        elif deploying:
            serve.delete(APP_NAME)
    ray.shutdown(wait_for_processes=config.address is None)
