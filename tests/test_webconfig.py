"""metrics_web_config: the exporter-toolkit file puts /metrics, /healthz and /readyz behind TLS
and /metrics behind basic auth; a bad file stops the worker at start-up naming the setting."""

from __future__ import annotations

import base64
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from stream_fm.errors import ConfigError
from stream_fm.metrics import MetricsServer
from stream_fm.tools.broker.tls import CertificateAuthority
from stream_fm.webconfig import load_web_config


def _write(tmp_path: Path, document: object) -> str:
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(document))
    return str(path)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path, "ca")


def _get(url: str, context: ssl.SSLContext, auth: str | None = None) -> tuple[int, bytes]:
    headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5,
                                    context=context) as response:  # fmt: skip
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


def test_tls_and_basic_auth_guard_metrics_and_leave_the_probes_open(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    server_cert = ca.issue("metrics", hosts=("127.0.0.1",))
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$")
    path = _write(
        tmp_path,
        {
            "tls_server_config": {"cert_file": "metrics.pem", "key_file": str(server_cert.key)},
            "basic_auth_users": {"prom": hashed},
        },
    )
    registry = CollectorRegistry()
    Counter("stream_fm_test", "a counter", registry=registry).inc()
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    with MetricsServer(registry, web=load_web_config(path)) as server:
        assert server.url.startswith("https://")
        assert _get(f"{server.url}/metrics", context)[0] == 401
        assert _get(f"{server.url}/metrics", context, "prom:wrong")[0] == 401
        assert _get(f"{server.url}/metrics", context, "other:s3cret")[0] == 401
        status, body = _get(f"{server.url}/metrics", context, "prom:s3cret")
        assert status == 200 and b"stream_fm_test_total 1.0" in body
        assert _get(f"{server.url}/metrics", context, "prom:s3cret")[0] == 200  # cached check
        assert _get(f"{server.url}/healthz", context) == (200, b"ok\n")
        assert _get(f"{server.url}/readyz", context)[0] == 200


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"tls_server_config": {"cert_file": "x.pem"}}, "needs cert_file and key_file"),
        ({"tls_server_config": {"cert_file": "a", "key_file": "b", "cipher": "x"}}, "unknown key"),
        ({"basic_auth_users": {"prom": "plaintext"}}, "must be a bcrypt hash"),
        ({"web": 1}, "unknown key 'web'"),
        ({"tls_server_config": {"cert_file": "nope.pem", "key_file": "nope.key"}}, "cannot load"),
    ],
)
def test_a_bad_web_config_names_the_setting(tmp_path: Path, document: object, problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"^metrics_web_config: .*{problem}"):
        load_web_config(_write(tmp_path, document))
