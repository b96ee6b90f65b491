"""``loraswap scale --address``'s check of the head before Ray starts (service/scale/preflight.py), where Ray Client
(``ray://``) or TLS (``RAY_USE_TLS``) is used: gRPC servers of this process stand for the head's, so that no cluster is
needed (a real head, with and without TLS, answered as these do: the commit's message)."""
from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

pytest.importorskip("ray.serve", reason='needs Ray Serve: pip install -e ".[scale]"')

import grpc
from grpc_reflection.v1alpha import reflection

from service.cli.command import UsageError
from service.scale.preflight import CLIENT_CALL, GCS_SERVICE, check_address

NO_HEAD = "no Ray cluster answers there"


@contextmanager
def grpc_server(listed: tuple[str, ...] = (), client: grpc.StatusCode | None = None, tls: bool = False
                ) -> Iterator[str]:
    """The ``HOST:PORT`` of a gRPC server whose reflection lists ``listed`` (none: no reflection), that answers
    ``CLIENT_CALL`` where ``client`` is OK, refuses it with ``client`` where that is another code (None: serves it
    not), over TLS as a Ray server under ``RAY_USE_TLS`` where ``tls``, until the block ends."""
    from ray._common.tls_utils import add_port_to_grpc_server

    def cluster_info(request: bytes, context: grpc.ServicerContext) -> bytes:
        if client != grpc.StatusCode.OK:
            context.abort(client, "refused")
        return b""

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    if client is not None:
        service, method = CLIENT_CALL.strip("/").split("/")
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            service, {method: grpc.unary_unary_rpc_method_handler(cluster_info)})])
    if listed:
        reflection.enable_server_reflection([*listed, reflection.SERVICE_NAME], server)
    port = add_port_to_grpc_server(server, "127.0.0.1:0") if tls else server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@pytest.mark.parametrize("client,refusal", [
    (grpc.StatusCode.OK, None),
    # a review: a GCS's port given as ray:// passed (it answers gRPC), and Ray Client timed out 30 s later
    (None, f"{NO_HEAD} (it answers gRPC, but serves no ray.rpc.RayletDriver, as Ray Client's server on a head does"),
    # Ray Client's server of a head with token authentication (Ray 2.60's default): ray.init timed out 30 s later
    (grpc.StatusCode.UNAUTHENTICATED, "the Ray cluster there takes only token-authenticated calls, and RAY_AUTH_MODE "
     "is not token here: set RAY_AUTH_MODE=token"),
], ids=["client-server", "gcs-port", "token"])
def test_a_ray_client_address_is_checked_as_ray_clients_server(client, refusal, monkeypatch):
    """A ray:// address passed once any gRPC server answered there: its server is asked Ray Client's first call (a
    PING), which its server serves (it has no server reflection to list it)."""
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    with grpc_server(listed=(GCS_SERVICE,), client=client) as head:
        if refusal is None:
            check_address(f"ray://{head}")
        else:
            with pytest.raises(UsageError, match="^" + re.escape(f"--address ray://{head}: {refusal}")):
                check_address(f"ray://{head}")


def test_a_token_the_head_refuses_is_a_usage_error_naming_the_token(monkeypatch):
    """A review: RAY_AUTH_MODE=token with a wrong RAY_AUTH_TOKEN passed the check (only a call sent without a token
    was told), and ray.init logged InvalidAuthToken each second for 20 s, then said 'Failed to connect to Ray cluster'
    (exit status 2). Ray's channel sends the token here, and the head refuses it: one line naming the token."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-cluster-token")
    with grpc_server(client=grpc.StatusCode.UNAUTHENTICATED) as head, pytest.raises(UsageError, match="^" + re.escape(
            f"--address ray://{head}: the Ray cluster there refuses the token sent from here (RAY_AUTH_TOKEN, else the "
            "file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token): give the cluster's token")):
        check_address(f"ray://{head}")


@pytest.fixture
def ray_tls(tmp_path, monkeypatch) -> None:
    """Ray's gRPC over TLS in this environment (``RAY_USE_TLS``), with a self-signed certificate of this machine."""
    pytest.importorskip("cryptography", reason="makes the certificate")
    from ray._common.tls_utils import generate_self_signed_tls_certs

    certificate, key = generate_self_signed_tls_certs()
    (tmp_path / "head.crt").write_text(certificate)
    (tmp_path / "head.key").write_text(key)
    for name, file in [("RAY_TLS_SERVER_CERT", "head.crt"), ("RAY_TLS_SERVER_KEY", "head.key"),
                       ("RAY_TLS_CA_CERT", "head.crt")]:
        monkeypatch.setenv(name, str(tmp_path / file))
    monkeypatch.setenv("RAY_USE_TLS", "1")


@pytest.mark.parametrize("listed,tls,refusal", [
    ((GCS_SERVICE,), True, None),
    # a review: under RAY_USE_TLS nothing past the TCP connection was checked: a raylet's port, another server...
    (("ray.rpc.NodeManagerService",), True, f"{NO_HEAD} (it answers gRPC, but its server reflection lists no "
     f"{GCS_SERVICE}"),
    # ...or a head without TLS, where Ray's TLS channel cannot open
    ((GCS_SERVICE,), False, f"{NO_HEAD} (it accepts a connection, but no gRPC one over TLS (RAY_USE_TLS) within 5 s"),
], ids=["tls-head", "tls-raylet", "head-without-tls"])
def test_under_ray_use_tls_the_head_is_checked_over_tls_as_ray_connects(listed, tls, refusal, ray_tls):
    with grpc_server(listed=listed, tls=tls) as head:
        if refusal is None:
            check_address(head)
        else:
            with pytest.raises(UsageError, match="^" + re.escape(f"--address {head}: {refusal}")):
                check_address(head)


def test_ray_use_tls_without_its_certificates_is_a_usage_error(ray_tls, monkeypatch):
    """Ray needs the three certificate variables under RAY_USE_TLS (its RuntimeError otherwise, as ray.init's)."""
    monkeypatch.delenv("RAY_TLS_CA_CERT")
    with grpc_server(listed=(GCS_SERVICE,)) as head, pytest.raises(
            UsageError, match=r"^RAY_USE_TLS is set, and its certificates cannot be read: .*RAY_TLS_CA_CERT must also"):
        check_address(head)
