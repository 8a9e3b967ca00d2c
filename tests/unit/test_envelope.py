"""Dead-letter payload protection (``stream_scorer.envelope``): drop, encrypt, open."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from stream_scorer import headers as hdr
from stream_scorer.envelope import (
    SCHEME,
    SCHEME_V1,
    EnvelopeError,
    EnvelopeKeyError,
    Protector,
    key_id,
    load_private_key,
    load_public_key,
    open_sealed,
)
from stream_scorer.errors import ConfigError


@pytest.fixture(scope="module")
def private() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize(
    ("key", "value"),
    [(b"k", b"\x00\x01v"), (None, b"value"), (b"key", None), (None, None), (b"", b"")],
)
def test_encrypted_key_and_value_open_to_the_exact_bytes(
    private: rsa.RSAPrivateKey, key: bytes | None, value: bytes | None
) -> None:
    protector = Protector("encrypt", private.public_key())
    sealed_key, sealed, headers = protector.protect(key, value, "in", 2, 17)
    assert sealed_key is None and sealed is not None
    if value:
        assert value not in sealed
    h = {k: v or b"" for k, v in headers} | _at("in", 2, 17)
    assert h[hdr.PAYLOAD] == b"encrypted"
    assert h[hdr.ENCRYPTION_SCHEME] == SCHEME.encode() == b"rsa-oaep-sha256+aes-256-gcm/v2"
    assert h[hdr.ENCRYPTION_KEY_ID] == key_id(private.public_key()).encode()
    opened = open_sealed(private, sealed, h)
    assert (opened.key, opened.value, opened.bound) == (key, value, True)


def _at(topic: str, partition: int, offset: int) -> dict[str, bytes]:
    """The coordinate headers of a dead letter of the record at topic/partition/offset."""
    return {
        hdr.CONNECT_TOPIC: topic.encode(),
        hdr.CONNECT_PARTITION: str(partition).encode(),
        hdr.CONNECT_OFFSET: str(offset).encode(),
    }


def test_another_key_or_damaged_bytes_do_not_open(private: rsa.RSAPrivateKey) -> None:
    _, sealed, headers = Protector("encrypt", private.public_key()).protect(b"k", b"v", "t", 0, 1)
    h = {k: v or b"" for k, v in headers} | _at("t", 0, 1)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EnvelopeKeyError, match="encrypted for key id"):
        open_sealed(other, sealed, h)
    assert sealed is not None
    damaged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(EnvelopeError, match="cannot decrypt"):
        open_sealed(private, damaged, h)
    with pytest.raises(EnvelopeKeyError, match="unknown encryption scheme 'x/v9'"):
        open_sealed(private, sealed, h | {hdr.ENCRYPTION_SCHEME: b"x/v9"})


@pytest.mark.parametrize(
    "elsewhere", [("other", 0, 1), ("t", 1, 1), ("t", 0, 2), ("t", 0, 11), ("t0", 0, 1)]
)
def test_a_ciphertext_moved_to_another_records_dead_letter_does_not_open(
    private: rsa.RSAPrivateKey, elsewhere: tuple[str, int, int]
) -> None:
    """v2 binds topic, partition and offset: the envelope with its wrapped key, moved into the
    dead letter of another record (its coordinate headers), is refused."""
    _, sealed, headers = Protector("encrypt", private.public_key()).protect(b"k", b"v", "t", 0, 1)
    h = {k: v or b"" for k, v in headers}
    assert open_sealed(private, sealed, h | _at("t", 0, 1)).value == b"v"
    with pytest.raises(EnvelopeError, match="not sealed for this record's topic, partition"):
        open_sealed(private, sealed, h | _at(*elsewhere))


def test_a_v1_envelope_still_opens_and_says_it_is_not_bound(private: rsa.RSAPrivateKey) -> None:
    """Dead letters of older workers: the associated data was the scheme name alone."""
    import base64
    import os

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    data_key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
    plain = b"\x03\x00\x00\x00\x02k1value-1"  # key and value present, key length 2
    sealed = nonce + AESGCM(data_key).encrypt(nonce, plain, SCHEME_V1.encode())
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    h = {
        hdr.ENCRYPTION_SCHEME: SCHEME_V1.encode(),
        hdr.ENCRYPTION_KEY_ID: key_id(private.public_key()).encode(),
        hdr.ENCRYPTION_WRAPPED_KEY: base64.b64encode(private.public_key().encrypt(data_key, oaep)),
    } | _at("anywhere", 5, 5)
    opened = open_sealed(private, sealed, h)
    assert (opened.key, opened.value, opened.bound) == (b"k1", b"value-1", False)


def test_drop_keeps_nothing_of_the_record() -> None:
    assert Protector("drop").protect(b"k", b"v", "t", 0, 1) == (
        None,
        None,
        [(hdr.PAYLOAD, b"dropped")],
    )
    assert Protector("keep").protect(b"k", b"v", "t", 0, 1) == (b"k", b"v", [])


def test_keys_load_from_pem_and_small_or_missing_keys_are_refused(
    tmp_path: Path, private: rsa.RSAPrivateKey
) -> None:
    pub = tmp_path / "pub.pem"
    pub.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert key_id(load_public_key(pub)) == key_id(private.public_key())
    small = tmp_path / "small.pem"
    small.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=1024)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ConfigError, match="2048"):
        load_public_key(small)
    with pytest.raises(ConfigError, match="--private-key"):
        load_private_key(pub)
    with pytest.raises(ConfigError, match="public_key"):
        Protector("encrypt")
