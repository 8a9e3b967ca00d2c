"""Dead-letter payload protection: keep, drop, or envelope-encrypt the original key and value.

``dead_letter.payload`` (README.md, "Security"):

- ``keep``: the dead letter carries the original key and value (the default).
- ``drop``: no key and no value; coordinates, headers and the reason only. Not replayable.
- ``encrypt``: envelope encryption with a public key. Per dead letter, a fresh 256-bit data key
  encrypts the original key and value with AES-256-GCM; the data key is wrapped with the
  configured RSA public key (RSA-OAEP, SHA-256). Workers hold only the public key: they can
  write dead letters they cannot read. ``dlq replay --private-key FILE`` unwraps and decrypts.

Format of an encrypted dead letter (version 1): the record has no key; its value is the
12-byte GCM nonce followed by the ciphertext and its 16-byte tag, of the plaintext
``flags (1 byte: 1 = key present, 2 = value present) | key length (4 bytes, big-endian) |
key | value``; the associated data is the scheme name. Headers (``stream_scorer.headers``):
``PAYLOAD`` = ``encrypted``, ``ENCRYPTION_SCHEME`` = ``rsa-oaep-sha256+aes-256-gcm/v1``,
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
from pathlib import Path
from typing import Final, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stream_scorer import headers as hdr
from stream_scorer.errors import ConfigError

SCHEME: Final = "rsa-oaep-sha256+aes-256-gcm/v1"
KEEP: Final = "keep"
DROP: Final = "drop"
ENCRYPT: Final = "encrypt"
Mode = Literal["keep", "drop", "encrypt"]
#: The ``PAYLOAD`` header's values.
DROPPED: Final = b"dropped"
ENCRYPTED: Final = b"encrypted"
_NONCE = 12
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)

Headers = list[tuple[str, bytes | None]]


class EnvelopeError(Exception):
    """A dead letter that cannot be opened (wrong key, damaged, or unknown scheme)."""


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
        self, key: bytes | None, value: bytes | None
    ) -> tuple[bytes | None, bytes | None, Headers]:
        """Return the dead letter's key, value and the headers that describe them."""
        if self.mode == KEEP:
            return key, value, []
        if self.mode == DROP:
            return None, None, [(hdr.PAYLOAD, DROPPED)]
        assert self._public is not None
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        flags = (1 if key is not None else 0) | (2 if value is not None else 0)
        plain = struct.pack(">BI", flags, len(key or b"")) + (key or b"") + (value or b"")
        sealed = nonce + AESGCM(data_key).encrypt(nonce, plain, SCHEME.encode())
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


def open_sealed(
    private: rsa.RSAPrivateKey, value: bytes | None, headers: dict[str, bytes]
) -> tuple[bytes | None, bytes | None]:
    """Return the original key and value of an encrypted dead letter.

    Raises:
        EnvelopeError: another scheme, another key, or damaged bytes.
    """
    scheme = headers.get(hdr.ENCRYPTION_SCHEME, b"").decode(errors="replace")
    if scheme != SCHEME:
        raise EnvelopeError(f"unknown encryption scheme {scheme!r} (this version reads {SCHEME})")
    want = headers.get(hdr.ENCRYPTION_KEY_ID, b"").decode(errors="replace")
    have = key_id(private.public_key())
    if want != have:
        raise EnvelopeError(f"encrypted for key id {want}, and the private key given is {have}")
    try:
        data_key = private.decrypt(base64.b64decode(headers[hdr.ENCRYPTION_WRAPPED_KEY]), _OAEP)
        sealed = value or b""
        plain = AESGCM(data_key).decrypt(sealed[:_NONCE], sealed[_NONCE:], SCHEME.encode())
        flags, key_len = struct.unpack(">BI", plain[:5])
    except (KeyError, ValueError, InvalidTag, struct.error) as exc:
        raise EnvelopeError(f"cannot decrypt ({type(exc).__name__})") from None
    key = plain[5 : 5 + key_len] if flags & 1 else None
    return key, plain[5 + key_len :] if flags & 2 else None
