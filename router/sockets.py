"""Listening sockets, bound before anything else starts.

``serve`` and ``fake-klaviyo`` bind their address first: when it is taken (or not allowed), they
stop with one line naming it, before the queue, the sandbox or the delivery workers exist.
"""

from __future__ import annotations

import socket

from router.errors import ConfigError

BACKLOG = 1024


def listen(host: str, port: int, *, where: str = "server") -> list[socket.socket]:
    """Sockets listening on every address ``host`` names (as aiohttp's TCP site would bind).

    Raises :class:`ConfigError` (``server: cannot listen on 127.0.0.1:8080: Address already in
    use``) when one cannot be bound; none is left open then.
    """
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        shown = f"[{host}]" if ":" in host else host
        raise ConfigError(f"{where}: cannot listen on {shown}:{port}: {exc.strerror or exc}") from None
    return sockets
