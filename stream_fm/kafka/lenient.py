"""Records with header keys that are not UTF-8, readable by kafka-python (applied on import).

Kafka and other clients (librdkafka, kcat) allow any bytes in a header key; kafka-python
decodes them as UTF-8 and, when that fails, raises for the whole partition at every poll:
one such record would stall its partition for good. Every kafka-python consumer of this
package imports this module, which re-reads such a record with the key's undecodable bytes
kept as surrogates (and given back unchanged on encode).
"""

from __future__ import annotations

from typing import Any

from kafka.record.default_records import DefaultRecordBatch


class _LenientStr(str):
    """A header key with its undecodable bytes kept as surrogates, and given back on encode."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return super().encode(encoding, "surrogateescape")


class _LenientBytes(bytes):
    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return _LenientStr(super().decode(encoding, "surrogateescape"))


class _LenientBuffer(bytearray):
    """A record batch's buffer whose slices decode leniently (header keys)."""

    def __getitem__(self, index: Any) -> Any:
        item = super().__getitem__(index)
        return _LenientBytes(item) if isinstance(index, slice) else item


def _read_msg_tolerating_header_keys(batch: Any, *args: Any, **kwargs: Any) -> Any:
    """kafka-python decodes header keys as UTF-8 and gives up on the whole partition when one
    is not (Kafka and other clients allow any bytes): one such record would stall its
    partition for good. Read that record again with the keys decoded leniently; the worker
    never reads input headers, so the event itself is processed as any other."""
    try:
        return _read_msg(batch, *args, **kwargs)
    except UnicodeDecodeError:
        batch._buffer = _LenientBuffer(batch._buffer)  # the record is re-read from its start
        return _read_msg(batch, *args, **kwargs)


_read_msg = DefaultRecordBatch._read_msg
DefaultRecordBatch._read_msg = _read_msg_tolerating_header_keys
