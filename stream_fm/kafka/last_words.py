"""A connection's last words reach kafka-python (applied on import).

kafka-python 3.0 reads a socket until it would block; when the broker's close comes in the
same read as its last response, it aborts with "socket disconnected" and drops that response.
The broker answers a refused login and then closes (after ``connection.failed.authentication
.delay.ms``, 100 ms by default): on a busy machine both arrive together and the refusal's
reason — "invalid credentials" — is lost, so a wrong password looks like a network fault in
one run and is named in the next. This hands the data to the protocol and lets whoever awaited
it run before the abort.
"""

from __future__ import annotations

import time
from typing import Any

from kafka import errors as kafka_errors
from kafka.net.transport import KafkaTCPTransport


async def _read_from_sock_delivering_last_words(self: Any) -> Any:
    while self._read and not self._closed:
        await self._net.wait_read(self._sock)
        received, error = self._sock_recv()
        if received:
            self.last_read = time.monotonic()
            if self._protocol and self._protocol._sensors:
                self._protocol._sensors.bytes_received.record(len(received))
            try:
                self._protocol.data_received(received)
            except kafka_errors.KafkaProtocolError as protocol_error:
                return self.abort(error=protocol_error)
        if error:
            # Let the coroutines that awaited the last response run first: a refused login
            # then fails with its reason, not with the close that followed it.
            await self._net.sleep(0)
            return None if self._closed else self.abort(error=error)
    return None


KafkaTCPTransport._read_from_sock = _read_from_sock_delivering_last_words
