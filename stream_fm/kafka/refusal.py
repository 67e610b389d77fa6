"""Refusals by the cluster — authentication, TLS, ACLs — recognised in either client's words
and told in one line that names the cause and the setting or ACL to fix.

The clients report a refusal in different places: an exception (``BrokerError`` text), a log
record (kafka-python retries a failed login in the background and only logs it) or librdkafka's
error callback. ``note`` collects the last two; ``classify`` reads any of them.

>>> from stream_fm.config import build_settings
>>> s = build_settings({"group_id": "g1", "sasl_username": "ann"})
>>> print(classify("poll failed: [Error 30] GroupAuthorizationFailedError: g1", s))
refused by the cluster (authorization): the principal lacks the ACL GROUP g1 READ
>>> classify("poll failed: KafkaConnectionError: socket disconnected", s) is None
True
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable

from stream_fm.config import Settings
from stream_fm.errors import ClusterRefused

#: How long a noted refusal stays news (the clients repeat a lasting one well within it).
RECENT_S = 30.0


def _secret_hint(settings: Settings, name: str) -> str:
    return f"{name}_file" if getattr(settings, f"{name}_file") else name


def _authentication(settings: Settings, _text: str) -> str:
    return (
        f"{settings.sasl_mechanism or 'SASL'} login of sasl_username={settings.sasl_username!r} "
        f"refused: unknown user or wrong password (check {_secret_hint(settings, 'sasl_password')})"
    )


def _topics(settings: Settings, text: str) -> str:
    named = [t for t in (*settings.input_topics, *settings.output_topics) if t in text]
    if settings.model_updates_topic and settings.model_updates_topic in text:
        named.append(settings.model_updates_topic)
    needs = [
        f"TOPIC {t} {'READ' if t in settings.input_topics else 'WRITE'}"
        for t in (named or [*settings.input_topics, *settings.output_topics])
    ]
    return "the principal lacks the ACL " + " / ".join(needs)


# (cause, pattern, explanation): first match wins, so the specific come before the general.
_RULES: list[tuple[str, re.Pattern[str], Callable[[Settings, str], str]]] = [
    (
        "authentication",
        re.compile(
            r"SaslAuthenticationFailed|SASL authentication error|invalid credentials"
            r"|Authentication failed|_AUTHENTICATION|SASL_AUTHENTICATION_FAILED",
            re.I,
        ),
        _authentication,
    ),
    (
        "certificate",
        re.compile(r"alert certificate expired|alert_certificate_expired", re.I),
        lambda s, _: f"the broker refused the client certificate {s.ssl_certfile}: it has expired",
    ),
    (
        "certificate",
        re.compile(
            r"alert[ _](unknown[ _]ca|bad[ _]certificate|certificate[ _]required"
            r"|handshake[ _]failure|certificate[ _]unknown)",
            re.I,
        ),
        lambda s, _: (
            f"the broker refused the client certificate (ssl_certfile="
            f"{s.ssl_certfile or 'none'}): missing, expired or not signed by a CA it trusts"
        ),
    ),
    (
        "certificate",
        re.compile(r"verify failed.*expired|certificate has expired", re.I | re.S),
        lambda s, _: "the broker's certificate has expired (or the clock is wrong)",
    ),
    (
        "certificate",
        re.compile(
            r"hostname mismatch|IP address mismatch|not valid for|hostname verification"
            r"|does not match|doesn't match",
            re.I,
        ),
        lambda s, _: (
            f"the broker's certificate is not issued for the host in bootstrap_servers="
            f"{s.bootstrap_servers} (ssl_insecure_skip_hostname_check turns the check off)"
        ),
    ),
    (
        "certificate",
        re.compile(
            r"certificate verify failed|unable to get local issuer|self.signed"
            r"|could not be verified",
            re.I,
        ),
        lambda s, _: (
            f"the broker's certificate is not signed by a CA in ssl_cafile="
            f"{s.ssl_cafile or '(the system CAs)'}"
        ),
    ),
    (
        "authorization",
        re.compile(r"GroupAuthorization|GROUP_AUTHORIZATION", re.I),
        lambda s, _: f"the principal lacks the ACL GROUP {s.group_id} READ",
    ),
    (
        "authorization",
        re.compile(r"TransactionalIdAuthorization|TRANSACTIONAL_ID_AUTHORIZATION", re.I),
        lambda s, _: f"the principal lacks the ACL TRANSACTIONAL_ID {s.transactional_id} WRITE",
    ),
    (
        "authorization",
        re.compile(r"TopicAuthorization|TOPIC_AUTHORIZATION|not authorized for this client", re.I),
        _topics,
    ),
    (
        "authorization",
        re.compile(r"ClusterAuthorization|CLUSTER_AUTHORIZATION", re.I),
        lambda s, _: (
            f"the principal may write to no topic (idempotent producer): it lacks the ACL "
            f"TOPIC {s.predictions_topic} WRITE"
        ),
    ),
]


def classify(text: str, settings: Settings) -> ClusterRefused | None:
    """The refusal ``text`` (an error message or a client's log line) reports, if any."""
    for cause, pattern, explain in _RULES:
        if pattern.search(text):
            return ClusterRefused(cause, explain(settings, text))
    return None


class Noticed:
    """The client's latest refusal-looking message outside exceptions (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._text = ""
        self._at = 0.0

    def note(self, text: str) -> None:
        """Keep ``text`` if it reads like a refusal (others never hide an earlier one)."""
        if not _LOOKS_REFUSED.search(text):
            return
        with self._lock:
            self._text, self._at = text, time.monotonic()

    def recent(self, settings: Settings, within_s: float = RECENT_S) -> ClusterRefused | None:
        with self._lock:
            text, at = self._text, self._at
        if not text or time.monotonic() - at > within_s:
            return None
        return classify(text, settings)

    def clear(self) -> None:
        with self._lock:
            self._text = ""


#: One per process: both clients log through process-wide channels.
NOTICED = Noticed()


class _Sniffer(logging.Handler):
    """Keeps kafka-python's warnings and errors that look like a refusal."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING:
            return
        try:
            text = record.getMessage()
        except Exception:  # a client's malformed log call must not break ours
            return
        NOTICED.note(text)


_LOOKS_REFUSED = re.compile("|".join(f"(?:{p.pattern})" for _, p, _ in _RULES), re.I | re.S)


def diagnose(settings: Settings, timeout_s: float = 10.0) -> ClusterRefused | None:
    """Ask the cluster as this worker what it refuses it: login, the input topics, the group.
    For a failure no client explained (librdkafka only times out when the group is not
    allowed); kafka-python names each refusal in its errors."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka import errors as kafka_errors

    from stream_fm.kafka.settings import security_config

    consumer = None
    try:
        consumer = KafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers.split(","),
            group_id=settings.group_id,
            enable_auto_commit=False,
            request_timeout_ms=int(timeout_s * 1000),
            **security_config(settings),
        )
        for topic in settings.input_topics:
            partitions = consumer.partitions_for_topic(topic) or {0}
            consumer.committed(TopicPartition(topic, min(partitions)))
    except kafka_errors.KafkaError as error:
        return classify(f"{type(error).__name__}: {error}", settings) or NOTICED.recent(settings)
    finally:
        if consumer is not None:
            consumer.close()
    return NOTICED.recent(settings)


def sniff_kafka_python() -> None:
    """Install the sniffer on kafka-python's logger (once)."""
    logger = logging.getLogger("kafka")
    if not any(isinstance(h, _Sniffer) for h in logger.handlers):
        logger.addHandler(_Sniffer())
    if logger.getEffectiveLevel() > logging.WARNING:  # else the sniffer would see nothing
        logger.setLevel(logging.WARNING)
