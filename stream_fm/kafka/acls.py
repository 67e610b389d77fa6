"""The Kafka ACLs a worker needs, derived from its settings: one list that docs/operations.md
shows, the secured tests grant (nothing more) and a refusal names.

>>> from stream_fm.config import build_settings
>>> for need in required_acls(build_settings({}))[:3]:
...     print(need)
TOPIC ad-events READ
GROUP stream-fm READ
TOPIC ad-predictions WRITE
"""

from __future__ import annotations

from dataclasses import dataclass

from stream_fm.config import Settings


@dataclass(frozen=True, slots=True)
class AclNeed:
    """One ALLOW ACL on a literal resource: ``resource`` is TOPIC, GROUP or TRANSACTIONAL_ID.
    ``optional`` needs have a fallback the worker names once when it uses it."""

    resource: str
    name: str
    operation: str
    why: str
    optional: bool = False

    def __str__(self) -> str:
        return f"{self.resource} {self.name} {self.operation}"


def required_acls(settings: Settings) -> list[AclNeed]:
    """Every ACL the worker's principal needs (Kafka's READ and WRITE imply DESCRIBE)."""
    needs = [AclNeed("TOPIC", t, "READ", "consume the input") for t in settings.input_topics]
    needs.append(AclNeed("GROUP", settings.group_id, "READ", "join the group, commit offsets"))
    outputs = [settings.predictions_topic, settings.dead_letter_topic, settings.labels_topic]
    needs += [AclNeed("TOPIC", t, "WRITE", "publish") for t in outputs if t]
    needs += [
        AclNeed(
            "TOPIC", t, "DESCRIBE_CONFIGS",
            "read max.message.bytes (else the producer's own bound is used)", optional=True,
        )
        for t in outputs
        if t
    ]  # fmt: skip
    if settings.transactional_id:
        needs.append(
            AclNeed("TRANSACTIONAL_ID", settings.transactional_id, "WRITE", "transactions")
        )
    if settings.model_updates_topic:
        topic = settings.model_updates_topic
        needs += [
            AclNeed("TOPIC", topic, "READ", "read the peers' model updates"),
            AclNeed("TOPIC", topic, "WRITE", "publish model updates"),
            AclNeed(
                "TOPIC", topic, "CREATE", "create the topic at start-up (else it must exist)",
                optional=True,
            ),
        ]  # fmt: skip
    return needs
