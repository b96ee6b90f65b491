"""The sockets the HTTP service listens on, taken before the model loads: a port in use or a host this machine has no
address of is then a usage error at once (a review: uvicorn found it once the model had loaded, exit status 3), and
no other process can take the port before the server serves on these very sockets (uvicorn's ``sockets``). Light
(the standard library only): the CLI imports it."""
from __future__ import annotations

import errno
import socket

PORT_ERRORS = (errno.EADDRINUSE, errno.EACCES)  # the port's fault (taken, or below 1024 for a user); else the host's


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """TCP sockets listening on ``port`` at each address ``host`` names (as asyncio's ``create_server`` binds them:
    ``localhost`` may be 127.0.0.1 and ::1), with SO_REUSEADDR (a restart does not wait for the last run's
    connections in TIME_WAIT); listening at once, as a socket only bound would not keep another SO_REUSEADDR socket
    off the port on Linux. Connections made before the server serves wait in the kernel's backlog. Raises OSError
    where one cannot be bound (EADDRINUSE, EADDRNOTAVAIL, EACCES...), socket.gaierror where ``host`` names no
    address; none is left open then."""
    addresses = {(family, address) for family, _, _, _, address in
                 socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    sockets: list[socket.socket] = []
    try:
        for family, address in sorted(addresses):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # as asyncio: an IPv6 socket does not also take the IPv4 address
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen()
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets

