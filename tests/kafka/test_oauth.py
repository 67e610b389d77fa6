"""OAUTHBEARER settings reach both clients; kafka-python's token provider does the client
credentials exchange against a token endpoint (a real HTTP server here) and reuses the token."""

from __future__ import annotations

import base64
import http.server
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any, ClassVar

import orjson
import pytest

from stream_fm.config import build_settings
from stream_fm.errors import BrokerError, ConfigError
from stream_fm.kafka.oauth import ClientCredentials
from stream_fm.kafka.settings import librdkafka_consumer, security_config


class _TokenEndpoint(http.server.BaseHTTPRequestHandler):
    requests: ClassVar[list[dict[str, Any]]] = []
    lifetime_s = 3600

    def do_POST(self) -> None:
        form = urllib.parse.parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
        user, _, secret = (
            base64.b64decode(self.headers["Authorization"][6:]).decode().partition(":")
        )
        self.requests.append({"form": form, "client": user, "secret": secret})
        if secret != "the-secret":
            self.send_response(401)
            self.end_headers()
            return
        body = orjson.dumps(
            {"access_token": f"tok-{len(self.requests)}", "expires_in": self.lifetime_s}
        )
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def endpoint() -> Iterator[str]:
    _TokenEndpoint.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _TokenEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/token"
    finally:
        server.shutdown()
        server.server_close()


def _settings(url: str, secret: str = "the-secret") -> Any:
    return build_settings(
        {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "OAUTHBEARER",
            "sasl_oauthbearer_token_endpoint_url": url,
            "sasl_oauthbearer_client_id": "stream-fm",
            "sasl_oauthbearer_client_secret": secret,
            "sasl_oauthbearer_scope": "kafka",
        }
    )


def test_both_clients_get_the_oidc_settings(endpoint: str) -> None:
    settings = _settings(endpoint)
    assert isinstance(security_config(settings)["sasl_oauth_token_provider"], ClientCredentials)
    rdkafka = librdkafka_consumer(settings)
    assert rdkafka["sasl.mechanism"] == "OAUTHBEARER"
    assert rdkafka["sasl.oauthbearer.method"] == "oidc"
    assert rdkafka["sasl.oauthbearer.token.endpoint.url"] == endpoint
    assert rdkafka["sasl.oauthbearer.client.secret"] == "the-secret"
    assert rdkafka["sasl.oauthbearer.scope"] == "kafka"
    with pytest.raises(ConfigError, match=r"^sasl_oauthbearer_token_endpoint_url: required"):
        build_settings({"security_protocol": "SASL_SSL", "sasl_mechanism": "OAUTHBEARER"})


def test_the_token_is_fetched_once_and_renewed_before_it_expires(endpoint: str) -> None:
    provider = ClientCredentials(_settings(endpoint))
    assert provider.token() == provider.token() == "tok-1"
    (first,) = _TokenEndpoint.requests
    assert first["client"] == "stream-fm" and first["form"]["grant_type"] == ["client_credentials"]
    assert first["form"]["scope"] == ["kafka"]
    _TokenEndpoint.lifetime_s = 31  # renewed 30 s early: after about a second
    fresh = ClientCredentials(_settings(endpoint))
    assert fresh.token() == "tok-2"
    time.sleep(1.2)
    assert fresh.token() == "tok-3"
    _TokenEndpoint.lifetime_s = 3600


def test_a_refused_exchange_says_where_without_the_secret(endpoint: str) -> None:
    with pytest.raises(BrokerError) as refused:
        ClientCredentials(_settings(endpoint, secret="wrong-secret")).token()
    assert endpoint in str(refused.value) and "wrong-secret" not in str(refused.value)
