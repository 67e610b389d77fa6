"""Refusals recognised in the words each client really uses (taken from their logs and errors
against the secured test broker), and told with the setting or ACL to fix."""

from __future__ import annotations

import pytest

from stream_fm.config import build_settings
from stream_fm.kafka.refusal import Noticed, classify

SETTINGS = build_settings(
    {
        "group_id": "g1",
        "input_topics": ("in-1",),
        "predictions_topic": "pred-1",
        "sasl_username": "ann",
        "transactional_id": "tx-1",
    }
)

SAID = [
    # kafka-python
    ("Connection failed: SaslAuthenticationFailedError: SaslAuthenticationFailedError: "
     "Authentication failed during authentication due to invalid credentials with SASL "
     "mechanism SCRAM-SHA-512", "authentication", "sasl_username='ann'"),
    ("KafkaConnectionError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
     "unable to get local issuer certificate (_ssl.c:1006)", "certificate", "not signed by a CA"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, "
     "certificate is not valid for '127.0.0.1'. (_ssl.c:1006)", "certificate", "not issued for"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: Hostname mismatch, "
     "certificate is not valid for 'localhost'", "certificate", "not issued for"),
    ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired",
     "certificate", "has expired"),
    ("KafkaConnectionError: [SSL: SSLV3_ALERT_CERTIFICATE_UNKNOWN] sslv3 alert certificate "
     "unknown (_ssl.c:2580)", "certificate", "refused the client certificate"),
    ("[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required",
     "certificate", "refused the client certificate"),
    ("poll failed: [Error 30] GroupAuthorizationFailedError: g1", "authorization",
     "ACL GROUP g1 READ"),
    ("Topic in-1 is not authorized for this client", "authorization", "ACL TOPIC in-1 READ"),
    ("[Error 53] TransactionalIdAuthorizationFailedError", "authorization",
     "TRANSACTIONAL_ID tx-1 WRITE"),
    # librdkafka
    ("_AUTHENTICATION: sasl_ssl://127.0.0.1:42449/bootstrap: SASL authentication error: "
     "Authentication failed during authentication due to invalid credentials with SASL "
     "mechanism SCRAM-SHA-512 (after 317ms in state AUTH_REQ)", "authentication", "ann"),
    ("cannot publish to pred-1: TOPIC_AUTHORIZATION_FAILED: Unable to produce message: "
     "Broker: Topic authorization failed", "authorization", "ACL TOPIC pred-1 WRITE"),
    ("CLUSTER_AUTHORIZATION_FAILED: Failed to acquire idempotence PID from broker: Broker: "
     "Cluster authorization failed", "authorization", "TOPIC pred-1 WRITE"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "cause", "names"), SAID)
def test_each_refusal_is_named_with_what_to_fix(text: str, cause: str, names: str) -> None:
    refusal = classify(text, SETTINGS)
    assert refusal is not None and refusal.cause == cause
    assert names in str(refusal) and str(refusal).startswith(f"refused by the cluster ({cause})")


@pytest.mark.parametrize(
    "text",
    [
        "KafkaConnectionError: socket disconnected",
        "_TRANSPORT: Failed to get metadata: Local: Broker transport failure",
        "_ALL_BROKERS_DOWN: 1/1 brokers are down",
        "KafkaTimeoutError: Unable to bootstrap from ['127.0.0.1:9092']",
    ],
)
def test_a_network_fault_is_no_refusal(text: str) -> None:
    assert classify(text, SETTINGS) is None


def test_a_later_network_fault_does_not_hide_a_noticed_refusal() -> None:
    noticed = Noticed()
    noticed.note("_AUTHENTICATION: SASL authentication error: invalid credentials")
    noticed.note("KafkaConnectionError: socket disconnected")
    refusal = noticed.recent(SETTINGS)
    assert refusal is not None and refusal.cause == "authentication"
    noticed.clear()
    assert noticed.recent(SETTINGS) is None
