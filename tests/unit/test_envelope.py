"""Dead-letter payload protection (``stream_scorer.envelope``): drop, encrypt, open."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from stream_scorer import headers as hdr
from stream_scorer.envelope import (
    SCHEME,
    EnvelopeError,
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
    sealed_key, sealed, headers = Protector("encrypt", private.public_key()).protect(key, value)
    assert sealed_key is None and sealed is not None
    if value:
        assert value not in sealed
    h = {k: v or b"" for k, v in headers}
    assert h[hdr.PAYLOAD] == b"encrypted"
    assert h[hdr.ENCRYPTION_SCHEME] == SCHEME.encode()
    assert h[hdr.ENCRYPTION_KEY_ID] == key_id(private.public_key()).encode()
    assert open_sealed(private, sealed, h) == (key, value)


def test_another_key_or_damaged_bytes_do_not_open(private: rsa.RSAPrivateKey) -> None:
    _, sealed, headers = Protector("encrypt", private.public_key()).protect(b"k", b"v")
    h = {k: v or b"" for k, v in headers}
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EnvelopeError, match="encrypted for key id"):
        open_sealed(other, sealed, h)
    assert sealed is not None
    damaged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(EnvelopeError, match="cannot decrypt"):
        open_sealed(private, damaged, h)


def test_drop_keeps_nothing_of_the_record() -> None:
    assert Protector("drop").protect(b"k", b"v") == (None, None, [(hdr.PAYLOAD, b"dropped")])
    assert Protector("keep").protect(b"k", b"v") == (b"k", b"v", [])


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
