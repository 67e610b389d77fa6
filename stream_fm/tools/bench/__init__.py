"""The benchmarks: ``model`` (stream-fm against river and Vowpal Wabbit on the same streams)
and ``kafka`` (the worker against the bare Kafka clients on a real broker)."""
