"""``python -m stream_fm.tools.broker``: run a local Apache Kafka broker until Ctrl-C, or only
fetch its jars (``--fetch-only``, what ``make test`` does)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from stream_fm.errors import BrokerStartError
from stream_fm.tools.broker.jars import classpath_version, kafka_classpath
from stream_fm.tools.broker.launcher import KafkaBroker


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m stream_fm.tools.broker",
        description="Run a local Apache Kafka broker (KRaft) until Ctrl-C.",
    )
    parser.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    parser.add_argument("--data-dir", type=Path, help="keep the data here (default: temporary)")
    parser.add_argument(
        "--fetch-only", action="store_true", help="only fetch the jars into the cache and exit"
    )
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from a supervisor) takes the same orderly path as Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.fetch_only:
            started = time.monotonic()
            classpath = kafka_classpath()
            print(
                f"Apache Kafka {classpath_version(classpath)}: {classpath} "
                f"({time.monotonic() - started:.1f}s)"
            )
            return 0
        with KafkaBroker(data_dir=args.data_dir, port=args.port) as broker:
            print(broker.bootstrap_servers, flush=True)
            print(
                f"Apache Kafka {broker.kafka_version}; log: {broker.log_path}; Ctrl-C stops it",
                file=sys.stderr,
            )
            while broker.is_running():
                time.sleep(0.5)
            print(f"the broker exited:\n{broker.log_tail(20)}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except BrokerStartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(_main())
