"""What ``loraswap scale`` checks before Ray starts, so that settings no replica could start with are one usage error,
not a replica's traceback on each replica (or a wait without end): serve's own checks where the replicas run here, the
base model's room for a prompt, and that a cluster's address is a Ray head this environment can join."""
from __future__ import annotations

import argparse
import math
import os
import socket
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from service.cli.command import UsageError, check_room_for_prompts, check_server_start, take_port
from service.settings import Settings, known_host

if TYPE_CHECKING:
    from service.scale.app import ScaleConfig

CONNECT_TIMEOUT_S = 5.0  # for the head of the cluster --address names to accept a connection, then gRPC's, each call
GCS_SERVICE = "ray.rpc.NodeInfoGcsService"  # a gRPC service a Ray head's GCS serves, and no raylet
CLUSTER_ID_CALL = f"/{GCS_SERVICE}/GetClusterId"  # ray.init's first call to the GCS (internal: gcs_refusal says why)
CLIENT_SERVICE = "ray.rpc.RayletDriver"  # the gRPC service of Ray Client's server (ray://), which serves no reflection
CLIENT_CALL = f"/{CLIENT_SERVICE}/ClusterInfo"  # Ray Client's first call (a PING): refused without a token
MOST_ONGOING = 2**31 - 1  # Ray Serve's max_ongoing_requests: a 32-bit integer (its DeploymentConfig proto)


def check_scale(settings: Settings, args: argparse.Namespace) -> None:
    """UsageError (or UnsafeEnvironment) where ``args.replicas`` replicas with ``settings`` (from ``args``) could not
    start: on a Ray started here (no ``args.address``), whose replicas run on this machine in its environment, serve's
    checks of it (``check_server_start``: the device, oneDNN's environment) and the GPUs and CPUs they reserve
    (``check_gpus``, ``check_cpus``); anywhere the token budget and the size settings (``check_room_for_prompts``:
    the device's memory only on a Ray started here, times the replicas ``sharing`` it) and the address
    (``check_address``); last, on a Ray started here, that its HTTP proxy can listen on ``--host``:``--port``
    (``take_port``)."""
    if args.address is None:
        check_server_start(settings, args)
        check_gpus(args.replicas, args.replica_gpus)
        check_cpus(args.replicas, args.replica_cpus)
    check_room_for_prompts(settings, replicas=sharing(settings, args))
    check_ongoing(settings, args.replicas)
    check_address(args.address)
    if args.address is None:  # Ray Serve's HTTP proxy is to listen here: its port must be free before Ray starts
        for sock in take_port(settings, args):
            sock.close()


def sharing(settings: Settings, args: argparse.Namespace | ScaleConfig) -> int:
    """How many of ``args.replicas`` replicas (``args``: scale's, or its ``ScaleConfig``) share one device's memory on
    a Ray started here: on the CPU all of them (the host's memory), on GPUs as many as Ray places on one (fractions of
    a GPU: ``gpus_needed``); 0 on a cluster given by ``--address``, whose machines' memory is not known here."""
    from service.model.base_model import pick_device

    if args.address is not None:
        return 0
    if pick_device(settings.device).type == "cpu":
        return args.replicas
    if 0 < args.replica_gpus < 1:
        return min(args.replicas, math.floor(1 / args.replica_gpus + 1e-9))
    return 1


def gpus_needed(replicas: int, replica_gpus: float) -> int:
    """The fewest GPUs ``replicas`` replicas reserving ``replica_gpus`` each fit on: Ray places a fraction of a GPU on
    one GPU, as many as fit, and a larger share on whole ones."""
    if replica_gpus == 0:
        return 0
    if replica_gpus > 1:
        return replicas * math.ceil(replica_gpus)
    return math.ceil(replicas / math.floor(1 / replica_gpus + 1e-9))


def check_cpus(replicas: int, replica_cpus: float) -> None:
    """UsageError where ``replicas`` replicas reserving ``replica_cpus`` CPUs each need more than the CPUs the Ray
    started here will see (Ray adds fractions up on one node): Ray would wait for them without end (a review). Ray's
    own count (``ray._private.utils.get_num_cpus``, Ray 2.60: in a container, its CPU quota, rounded down), not the
    cores (``os.cpu_count``): under ``docker run --cpus 1`` on 2 cores, 2 replicas of 1 CPU each passed this check."""
    from ray._private.utils import get_num_cpus  # the count ray.init gives the node it starts

    needed, count = replicas * replica_cpus, get_num_cpus(override_docker_cpu_warning=True)
    if needed > count:
        raise UsageError(f"--replica-cpus {replica_cpus:g} for {replicas} replica(s) needs {needed:g} CPUs, and this "
                         f"machine, where the Ray of loraswap scale starts, has {count}")


def check_gpus(replicas: int, replica_gpus: float) -> None:
    """UsageError where this machine has fewer GPUs than ``replicas`` replicas reserving ``replica_gpus`` each need on
    the Ray started here (Ray would wait for them without end)."""
    needed = gpus_needed(replicas, replica_gpus)
    if needed:
        import torch

        count = torch.cuda.device_count()
        if count < needed:
            raise UsageError(f"--replica-gpus {replica_gpus:g} for {replicas} replica(s) needs {needed} GPU(s), and "
                             f"this machine, where the Ray of loraswap scale starts, has {count}")


def check_ongoing(settings: Settings, replicas: int) -> None:
    """UsageError where the requests the router takes at once, ``max_batch`` + ``max_queue`` for each of ``replicas``
    replicas (``app.build_app``: Ray Serve's max_ongoing_requests), pass ``MOST_ONGOING``: Ray refused the deployment
    ("Value out of range") once it had started."""
    ongoing = (settings.max_batch + settings.max_queue) * replicas
    if ongoing > MOST_ONGOING:
        raise UsageError(f"max_batch {settings.max_batch} + max_queue {settings.max_queue}, for each of {replicas} "
                         f"replica(s) (--replicas), is {ongoing} requests at once for the router, past the "
                         f"{MOST_ONGOING} Ray Serve takes (max_ongoing_requests, a 32-bit integer): lower max_queue")


def check_address(address: str | None) -> None:
    """UsageError where ``address`` names a head (its GCS, ``HOST:PORT``, or its Ray Client server,
    ``ray://HOST:PORT``) that accepts no connection within ``CONNECT_TIMEOUT_S`` (ray.init tried for over a minute,
    then raised a traceback), is no Ray head (or no Ray Client server), or one whose token authentication this
    environment would not pass, no token sent or a wrong one (``check_head``); None, ``auto`` and ``local`` pass
    (ray.init finds or starts the cluster)."""
    if address in (None, "auto", "local"):
        return
    try:
        parts = urlsplit(address if "://" in address else f"//{address}")
        host, port = parts.hostname, parts.port
    except ValueError:  # a port not a number or past 65535, an unclosed [ of an IPv6 address
        raise not_an_address(address) from None
    if parts.scheme not in ("", "ray") or not known_host(host) or port is None:
        # a review: http://x:1 was taken as a host, and failed 8 s later with 'Name or service not known'
        raise not_an_address(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise no_cluster(address, exc.strerror or str(exc)) from None
    check_head(address, host, port, client=parts.scheme == "ray")


def not_an_address(address: str) -> UsageError:
    """The usage error of an ``address`` that names no head."""
    return UsageError(f"--address {address}: must be HOST:PORT (or ray://HOST:PORT) or auto")


def no_cluster(address: str, why: str) -> UsageError:
    """The usage error of an ``address`` where no Ray cluster answers, for the reason ``why``."""
    return UsageError(f"--address {address}: no Ray cluster answers there ({why}); `ray start --head` prints a head's "
                      "address, and --address auto finds one started on this machine")


def check_head(address: str, host: str, port: int, client: bool) -> None:
    """UsageError where ``host``:``port`` of ``address`` is no Ray head this environment can join, found within
    ``CONNECT_TIMEOUT_S`` a call, with gRPC's public protocols (and, for the token, the first call of ray.init), over
    the channel Ray would open (``ray_channel``: TLS where ``RAY_USE_TLS`` is set, a review found nothing checked
    there): it opens no gRPC channel (HTTP/2's handshake, and TLS's: grpcio's ``channel_ready_future``; ray.init waited
    for minutes); for a GCS address, its gRPC server reflection lists no ``GCS_SERVICE`` (``lists_gcs``: a raylet's
    port, or another gRPC server, where ray.init waited long); for a Ray ``client``'s (``ray://``), its server serves no
    ``CLIENT_CALL`` (a GCS's port, where Ray Client timed out; Ray Client's server has no server reflection); or it
    refuses the first call as unauthenticated (``gcs_refusal``, ``client_refusal``; ``token_refused``: without a token
    where RAY_AUTH_MODE is not token, or with a wrong one, ray.init failed some 20 s later, Ray Client with a
    connection timeout). The standard health
    check cannot tell a GCS: Ray's servers report the server's overall status alone (measured on Ray 2.60: SERVING on
    the GCS and on a raylet, NOT_FOUND for any service name)."""
    import grpc  # Ray Serve's dependency

    with ray_channel(f"{host}:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            over = " over TLS (RAY_USE_TLS)" if uses_tls() else ""
            raise no_cluster(address, f"it accepts a connection, but no gRPC one{over} within "
                             f"{CONNECT_TIMEOUT_S:g} s, as a Ray head does") from None
        refusal = client_refusal(address, channel) if client else gcs_refusal(address, channel)
    if refusal == grpc.StatusCode.UNAUTHENTICATED:
        raise token_refused(address)


def token_refused(address: str) -> UsageError:
    """The usage error of a head at ``address`` that refused the first call of ray.init as unauthenticated: sent
    without a token where RAY_AUTH_MODE is not token, else with one it does not take (a wrong RAY_AUTH_TOKEN: ray.init
    logged 'InvalidAuthToken' each second for 20 s, then said only 'Failed to connect to Ray cluster')."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return UsageError(f"--address {address}: the Ray cluster there takes only token-authenticated calls, and "
                          "RAY_AUTH_MODE is not token here: set RAY_AUTH_MODE=token (Ray then sends the token of "
                          "~/.ray/auth_token)")
    return UsageError(f"--address {address}: the Ray cluster there refuses the token sent from here (RAY_AUTH_TOKEN, "
                      "else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token): give the cluster's token "
                      "(`ray get-auth-token` prints it on its head)")


def gcs_refusal(address: str, channel):
    """How the GCS of ``channel`` refuses ``CLUSTER_ID_CALL`` (``call_refusal``). UsageError where the server of
    ``channel`` is no GCS: its reflection lists no ``GCS_SERVICE`` (``lists_gcs``).

    ``CLUSTER_ID_CALL`` is Ray's internal RPC, not a public API: it is the very call ray.init (its ``GcsClient``)
    makes first, and authenticates, so its refusal is ray.init's. Ray 2.60.0 (requirements/lock.txt; checked there)
    has no public or stable way to ask an address whether a GCS answers there, and takes this token, without joining:
    ``ray.util.state`` given an address makes a ``ray._raylet.GcsClient`` (private), whose constructor makes this
    very call (and logs its failure), then reads the dashboard's URL from the GCS and asks the dashboard (port 8265,
    none on a head started without it); ``GcsClient.check_alive`` asks about nodes once that client is made; gRPC's
    standard health check answers SERVING for any of Ray's servers (``check_head``)."""
    if not lists_gcs(channel):
        raise no_cluster(address, f"it answers gRPC, but its server reflection lists no {GCS_SERVICE}, as a Ray "
                         "head's GCS does: a raylet's port, or another server")
    return call_refusal(channel, CLUSTER_ID_CALL, b"")


def client_refusal(address: str, channel):
    """How the Ray Client server of ``channel`` refuses ``CLIENT_CALL``, Ray Client's PING (``call_refusal``).
    UsageError where the server of ``channel`` serves no such call (UNIMPLEMENTED: a GCS's port, say)."""
    import grpc

    refusal = call_refusal(channel, CLIENT_CALL, client_ping())
    if refusal == grpc.StatusCode.UNIMPLEMENTED:
        raise no_cluster(address, f"it answers gRPC, but serves no {CLIENT_SERVICE}, as Ray Client's server on a "
                         "head does (port 10001 by default): a GCS's address is HOST:PORT, without ray://")
    return refusal


def uses_tls() -> bool:
    """Whether Ray's gRPC runs over TLS in this environment (``RAY_USE_TLS`` 1 or true, as Ray reads it)."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def ray_channel(target: str):
    """A gRPC channel to ``target`` (``HOST:PORT``) as Ray opens its own (``ray._private.grpc_utils.init_grpc_channel``,
    Ray 2.60; no HTTP proxy): over TLS where ``uses_tls``, with the certificates ``RAY_TLS_SERVER_CERT``,
    ``RAY_TLS_SERVER_KEY`` and ``RAY_TLS_CA_CERT`` name, and with the token where ``RAY_AUTH_MODE`` is token.
    UsageError, naming them, where those certificates cannot be read."""
    from ray._private.grpc_utils import init_grpc_channel

    try:
        return init_grpc_channel(target, options=[("grpc.enable_http_proxy", 0)])
    except (RuntimeError, OSError) as exc:  # RAY_USE_TLS: a variable unset, a file it names unreadable
        raise UsageError(f"RAY_USE_TLS is set, and its certificates cannot be read: {exc}") from None


def client_ping() -> bytes:
    """Ray Client's PING (``ray_client_pb2.ClusterInfoRequest``), serialized: its server answers it at once."""
    from ray.core.generated import ray_client_pb2

    return ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING).SerializeToString()


def lists_gcs(channel) -> bool:
    """Whether the gRPC server of ``channel`` lists ``GCS_SERVICE`` among its services (gRPC server reflection, which
    every Ray server enables and answers without a token; grpcio-reflection is Ray Serve's dependency). False for a
    server without reflection."""
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    asked = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    try:
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(asked,
                                                                                         timeout=CONNECT_TIMEOUT_S)
        return any(service.name == GCS_SERVICE for reply in replies
                   for service in reply.list_services_response.service)
    except grpc.RpcError:  # UNIMPLEMENTED: no reflection; DEADLINE_EXCEEDED
        return False


def call_refusal(channel, method: str, request: bytes):
    """The status code (``grpc.StatusCode``) with which the server of ``channel`` refuses ``method`` called with
    ``request`` (serialized), within ``CONNECT_TIMEOUT_S``; None where it answers. UNAUTHENTICATED: its token
    authentication is on, and no token was sent."""
    import grpc

    try:
        channel.unary_unary(method)(request, timeout=CONNECT_TIMEOUT_S)
    except grpc.RpcError as exc:
        return exc.code()
    return None
