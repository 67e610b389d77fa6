"""Is a broker there? One ApiVersions request on its own connection, for ``/readyz``.

A TCP connect alone is not enough: the kernel completes it for a frozen (SIGSTOP) or hung
broker. It answers from the HTTP thread without touching the consumer, which is not
thread-safe.
"""

from __future__ import annotations

import socket
import struct

from stream_fm.config import Settings

# ApiVersions v0 (api key 18), correlation id 1, client id "stream-fm-readyz": the one request
# a broker answers before any authentication (KIP-35), so it also works on SASL listeners.
_API_VERSIONS_REQUEST = (
    struct.pack(">hhih", 18, 0, 1, len(b"stream-fm-readyz")) + b"stream-fm-readyz"
)


def broker_answers(host: str, port: int, timeout_s: float, probe: bool = True) -> bool:
    """Whether a broker process answers at ``host:port``.

    A TCP connect alone is not enough: the kernel completes it for a frozen (SIGSTOP) or hung
    broker. So an ApiVersions request must get a response. On TLS listeners (no handshake
    here) only the connect is checked.
    """
    with socket.create_connection((host, port), timeout=timeout_s) as connection:
        if not probe:
            return True
        connection.settimeout(timeout_s)
        connection.sendall(struct.pack(">i", len(_API_VERSIONS_REQUEST)) + _API_VERSIONS_REQUEST)
        header = b""
        while len(header) < 8:
            chunk = connection.recv(8 - len(header))
            if not chunk:
                return False
            header += chunk
        _size, correlation_id = struct.unpack(">ii", header)
        return bool(correlation_id == 1)


def any_broker_answers(settings: Settings, timeout_s: float) -> bool:
    """Whether any bootstrap server answers an ApiVersions request (TLS: a connect)."""
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            if broker_answers(
                host.strip("[]") or "127.0.0.1",
                int(port),
                timeout_s,
                probe=settings.security_protocol in ("PLAINTEXT", "SASL_PLAINTEXT"),
            ):
                return True
        except (OSError, ValueError):
            continue
    return False
