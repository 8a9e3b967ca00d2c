"""stream-scorer: score Avro event streams from Kafka with XGBoost models."""

__version__ = "0.1.0"
