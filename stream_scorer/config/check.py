"""librdkafka's own checks of the settings, at start-up, before anything connects."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from stream_scorer.config.kafka import client_settings, consumer_settings, producer_settings
from stream_scorer.config.keys import LOGGABLE_KEYS
from stream_scorer.config.sections import Config
from stream_scorer.errors import ConfigError

#: A librdkafka property named in one of its messages (``"sasl.passwd"``, ssl.ca.location).
_PROPERTY = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+")
_CREATE_PREFIX = re.compile(r"^Failed to create [a-z ]+: ")


def check_clients(cfg: Config, worker_id: str) -> None:
    """Have librdkafka check the settings of every client the worker builds, without connecting.

    The consumer, the producer (transactional in exactly-once mode) and the admin client of the
    start-up checks are built from exactly the settings the worker uses, without
    ``bootstrap.servers`` (so that nothing connects), and closed: librdkafka refuses an unknown
    key, a value it cannot parse or out of range, an unsupported SASL mechanism, a missing SASL
    user or password, or a TLS file it cannot read.

    Raises:
        ConfigError: librdkafka refused a setting; names the configuration key (the table it
            came from: ``kafka.client``, ``kafka.consumer``, ``kafka.producer`` or
            ``kafka.secret_files``) and never the value of a key outside ``LOGGABLE_KEYS``.
    """
    from confluent_kafka import Consumer, KafkaException, Producer
    from confluent_kafka.admin import AdminClient

    clients: tuple[tuple[str, Any, dict[str, str]], ...] = (
        ("consumer", Consumer, consumer_settings(cfg, worker_id)),
        ("producer", Producer, producer_settings(cfg, worker_id)),
        ("client", AdminClient, client_settings(cfg)),
    )
    for role, make, settings in clients:
        try:
            _build_unconnected(make, settings)
        except KafkaException as exc:
            raise _refused(cfg, role, make, settings, exc) from None


def _build_unconnected(make: Any, settings: Mapping[str, str]) -> None:
    """Build a client from ``settings`` without its brokers (it never connects), then close it."""
    unconnected = {k: v for k, v in settings.items() if k != "bootstrap.servers"}
    client = make({**unconnected, "log_level": "0"})  # its lines come again at the real start
    if hasattr(client, "close"):
        client.close()


def _refused(
    cfg: Config, role: str, make: Any, settings: Mapping[str, str], exc: Exception
) -> ConfigError:
    """The ConfigError for librdkafka's refusal ``exc`` of the ``role`` client's ``settings``."""
    err = exc.args[0] if exc.args else exc
    text = err.str() if hasattr(err, "str") else str(err)
    reason = _CREATE_PREFIX.sub("", text.strip())
    for name, value in settings.items():  # librdkafka may quote a value it refuses
        if name not in LOGGABLE_KEYS and value:
            reason = re.sub(_token(value), "***", reason)
    tables = _user_tables(cfg, role)
    key = _culprit(text, [k for t in tables.values() for k in t], settings, make)
    if key is not None:
        table = next(name for name, t in tables.items() if key in t)
        field = f"{table}.{key}"
    else:  # a key it needs and nobody set, or one of stream-scorer's own
        named = _PROPERTY.findall(text)
        field = f"kafka.client.{named[0]}" if named else f"kafka.{role}"
    client = {"client": "admin client", "consumer": "consumer", "producer": "producer"}[role]
    return ConfigError(field, f"librdkafka refuses the {client}'s settings: {reason}")


def _token(value: str) -> str:
    """A pattern of ``value`` as a whole word of a message (not a part of a longer one)."""
    return rf"(?<![\w.]){re.escape(value)}(?![\w.])"


def _user_tables(cfg: Config, role: str) -> dict[str, Collection[str]]:
    """The configuration's librdkafka keys that reach the ``role`` client, by table.

    The table that wins comes first (a consumer's own key over ``secret_files`` over ``client``).
    """
    tables: dict[str, Collection[str]] = {}
    if role in ("consumer", "producer"):
        tables[f"kafka.{role}"] = getattr(cfg.kafka, role).keys()
    tables["kafka.secret_files"] = cfg.kafka.secret_files.keys()
    tables["kafka.client"] = cfg.kafka.client.keys()
    return tables


def _culprit(text: str, mine: Sequence[str], settings: Mapping[str, str], make: Any) -> str | None:
    """Which of the configuration's own librdkafka keys (``mine``) librdkafka's ``text`` is about.

    A key the message names (quoted or not, or as words: ``SASL mechanism``); else the one key
    that alone gets the same refusal (an alias: ``linger.ms`` is refused as
    ``queue.buffering.max.ms``); else a key whose value it quotes (``Unsupported hash function:
    SCRAM-SHA-999``); else None.
    """
    from confluent_kafka import Consumer, KafkaException

    named: list[str] = _PROPERTY.findall(text)
    for name in named:
        if name in mine:
            return name
    lower = text.lower()
    for name in mine:
        if name.replace(".", " ") in lower:
            return name
    reason = _CREATE_PREFIX.sub("", text.strip())
    alone = {"group.id": "check"} if make is Consumer else {}
    for name in mine:
        try:
            _build_unconnected(make, {**alone, name: settings[name]})
        except KafkaException as exc:
            err = exc.args[0] if exc.args else exc
            again = err.str() if hasattr(err, "str") else str(err)
            if _CREATE_PREFIX.sub("", again.strip()) == reason:
                return name
    for name in mine:  # the value it quotes (an unsupported mechanism or hash)
        if settings[name] and re.search(_token(settings[name]), text):
            return name
    return None
