"""OAUTHBEARER with an OpenID Connect provider (client credentials, KIP-768's settings).

librdkafka does the token exchange itself (``sasl.oauthbearer.method=oidc``); kafka-python
wants a token provider object, which ``ClientCredentials`` is: it POSTs the client id and
secret to the token endpoint and keeps the token until shortly before it expires.
"""

from __future__ import annotations

import base64
import threading
import time
import urllib.parse
import urllib.request
from typing import Any

import orjson
from kafka.net.sasl.oauth import AbstractTokenProvider

from stream_fm.config import Settings
from stream_fm.errors import BrokerError

#: A token is renewed this long before the provider says it expires.
RENEW_BEFORE_S = 30.0


class ClientCredentials(AbstractTokenProvider):  # type: ignore[misc]
    """kafka-python's token provider for ``sasl_mechanism = "OAUTHBEARER"``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self._url = settings.sasl_oauthbearer_token_endpoint_url
        self._client_id = settings.sasl_oauthbearer_client_id
        self._secret = settings.sasl_oauthbearer_client_secret
        self._scope = settings.sasl_oauthbearer_scope
        self._lock = threading.Lock()
        self._token = ""
        self._renew_at = 0.0

    def token(self) -> str:
        with self._lock:
            if not self._token or time.monotonic() >= self._renew_at:
                self._token, lifetime_s = self._fetch()
                self._renew_at = time.monotonic() + max(1.0, lifetime_s - RENEW_BEFORE_S)
            return self._token

    def extensions(self) -> dict[str, str]:
        return {}

    def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials"} | (
            {"scope": self._scope} if self._scope else {}
        )
        basic = base64.b64encode(f"{self._client_id}:{self._secret}".encode()).decode()
        request = urllib.request.Request(
            self._url,
            data=urllib.parse.urlencode(form).encode(),
            headers={
                "Authorization": f"Basic {basic}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body: Any = orjson.loads(response.read())
        except (OSError, orjson.JSONDecodeError) as error:
            # No secret in the message: the URL and the client id only.
            raise BrokerError(
                f"no OAUTHBEARER token from {self._url} for client {self._client_id!r}: {error}"
            ) from None
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            raise BrokerError(f"the token endpoint {self._url} answered without an access_token")
        return body["access_token"], float(body.get("expires_in", 300))
