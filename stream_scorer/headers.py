"""Every Kafka header name stream-scorer writes or reads: the output contract's one home.

Predictions carry the model version and their input's coordinates; dead letters carry Kafka
Connect's ``__connect.errors.*`` context and ``stream_scorer.*`` extras (the manual's
"Kafka headers" page, ``docs/manual/reference/headers.md``, is generated from the ``#:`` comments
below); ``dlq replay`` adds where a replayed record came from. All values are UTF-8 text.
"""

from __future__ import annotations

#: Prefix of our own headers (dead-letter extras, provenance).
OWN_PREFIX = "stream_scorer."

# --- on every prediction ----------------------------------------------------------------------
#: The model version that scored the record (also ``model_version`` in a prediction's value);
#: on dead letters too: the model in use.
MODEL_VERSION = "stream_scorer.model.version"
#: The input record's topic.
SOURCE_TOPIC = "stream_scorer.source.topic"
#: The input record's partition.
SOURCE_PARTITION = "stream_scorer.source.partition"
#: The input record's offset.
SOURCE_OFFSET = "stream_scorer.source.offset"

# --- on every dead letter ---------------------------------------------------------------------
#: Prefix of Kafka Connect's error context headers (``errors.deadletterqueue.context.headers``).
CONNECT_PREFIX = "__connect.errors."
#: The topic the record came from.
CONNECT_TOPIC = CONNECT_PREFIX + "topic"
#: The partition the record came from.
CONNECT_PARTITION = CONNECT_PREFIX + "partition"
#: The offset of the record.
CONNECT_OFFSET = CONNECT_PREFIX + "offset"
#: The stage that refused it: ``decode``, ``features``, ``score`` or ``encode``.
CONNECT_STAGE = CONNECT_PREFIX + "stage"
#: ``stream_scorer``.
CONNECT_CLASS_NAME = CONNECT_PREFIX + "class.name"
#: The exception type (``stream_scorer`` for our own guards).
CONNECT_EXCEPTION_CLASS = CONNECT_PREFIX + "exception.class.name"
#: What went wrong; withheld with ``dead_letter.payload`` ``drop`` or ``encrypt`` (it can
#: quote field values).
CONNECT_EXCEPTION_MESSAGE = CONNECT_PREFIX + "exception.message"
#: The dead-letter reason code (also the ``reason`` label of the dead-letter metric).
REASON = "stream_scorer.error.reason"
#: The record's Kafka timestamp (milliseconds since the epoch).
ORIGINAL_TIMESTAMP = "stream_scorer.original.timestamp"
#: Its type, as librdkafka numbers it: 0 none, 1 create time, 2 log-append time.
ORIGINAL_TIMESTAMP_TYPE = "stream_scorer.original.timestamp.type"
#: The consumer group of the worker that refused it.
CONSUMER_GROUP = "stream_scorer.consumer.group"
#: The id of that worker (``worker.id``).
WORKER_ID = "stream_scorer.worker.id"
# MODEL_VERSION (above) too
#: The name of the model (its ``models:`` entry) that refused the record; absent in the
#: single-model form and on a record no model could decode.
MODEL_NAME = "stream_scorer.model.name"
#: How many times the record has been through a worker: 1, or one more than the attempt header
#: a replay (``stream-scorer dlq replay``) put on it.
ATTEMPT = "stream_scorer.attempt"

# --- on dead letters whose payload is protected (``dead_letter.payload``, ``envelope.py``) -------
#: ``dropped`` (no key, no value), ``encrypted`` (the value is an envelope) or ``stripped``
#: (too large for the dead-letter topic: no key, no value; see below); absent: kept.
PAYLOAD = "stream_scorer.payload"
#: The envelope's scheme, ``rsa-oaep-sha256+aes-256-gcm/v2`` (v1: not bound to its record).
ENCRYPTION_SCHEME = "stream_scorer.encryption.scheme"
#: Which public key wrapped the data key: 16 hex digits of the SHA-256 of its DER.
ENCRYPTION_KEY_ID = "stream_scorer.encryption.key_id"
#: The data key, wrapped with RSA-OAEP (SHA-256), in base64.
ENCRYPTION_WRAPPED_KEY = "stream_scorer.encryption.wrapped_key"

# --- on stripped dead letters (``PAYLOAD`` = ``stripped``, ``letters.py``) ---------------------
#: Bytes of the original record's value (absent: a null value, or ``payload: drop``).
ORIGINAL_VALUE_SIZE = "stream_scorer.original.value.size"
#: SHA-256 of the original record's value, in hex (absent as the size is).
ORIGINAL_VALUE_SHA256 = "stream_scorer.original.value.sha256"
#: How many of the original record's headers were left out for room (0: none).
HEADERS_DROPPED = "stream_scorer.original.headers.dropped"

# --- on signed dead letters (``dead_letter.signing_key``, ``letters.py``) -----------------------
#: ``hmac-sha256/v1:<key id>:<hex digest>`` over the letter's key, value and other headers
#: (``dlq replay`` checks it).
SIGNATURE = "stream_scorer.signature"

# --- on every replayed record -----------------------------------------------------------------
#: ``topic/partition/offset`` of the dead letter a replayed record was published from.
REPLAY_SOURCE = "stream_scorer.replay.source"

# --- read on framed input (``input.format: confluent``) ----------------------------------------
#: Confluent's schema id header (confluent-kafka-python 2.10+): magic byte 1 and a 16-byte GUID.
VALUE_SCHEMA_ID = "__value_schema_id"
