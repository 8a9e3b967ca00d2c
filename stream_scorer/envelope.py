"""Dead-letter payload protection: keep, drop, or envelope-encrypt the original key and value.

``dead_letter.payload`` (docs/manual/security.md):

- ``keep``: the dead letter carries the original key and value (the default).
- ``drop``: no key and no value; coordinates, headers and the reason only. Not replayable.
- ``encrypt``: envelope encryption with a public key. Per dead letter, a fresh 256-bit data key
  encrypts the original key and value with AES-256-GCM; the data key is wrapped with the
  configured RSA public key (RSA-OAEP, SHA-256). Workers hold only the public key: they can
  write dead letters they cannot read. ``dlq replay --private-key FILE`` unwraps and decrypts.

Format of an encrypted dead letter (version 2): the record has no key; its value is the
12-byte GCM nonce followed by the ciphertext and its 16-byte tag, of the plaintext
``flags (1 byte: 1 = key present, 2 = value present) | key length (4 bytes, big-endian) |
key | value``; the associated data (``associated_data``) is the scheme name and the original
record's topic, partition and offset, each followed by a zero byte, so a ciphertext moved into
another dead letter (whose ``__connect.errors.topic/partition/offset`` headers differ) does
not open. Version 1 (older workers) bound the scheme name only: ``open_sealed`` still opens it
and says so (``Opened.bound``). Headers (``stream_scorer.headers``):
``PAYLOAD`` = ``encrypted``, ``ENCRYPTION_SCHEME`` = ``rsa-oaep-sha256+aes-256-gcm/v2``,
``ENCRYPTION_KEY_ID`` = the first 16 hex digits of the SHA-256 of the public key's DER
(SubjectPublicKeyInfo), ``ENCRYPTION_WRAPPED_KEY`` = the wrapped data key in base64. In
both ``drop`` and ``encrypt`` the exception-message header, which can quote field values,
is withheld.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stream_scorer import headers as hdr
from stream_scorer.errors import ConfigError

#: The scheme written: binds each ciphertext to its record's topic, partition and offset.
SCHEME: Final = "rsa-oaep-sha256+aes-256-gcm/v2"
#: The scheme of older workers: the associated data is the scheme name alone (still read).
SCHEME_V1: Final = "rsa-oaep-sha256+aes-256-gcm/v1"
KEEP: Final = "keep"
DROP: Final = "drop"
ENCRYPT: Final = "encrypt"
Mode = Literal["keep", "drop", "encrypt"]
#: The ``PAYLOAD`` header's values.
DROPPED: Final = b"dropped"
ENCRYPTED: Final = b"encrypted"
#: Too large for the dead-letter topic: written without key and value (``letters.strip``).
STRIPPED: Final = b"stripped"
_NONCE = 12
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)

Headers = list[tuple[str, bytes | None]]


class EnvelopeError(Exception):
    """A dead letter that cannot be opened: damaged, or moved from another record."""


class EnvelopeKeyError(EnvelopeError):
    """A dead letter this reader cannot open: an unknown scheme or another key."""


def associated_data(scheme: str, topic: str, partition: int, offset: int) -> bytes:
    """The AEAD associated data of ``scheme`` for the record at topic/partition/offset."""
    if scheme == SCHEME_V1:
        return SCHEME_V1.encode()
    return b"".join(part.encode() + b"\0" for part in (scheme, topic, str(partition), str(offset)))


def key_id(public: rsa.RSAPublicKey) -> str:
    """The first 16 hex digits of the SHA-256 of the public key (SubjectPublicKeyInfo DER)."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def load_public_key(path: Path) -> rsa.RSAPublicKey:
    """Read an RSA public key (PEM) for ``dead_letter.public_key``.

    Raises:
        ConfigError: not a readable PEM RSA public key of at least 2048 bits.
    """
    try:
        public = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError("dead_letter.public_key", f"not a PEM public key: {path}") from exc
    if not isinstance(public, rsa.RSAPublicKey) or public.key_size < 2048:
        raise ConfigError("dead_letter.public_key", f"must be an RSA key of 2048+ bits: {path}")
    return public


def load_private_key(path: Path) -> rsa.RSAPrivateKey:
    """Read the RSA private key (PEM, unencrypted) that opens encrypted dead letters.

    Raises:
        ConfigError: not a readable PEM RSA private key.
    """
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("--private-key", f"not an unencrypted PEM private key: {path}") from exc
    if not isinstance(private, rsa.RSAPrivateKey):
        raise ConfigError("--private-key", f"must be an RSA private key: {path}")
    return private


class Protector:
    """What a dead letter carries of its record's key and value (``dead_letter.payload``)."""

    def __init__(self, mode: Mode, public: rsa.RSAPublicKey | None = None) -> None:
        """``public`` is required for ``encrypt``."""
        if mode == ENCRYPT and public is None:
            raise ConfigError("dead_letter.public_key", "is required with payload = encrypt")
        self.mode = mode
        self._public = public
        self._key_id = b"" if public is None else key_id(public).encode()

    def protect(
        self, key: bytes | None, value: bytes | None, topic: str, partition: int, offset: int
    ) -> tuple[bytes | None, bytes | None, Headers]:
        """Return the dead letter's key, value and the headers that describe them.

        ``topic``, ``partition`` and ``offset``: the original record's, bound into the envelope.
        """
        if self.mode == KEEP:
            return key, value, []
        if self.mode == DROP:
            return None, None, [(hdr.PAYLOAD, DROPPED)]
        assert self._public is not None
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        flags = (1 if key is not None else 0) | (2 if value is not None else 0)
        plain = struct.pack(">BI", flags, len(key or b"")) + (key or b"") + (value or b"")
        aad = associated_data(SCHEME, topic, partition, offset)
        sealed = nonce + AESGCM(data_key).encrypt(nonce, plain, aad)
        wrapped = self._public.encrypt(data_key, _OAEP)
        return (
            None,
            sealed,
            [
                (hdr.PAYLOAD, ENCRYPTED),
                (hdr.ENCRYPTION_SCHEME, SCHEME.encode()),
                (hdr.ENCRYPTION_KEY_ID, self._key_id),
                (hdr.ENCRYPTION_WRAPPED_KEY, base64.b64encode(wrapped)),
            ],
        )

    @property
    def withholds_details(self) -> bool:
        """Whether the exception message (which can quote field values) is withheld."""
        return self.mode != KEEP


@dataclass(frozen=True)
class Opened:
    """An encrypted dead letter's original key and value.

    Attributes:
        key: the original key.
        value: the original value.
        bound: whether the envelope was bound to the record's coordinates (v2); False: a v1
            envelope, which could have been moved from another dead letter undetected.
    """

    key: bytes | None
    value: bytes | None
    bound: bool


def open_sealed(
    private: rsa.RSAPrivateKey, value: bytes | None, headers: dict[str, bytes]
) -> Opened:
    """Return the original key and value of an encrypted dead letter.

    The coordinates bound into a v2 envelope are the letter's ``__connect.errors.topic``,
    ``partition`` and ``offset`` headers.

    Raises:
        EnvelopeKeyError: another scheme or another key.
        EnvelopeError: damaged bytes, or an envelope moved from another record.
    """
    scheme = headers.get(hdr.ENCRYPTION_SCHEME, b"").decode(errors="replace")
    if scheme not in (SCHEME, SCHEME_V1):
        raise EnvelopeKeyError(
            f"unknown encryption scheme {scheme!r} (this version reads {SCHEME} and {SCHEME_V1})"
        )
    want = headers.get(hdr.ENCRYPTION_KEY_ID, b"").decode(errors="replace")
    have = key_id(private.public_key())
    if want != have:
        raise EnvelopeKeyError(f"encrypted for key id {want}, and the private key given is {have}")
    try:
        topic = headers.get(hdr.CONNECT_TOPIC, b"").decode()
        partition = int(headers.get(hdr.CONNECT_PARTITION, b""))
        offset = int(headers.get(hdr.CONNECT_OFFSET, b""))
        data_key = private.decrypt(base64.b64decode(headers[hdr.ENCRYPTION_WRAPPED_KEY]), _OAEP)
        sealed = value or b""
        aad = associated_data(scheme, topic, partition, offset)
        plain = AESGCM(data_key).decrypt(sealed[:_NONCE], sealed[_NONCE:], aad)
        flags, key_len = struct.unpack(">BI", plain[:5])
    except (KeyError, ValueError, InvalidTag, struct.error) as exc:
        why = (
            "not sealed for this record's topic, partition and offset, or damaged"
            if isinstance(exc, InvalidTag) and scheme == SCHEME
            else "damaged"
        )
        raise EnvelopeError(f"cannot decrypt ({type(exc).__name__}): {why}") from None
    key = plain[5 : 5 + key_len] if flags & 1 else None
    return Opened(key, plain[5 + key_len :] if flags & 2 else None, scheme == SCHEME)
