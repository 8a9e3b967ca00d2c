"""stream-scorer: score Avro event streams from Kafka with XGBoost models."""

from importlib.metadata import PackageNotFoundError, version

try:
    #: The package version; its one source is ``version`` in pyproject.toml (installed metadata).
    __version__ = version("stream-scorer")
except PackageNotFoundError:  # a checkout on sys.path that was never installed
    __version__ = "0+unknown"
