"""The dead letter as a record: its size against the topic's limit, stripping, and signing.

Shared by the worker, which writes dead letters (``worker/sink.py``), and ``dlq replay``, which
reads them (``ops/replay.py``); docs/manual/dead-letters.md and security.md.

Size: a dead letter must fit the dead-letter topic's ``max.message.bytes`` and the producer's
``message.max.bytes``, whatever the input. One that does not (``fits``) is written stripped
(``strip``): no key and no value; the coordinates, reason and error context; the original
headers as far as they fit; the value's size and SHA-256; ``stream_scorer.payload`` =
``stripped``. Such a letter cannot be replayed.

Signing (``dead_letter.signing_key``): the worker appends ``stream_scorer.signature``, an
HMAC-SHA256 with a secret key over the letter's key, value and every other header in order
(``canonical``). ``dlq replay --signing-key`` verifies it and refuses unsigned or altered
letters: only holders of the key (the workers) can write a letter replay publishes.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from stream_scorer import headers as hdr
from stream_scorer.envelope import STRIPPED
from stream_scorer.errors import ConfigError

Headers = list[tuple[str, bytes | None]]

#: Bytes beyond a one-record batch's key, value and header bytes, bounded generously: the
#: batch header (61 bytes) and the record's own varints (at most 36).
BATCH_FRAMING_BYTES: Final = 512
#: Bytes of varints per header (its name's and its value's lengths), bounded.
HEADER_FRAMING_BYTES: Final = 10
#: The signature scheme, first in the signature header's value.
SIGNATURE_SCHEME: Final = "hmac-sha256/v1"
#: The shortest signing key accepted (bytes).
MIN_SIGNING_KEY_BYTES: Final = 32


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, Any]]) -> int:
    """Bytes of a record's key, value and headers (its framing not counted)."""
    size = len(key or b"") + len(value or b"")
    return size + sum(len(k.encode()) + len(v or b"") for k, v in headers)


def framed_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, Any]]) -> int:
    """An upper bound of the bytes of a batch holding only this record."""
    framing = BATCH_FRAMING_BYTES + HEADER_FRAMING_BYTES * len(headers)
    return record_size(key, value, headers) + framing


def fits(key: bytes | None, value: bytes | None, headers: Headers, limit: int) -> bool:
    """Whether the record fits a topic or producer whose limit is ``limit`` bytes (0: none)."""
    return limit <= 0 or framed_size(key, value, headers) <= limit


def strip(
    value: bytes | None,
    original: Headers,
    context: Headers,
    limit: int,
    reserve: int = 0,
) -> Headers:
    """The headers of the stripped letter of a record whose whole letter does not fit ``limit``.

    Args:
        value: the original value (only its size and SHA-256 are kept); None: neither is
            written (``dead_letter.payload: drop`` reveals nothing of the value).
        original: the record's own headers, kept in order as far as they fit.
        context: the error context headers (coordinates, reason, ...), always kept.
        limit: the bytes the letter must fit (``fits``).
        reserve: bytes to leave for headers added later (the signature).
    """
    added: Headers = [*context, (hdr.PAYLOAD, STRIPPED)]
    if value is not None:
        added.append((hdr.ORIGINAL_VALUE_SIZE, str(len(value)).encode()))
        added.append((hdr.ORIGINAL_VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()))
    dropped_header = (hdr.HEADERS_DROPPED, b"%d" % len(original))  # its widest value
    room = limit - reserve - framed_size(None, None, [*added, dropped_header])
    kept: Headers = []
    for name, content in original:
        need = len(name.encode()) + len(content or b"") + HEADER_FRAMING_BYTES
        if limit <= 0 or need <= room:
            kept.append((name, content))
            room -= need
    return [*kept, *added, (hdr.HEADERS_DROPPED, b"%d" % (len(original) - len(kept)))]


def canonical(key: bytes | None, value: bytes | None, headers: Headers) -> bytes:
    """The bytes a signature covers: key, value and headers (the signature's excluded), framed.

    Each part is a presence byte and a 4-byte big-endian length before its bytes, so no two
    different letters give the same bytes.
    """

    def part(data: bytes | None) -> bytes:
        return b"\0" if data is None else b"\1" + struct.pack(">I", len(data)) + data

    signed = [(k, v) for k, v in headers if k != hdr.SIGNATURE]
    pieces = [SIGNATURE_SCHEME.encode(), part(key), part(value), struct.pack(">I", len(signed))]
    for name, content in signed:
        pieces += [part(name.encode()), part(content)]
    return b"".join(pieces)


class SignatureError(Exception):
    """A dead letter whose signature is missing, made with another key, or does not match."""


class Signer:
    """Signs dead letters, and verifies them, with one secret key (``dead_letter.signing_key``)."""

    def __init__(self, secret: bytes) -> None:
        """``secret``: at least ``MIN_SIGNING_KEY_BYTES`` bytes."""
        self._secret = secret
        #: Names the key in the signature header without revealing it.
        self.key_id = hashlib.sha256(b"stream-scorer signing key\0" + secret).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: Path, field: str) -> Signer:
        """Read the key from ``path`` (a trailing newline dropped).

        Raises:
            ConfigError: unreadable or shorter than ``MIN_SIGNING_KEY_BYTES`` (names ``field``,
                never the content).
        """
        try:
            secret = path.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise ConfigError(field, f"cannot read {path}: {exc.strerror}") from None
        if len(secret) < MIN_SIGNING_KEY_BYTES:
            raise ConfigError(
                field, f"{path} must hold at least {MIN_SIGNING_KEY_BYTES} bytes of secret"
            )
        return cls(secret)

    @property
    def header_bytes(self) -> int:
        """Bytes the signature header adds to a letter, framing included."""
        return len(hdr.SIGNATURE) + len(self._value(b"")) + 64 + HEADER_FRAMING_BYTES

    def _value(self, digest: bytes) -> bytes:
        return f"{SIGNATURE_SCHEME}:{self.key_id}:".encode() + digest

    def _digest(self, key: bytes | None, value: bytes | None, headers: Headers) -> bytes:
        mac = hmac.new(self._secret, canonical(key, value, headers), hashlib.sha256)
        return mac.hexdigest().encode()

    def sign(self, key: bytes | None, value: bytes | None, headers: Headers) -> Headers:
        """``headers`` followed by the signature of the letter."""
        return [*headers, (hdr.SIGNATURE, self._value(self._digest(key, value, headers)))]

    def verify(self, key: bytes | None, value: bytes | None, headers: Headers) -> None:
        """Check the letter's signature.

        Raises:
            SignatureError: no signature, another key's or scheme's, or one that does not match
                (the letter was written or changed without the key).
        """
        found = [v or b"" for k, v in headers if k == hdr.SIGNATURE]
        if not found:
            raise SignatureError("not signed")
        if len(found) > 1:
            raise SignatureError("more than one signature header")
        scheme, _, rest = found[0].decode(errors="replace").partition(":")
        kid, _, _digest = rest.partition(":")
        if scheme != SIGNATURE_SCHEME:
            raise SignatureError(f"unknown signature scheme {scheme!r}")
        if kid != self.key_id:
            raise SignatureError(f"signed with key id {kid}, and the key given is {self.key_id}")
        if not hmac.compare_digest(found[0], self._value(self._digest(key, value, headers))):
            raise SignatureError("the signature does not match: written or changed without the key")
