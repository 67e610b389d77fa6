"""The Prometheus exporter-toolkit web configuration file: TLS for /metrics, /healthz and
/readyz, and basic auth on /metrics (``metrics_web_config``).

The format is the one every Prometheus exporter reads (``--web.config.file``)::

    tls_server_config:
      cert_file: /etc/stream-fm/tls.crt
      key_file: /etc/stream-fm/tls.key
      client_auth_type: NoClientCert        # or RequireAndVerifyClientCert + client_ca_file
    basic_auth_users:
      prometheus: $2y$10$...                # bcrypt hash (htpasswd -nBC 10 "" | tr -d ':')

Basic auth guards /metrics only: the kubelet's probes carry no credentials, so /healthz and
/readyz answer without them (over TLS when it is on). A key or setting this file does not
know fails at start-up naming ``metrics_web_config``, as the exporter-toolkit does.

>>> check_basic_auth({}, None)
True
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stream_fm.errors import ConfigError

SETTING = "metrics_web_config"
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}
_CLIENT_AUTH = {"NoClientCert", "RequireAndVerifyClientCert"}
_MIN_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}


def _fail(problem: str) -> ConfigError:
    return ConfigError(SETTING, problem)


@dataclass(frozen=True)
class WebConfig:
    """What the file says: a server TLS context (or None) and user -> bcrypt hash."""

    tls: ssl.SSLContext | None
    users: dict[str, bytes] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.tls is not None else "http"


def load_web_config(path: str) -> WebConfig:
    """Read and check the file; every problem is a ``ConfigError`` naming the setting."""
    try:
        import yaml
    except ImportError:  # pragma: no cover - a base dependency
        raise _fail("reading it needs PyYAML: pip install pyyaml") from None
    try:
        document = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise _fail(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise _fail(f"{path} is not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise _fail(f"{path} must be a mapping")
    unknown = set(document) - {"tls_server_config", "basic_auth_users", "http_server_config"}
    if unknown:
        raise _fail(f"{path}: unknown key {sorted(unknown)[0]!r}")
    base = Path(path).parent
    tls = _tls(document.get("tls_server_config"), base, path)
    users = _users(document.get("basic_auth_users"), path)
    return WebConfig(tls, users)


def _tls(section: Any, base: Path, path: str) -> ssl.SSLContext | None:
    if section is None:
        return None
    if not isinstance(section, dict) or set(section) - _TLS_KEYS:
        extra = sorted(set(section) - _TLS_KEYS)[0] if isinstance(section, dict) else "?"
        raise _fail(f"{path}: tls_server_config: unknown key {extra!r}")
    if not section.get("cert_file") or not section.get("key_file"):
        raise _fail(f"{path}: tls_server_config needs cert_file and key_file")
    version = _MIN_VERSIONS.get(str(section.get("min_version", "TLS12")))
    if version is None:
        raise _fail(f"{path}: tls_server_config: min_version must be TLS12 or TLS13")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = version
    cert, key = (base / section["cert_file"], base / section["key_file"])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise _fail(f"{path}: cannot load {cert} with {key}: {error}") from None
    auth = str(section.get("client_auth_type", "NoClientCert"))
    if auth not in _CLIENT_AUTH:
        raise _fail(f"{path}: client_auth_type must be one of {', '.join(sorted(_CLIENT_AUTH))}")
    if auth == "RequireAndVerifyClientCert":
        if not section.get("client_ca_file"):
            raise _fail(f"{path}: RequireAndVerifyClientCert needs client_ca_file")
        try:
            context.load_verify_locations(base / section["client_ca_file"])
        except (OSError, ssl.SSLError) as error:
            raise _fail(f"{path}: cannot load client_ca_file: {error}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _users(section: Any, path: str) -> dict[str, bytes]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise _fail(f"{path}: basic_auth_users must map user names to bcrypt hashes")
    users = {}
    for user, hashed in section.items():
        text = str(hashed)
        if not text.startswith(("$2a$", "$2b$", "$2y$")):
            raise _fail(f"{path}: the password of {user!r} must be a bcrypt hash")
        users[str(user)] = text.encode()
    return users


_VERIFIED: set[bytes] = set()  # digests of credentials bcrypt accepted (it is slow on purpose)
_VERIFIED_LOCK = threading.Lock()


def check_basic_auth(users: dict[str, bytes], header: str | None) -> bool:
    """Whether an ``Authorization`` header is good for ``users`` (no users: anyone)."""
    if not users:
        return True
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    hashed = users.get(user)
    if hashed is None:
        return False
    digest = hashlib.sha256(hashed + b"\0" + password.encode()).digest()
    with _VERIFIED_LOCK:
        if digest in _VERIFIED:
            return True
    import bcrypt

    if not bcrypt.checkpw(password.encode(), hashed.replace(b"$2y$", b"$2b$", 1)):
        return False
    with _VERIFIED_LOCK:
        _VERIFIED.add(digest)
    return True
