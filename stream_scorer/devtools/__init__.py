"""Development tools, not used by the worker: a local Kafka broker, the benchmark and the soak."""
