"""Apache Kafka secured the way managed clusters run it, for the tests and ``demo --secure``.

Listeners on 127.0.0.1, each on its own free port:

- ``SASL_SSL``: SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN over TLS;
- ``SSL``: mutual TLS, a client certificate required (its CN is the principal);
- ``SASL_PLAINTEXT``: the same mechanisms without TLS;
- ``PLAINTEXT``: the operator's listener (``bootstrap_servers``), a super user, which the
  test harness and the demo use to create topics, grant ACLs and read outputs.

The StandardAuthorizer denies whatever no ACL allows (``allow.everyone.if.no.acl.found`` is
false). The CA is made at start (``tls``); SCRAM users are created through the admin API.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stream_fm.kafka.acls import AclNeed
from stream_fm.tools.broker.launcher import KafkaBroker
from stream_fm.tools.broker.tls import CertificateAuthority, Issued

SECURE_PROTOCOLS = ("SASL_SSL", "SSL", "SASL_PLAINTEXT")
MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN")
_PORTS = {"SASL_SSL": "sasl ssl port", "SSL": "ssl port", "SASL_PLAINTEXT": "sasl plaintext port"}


class SecuredBroker(KafkaBroker):
    """``with SecuredBroker(users=["worker"]) as kb: kb.client_settings("SASL_SSL", ...)``.

    Every user in ``users`` gets a random password (``password(user)``), SCRAM credentials for
    both SCRAM mechanisms, a PLAIN entry and a client certificate (``client_cert(user)``, its
    key encrypted with the same password). Users have no ACLs until ``grant``.
    """

    def __init__(
        self, users: Iterable[str] = ("worker",), expired_cert: bool = False, **kwargs: Any
    ) -> None:
        """``expired_cert``: the broker serves a certificate that has expired (a refusal test)."""
        super().__init__(**kwargs)
        self.expired_cert = expired_cert
        self.sasl_ssl_port = self.ssl_port = self.sasl_plaintext_port = 0
        self._passwords = {u: secrets.token_urlsafe(18) for u in users}
        self._ca: CertificateAuthority | None = None
        self._broker_tls: Path | None = None
        self._clients: dict[str, Issued] = {}

    # -- what a client needs ----------------------------------------------------------------

    def listener(self, protocol: str) -> str:
        return f"{self.host}:{getattr(self, _PORTS[protocol].replace(' ', '_'))}"

    @property
    def ca_file(self) -> Path:
        assert self._ca is not None, "the broker has not been started yet"
        return self._ca.cert_path

    @property
    def ca(self) -> CertificateAuthority:
        assert self._ca is not None, "the broker has not been started yet"
        return self._ca

    def password(self, user: str) -> str:
        return self._passwords[user]

    def client_cert(self, user: str) -> Issued:
        return self._clients[user]

    def client_settings(
        self, protocol: str, mechanism: str = "", user: str = "worker"
    ) -> dict[str, Any]:
        """The worker settings that connect as ``user`` through ``protocol`` (secrets inline:
        a test writes them to files where it tests files)."""
        out: dict[str, Any] = {
            "bootstrap_servers": self.listener(protocol),
            "security_protocol": protocol,
        }
        if protocol.startswith("SASL"):
            out |= {
                "sasl_mechanism": mechanism,
                "sasl_username": user,
                "sasl_password": self.password(user),
            }
        if protocol.endswith("SSL"):
            out["ssl_cafile"] = str(self.ca_file)
        if protocol == "SSL":
            cert = self.client_cert(user)
            out |= {
                "ssl_certfile": str(cert.cert),
                "ssl_keyfile": str(cert.key),
                "ssl_key_password": cert.key_password,
            }
        return out

    # -- ACLs and users -----------------------------------------------------------------------

    def grant(self, user: str, needs: Iterable[AclNeed]) -> None:
        with self.admin() as admin:
            admin.grant(f"User:{user}", needs)

    def revoke(self, user: str, need: AclNeed) -> None:
        with self.admin() as admin:
            admin.revoke(f"User:{user}", need)

    def set_password(self, user: str, password: str) -> None:
        """Rotate ``user``'s SCRAM password (both mechanisms) while the broker runs."""
        with self.admin() as admin:
            for mechanism in MECHANISMS[:2]:
                admin.set_scram_password(user, mechanism, password)
        self._passwords[user] = password

    # -- KafkaBroker hooks ----------------------------------------------------------------------

    def start(self) -> None:
        first = not self.is_running() and self._ca is None
        super().start()
        if first:
            with self.admin() as admin:
                for user, password in self._passwords.items():
                    for mechanism in MECHANISMS[:2]:
                        admin.set_scram_password(user, mechanism, password)

    def _named_ports(self) -> dict[str, int]:
        ports = super()._named_ports()
        for name in _PORTS.values():
            ports[name] = getattr(self, name.replace(" ", "_"))
        return ports

    def _write_config(self) -> None:
        if self._ca is None:
            assert self.data_dir is not None
            self._ca = CertificateAuthority.create(self.data_dir / "tls")
            # Its address only: a client that dials "localhost" meets a host name mismatch.
            server = self._ca.issue("broker", hosts=(self.host,), expired=self.expired_cert)
            self._broker_tls = self._ca.keystore(server)
            self._clients = {
                u: self._ca.issue(u, key_password=p) for u, p in self._passwords.items()
            }
        super()._write_config()

    def _properties(self) -> dict[str, str]:
        props = super()._properties()
        h = self.host
        listeners = {"PLAINTEXT": self.port, **{p: self._port_of(p) for p in SECURE_PROTOCOLS}}
        props["listeners"] = ",".join(
            [f"{name}://{h}:{port}" for name, port in listeners.items()]
            + [f"CONTROLLER://{h}:{self.controller_port}"]
        )
        props["advertised.listeners"] = ",".join(
            f"{name}://{h}:{port}" for name, port in listeners.items()
        )
        props["listener.security.protocol.map"] = ",".join(
            f"{n}:{n}" for n in (*listeners, "CONTROLLER")
        ).replace("CONTROLLER:CONTROLLER", "CONTROLLER:PLAINTEXT")
        props |= self._auth_properties()
        return props

    def _port_of(self, protocol: str) -> int:
        return int(getattr(self, _PORTS[protocol].replace(" ", "_")))

    def _auth_properties(self) -> Mapping[str, str]:
        assert self._ca is not None and self._broker_tls is not None
        plain_users = " ".join(f'user_{u}="{p}"' for u, p in self._passwords.items())
        props = {
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "allow.everyone.if.no.acl.found": "false",
            # The operator's PLAINTEXT listener and the controller connect as ANONYMOUS.
            "super.users": "User:ANONYMOUS",
            "sasl.enabled.mechanisms": ",".join(MECHANISMS),
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": str(self._broker_tls),
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": str(self._ca.cert_path),
            "listener.name.ssl.ssl.client.auth": "required",
            # A client certificate's CN is its principal: CN=worker -> User:worker.
            "ssl.principal.mapping.rules": "RULE:^.*CN=([^,]+).*$/$1/,DEFAULT",
        }
        for listener in ("sasl_ssl", "sasl_plaintext"):
            prefix = f"listener.name.{listener}"
            props[f"{prefix}.plain.sasl.jaas.config"] = (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {plain_users};"
            )
            for mechanism in MECHANISMS[:2]:
                props[f"{prefix}.{mechanism.lower()}.sasl.jaas.config"] = (
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )
        return props
