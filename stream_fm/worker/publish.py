"""A batch's outputs handed to the producer: predictions, dead letters that fit, labels."""

from __future__ import annotations

from collections.abc import Sequence

from stream_fm.config import Settings
from stream_fm.kafka import KafkaIO, Record
from stream_fm.outputs import dead_letter, label_json, prediction_records
from stream_fm.pipeline import BatchResult


def publish(
    io: KafkaIO, settings: Settings, result: BatchResult, records: Sequence[Record], wait: bool
) -> None:
    """Send the batch's records; raise ProduceError if one was refused already.

    With ``wait`` every acknowledgement is awaited before returning (recovering from a
    failure). Otherwise they are awaited only before a checkpoint, the one place offsets
    become durable: the loop never waits a round trip per poll, and a refusal seen meanwhile
    rolls back at once rather than at the next checkpoint.
    """
    keys, values = prediction_records(result.served)
    io.send_keyed(settings.predictions_topic, keys, values)
    limit = io.record_limit_bytes(settings.dead_letter_topic)
    for rejected in result.invalid:
        record = records[rejected.position]
        key, value, headers = dead_letter(
            record.key,
            record.value,
            rejected.reason,
            rejected.detail,
            record.topic,
            record.partition,
            record.offset,
            limit_bytes=limit,
        )
        io.send(settings.dead_letter_topic, key, value, headers)
    if settings.labels_topic:
        learned = result.learned
        io.send_keyed(
            settings.labels_topic,
            [x.id.encode() for x in learned],
            [label_json(x) for x in learned],
        )
    if wait:
        io.flush()
    else:
        io.check()
