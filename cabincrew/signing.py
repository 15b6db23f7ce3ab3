"""Signing port and its Ed25519 implementation, for plan-tokens, approvals and checkpoints.

Private key material never appears in ``repr``, ``str`` or exception text: errors name the
file and the kind of failure only, and exceptions from the crypto library are not chained.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import NoReturn, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from cabincrew.canonical import sha256_hex
from cabincrew.errors import CabinCrewError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


class SigningError(CabinCrewError):
    """A key could not be loaded, created or used."""

    def remedy(self) -> str:
        """A hint for a human on how to fix the cause."""
        return (
            "Check that the key file holds a PEM PKCS#8 Ed25519 private key and is readable "
            "by this process, or remove it to have a new key created."
        )


@runtime_checkable
class Signer(Protocol):
    """Something that signs bytes with an Ed25519 key."""

    @property
    def key_id(self) -> str:
        """First 16 hex characters of SHA-256 of the raw public key."""
        ...

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        ...

    def public_key_bytes(self) -> bytes:
        """Return the raw 32-byte Ed25519 public key."""
        ...


class Verifier(Protocol):
    """Something that checks signatures made by one key."""

    @property
    def key_id(self) -> str:
        """First 16 hex characters of SHA-256 of the raw public key."""
        ...

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is a valid signature of ``data``."""
        ...


def key_id_for(public_key: bytes) -> str:
    """Return the key id of a raw Ed25519 public key."""
    return sha256_hex(public_key)[:16]


def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """Return whether ``signature`` is a valid Ed25519 signature of ``data`` by ``public_key``."""
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class Ed25519Verifier:
    """Verifies signatures made by one raw Ed25519 public key."""

    __slots__ = ("_public_key",)

    def __init__(self, public_key: bytes) -> None:
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise SigningError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")
        try:
            Ed25519PublicKey.from_public_bytes(public_key)
        except ValueError:
            raise SigningError("not a valid Ed25519 public key") from None
        self._public_key = bytes(public_key)

    @classmethod
    def from_pem(cls, pem: bytes) -> Ed25519Verifier:
        """Build a verifier from a PEM SubjectPublicKeyInfo Ed25519 public key."""
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, UnsupportedAlgorithm):
            raise SigningError("not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError("the PEM public key is not an Ed25519 key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    @property
    def key_id(self) -> str:
        """First 16 hex characters of SHA-256 of the raw public key."""
        return key_id_for(self._public_key)

    def public_key_bytes(self) -> bytes:
        """Return the raw 32-byte Ed25519 public key."""
        return self._public_key

    def verify(self, data: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is a valid signature of ``data``."""
        return verify(self._public_key, data, signature)

    def __repr__(self) -> str:
        return f"Ed25519Verifier(key_id={self.key_id!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Ed25519Verifier):
            return NotImplemented
        return self._public_key == other._public_key

    def __hash__(self) -> int:
        return hash(self._public_key)


class Ed25519Signer:
    """A ``Signer`` backed by an in-memory Ed25519 private key."""

    __slots__ = ("_key", "_key_id", "_public")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self._public = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._key_id = key_id_for(self._public)

    @classmethod
    def generate(cls) -> Ed25519Signer:
        """Create a signer with a fresh random key."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> Ed25519Signer:
        """Build a signer from an unencrypted PEM PKCS#8 Ed25519 private key."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            # The library's message may quote the input; say only what kind of failure it was.
            raise SigningError("not an unencrypted PEM PKCS#8 private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError("the PEM private key is not an Ed25519 key")
        return cls(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Ed25519Signer:
        """Load a signer from a PEM PKCS#8 Ed25519 private key file."""
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise SigningError(
                f"cannot read key file {os.fspath(path)!r}: {exc.strerror}"
            ) from None
        try:
            return cls.from_pem(pem)
        except SigningError as exc:
            raise SigningError(f"key file {os.fspath(path)!r}: {exc.message}") from None

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Ed25519Signer:
        """Load the key at ``path``, or create it (mode 0600, atomically) if it is absent."""
        target = Path(path)
        if target.exists():
            return cls.from_file(target)
        signer = cls.generate()
        try:
            _create_exclusive(target, signer._private_pem())
        except FileExistsError:
            # Another process created the key first: everyone must end up with the same key.
            return cls.from_file(target)
        except OSError as exc:
            raise SigningError(f"cannot create key file {str(target)!r}: {exc.strerror}") from None
        return signer

    @property
    def key_id(self) -> str:
        """First 16 hex characters of SHA-256 of the raw public key."""
        return self._key_id

    def sign(self, data: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``data``."""
        return self._key.sign(data)

    def public_key_bytes(self) -> bytes:
        """Return the raw 32-byte Ed25519 public key."""
        return self._public

    def public_key_pem(self) -> bytes:
        """Return the public key as PEM SubjectPublicKeyInfo."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def verifier(self) -> Ed25519Verifier:
        """Return a verifier for this signer's public key."""
        return Ed25519Verifier(self._public)

    def _private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"Ed25519Signer(key_id={self._key_id!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        # Pickling would copy the private key into whatever stores the pickle.
        raise TypeError("Ed25519Signer cannot be pickled")


def _create_exclusive(target: Path, content: bytes) -> None:
    """Write ``content`` to ``target`` only if it does not exist, never exposing a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() fails if the target exists, so a concurrent creator's key is never replaced.
        os.link(temp, target)
        _fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
