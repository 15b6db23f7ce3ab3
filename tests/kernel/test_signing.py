"""Ed25519 signing: round trips, key files, and no private key material in the open."""

from __future__ import annotations

import base64
import hashlib
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cabincrew.errors import CabinCrewError
from cabincrew.signing import (
    Ed25519Signer,
    Ed25519Verifier,
    Signer,
    SigningError,
    key_id_for,
    verify,
)


def _secret_forms(signer: Ed25519Signer) -> list[str]:
    pem = signer._private_pem()
    seed = signer._key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    body = b"".join(pem.splitlines()[1:-1]).decode()
    return [body[:24], seed.hex(), base64.b64encode(seed).decode()[:24]]


def test_a_signature_verifies_and_nothing_else_does() -> None:
    signer = Ed25519Signer.generate()
    signature = signer.sign(b"plan-token")
    public = signer.public_key_bytes()
    assert len(signature) == 64 and len(public) == 32
    assert verify(public, b"plan-token", signature)
    assert not verify(public, b"plan-tokeN", signature)
    assert not verify(public, b"plan-token", signature[:-1] + bytes([signature[-1] ^ 1]))
    assert not verify(Ed25519Signer.generate().public_key_bytes(), b"plan-token", signature)
    assert not verify(public[:31], b"plan-token", signature)
    assert not verify(public, b"plan-token", signature[:63])


def test_the_signer_satisfies_the_signer_protocol() -> None:
    signer: Signer = Ed25519Signer.generate()
    assert isinstance(signer, Signer)


def test_key_id_is_the_first_16_hex_digits_of_the_public_key_hash() -> None:
    signer = Ed25519Signer.generate()
    expected = hashlib.sha256(signer.public_key_bytes()).hexdigest()[:16]
    assert signer.key_id == key_id_for(signer.public_key_bytes()) == expected
    assert signer.verifier().key_id == expected


def test_the_public_key_pem_builds_a_verifier() -> None:
    signer = Ed25519Signer.generate()
    verifier = Ed25519Verifier.from_pem(signer.public_key_pem())
    assert verifier == signer.verifier()
    assert verifier.verify(b"data", signer.sign(b"data"))
    assert not verifier.verify(b"data", Ed25519Signer.generate().sign(b"data"))


def test_load_or_create_makes_a_private_file_once_and_then_reuses_it(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "orchestrator.pem"
    created = Ed25519Signer.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert Ed25519Signer.load_or_create(path).public_key_bytes() == created.public_key_bytes()
    assert Ed25519Signer.from_file(path).key_id == created.key_id
    assert os.listdir(path.parent) == ["orchestrator.pem"]


def test_load_or_create_keeps_a_key_another_process_created_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.pem"
    first = Ed25519Signer.load_or_create(path)
    # Make this process believe the file is absent, as if the other one won the race.
    monkeypatch.setattr(Path, "exists", lambda self: False)
    second = Ed25519Signer.load_or_create(path)
    assert second.key_id == first.key_id
    assert os.listdir(tmp_path) == ["audit.pem"]


def test_a_key_file_that_is_not_an_ed25519_private_key_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWlzaC1ieXRlcw==\n-----END PRIVATE KEY-----\n"
    )
    ec_key = tmp_path / "ec.pem"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for path in (garbage, ec_key, tmp_path / "missing.pem"):
        with pytest.raises(SigningError) as caught:
            Ed25519Signer.from_file(path)
        assert isinstance(caught.value, CabinCrewError)
        assert caught.value.__cause__ is None
        assert "c2VjcmV0" not in str(caught.value)
    with pytest.raises(SigningError):
        Ed25519Signer.load_or_create(garbage)


def test_private_key_material_appears_in_no_repr_str_or_pickle() -> None:
    signer = Ed25519Signer.generate()
    shown = repr(signer) + str(signer) + f"{signer}" + repr([signer])
    assert signer.key_id in repr(signer)
    for secret in _secret_forms(signer):
        assert secret not in shown
    with pytest.raises(TypeError):
        pickle.dumps(signer)


def test_a_verifier_refuses_a_public_key_of_the_wrong_size() -> None:
    with pytest.raises(SigningError):
        Ed25519Verifier(b"\x00" * 31)
    with pytest.raises(SigningError):
        Ed25519Verifier.from_pem(b"not a pem")
