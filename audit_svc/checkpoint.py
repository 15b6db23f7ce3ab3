"""Signed tree heads in the C2SP tlog-checkpoint format, wrapped in C2SP signed notes.

A checkpoint body is ``<origin>\\n<size>\\n<base64 root>\\n``. The note appends a blank line
and one line per signature, ``\\u2014 <key name> <base64(key hash || signature)>\\n``, where
the key hash is the first four bytes of SHA-256(key name || 0x0A || 0x01 || public key).
Verifier keys are exchanged as ``<name>+<hex key hash>+<base64(0x01 || public key)>``.

Parsing is strict: anything not byte-for-byte in the canonical form is refused, because a
checkpoint is evidence and two encodings of one tree head must not both verify.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

from cabincrew.errors import InvalidArgument
from cabincrew.signing import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, Signer, verify

ED25519_ALGORITHM = 0x01
KEY_HASH_SIZE = 4
ROOT_SIZE = 32
SIGNATURE_PREFIX = "\u2014 "
# golang.org/x/mod/sumdb/note caps signatures per note; a bound keeps parsing cheap.
MAX_SIGNATURES = 100

_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")
_CONTROL_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")
_MAX_TREE_SIZE = 2**64 - 1


class CheckpointError(InvalidArgument):
    """A checkpoint, signed note or verifier key that is malformed or does not verify."""


class NoteFormatError(CheckpointError):
    """The text is not a well-formed signed note."""


class CheckpointFormatError(CheckpointError):
    """The note body is not a well-formed checkpoint."""


class VerifierKeyError(CheckpointError):
    """A verifier key string is malformed or its key hash does not match."""


class UnverifiedNoteError(CheckpointError):
    """No signature by the expected key verifies, or a signature by it is invalid."""


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: origin, tree size and root hash (verified when from parse_and_verify)."""

    origin: str
    size: int
    root: bytes

    def __post_init__(self) -> None:
        _check_origin(self.origin, CheckpointFormatError)
        if not 0 <= self.size <= _MAX_TREE_SIZE:
            raise CheckpointFormatError(f"tree size {self.size} is out of range")
        if len(self.root) != ROOT_SIZE:
            raise CheckpointFormatError(f"a root hash is {ROOT_SIZE} bytes")

    def body(self) -> str:
        """Return the checkpoint body text."""
        return format_checkpoint(self.origin, self.size, self.root)


@dataclass(frozen=True)
class NoteVerifier:
    """An Ed25519 note verifier key: key name and raw public key."""

    name: str
    public_key: bytes

    def __post_init__(self) -> None:
        _check_key_name(self.name, VerifierKeyError)
        if len(self.public_key) != PUBLIC_KEY_SIZE:
            raise VerifierKeyError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes")

    @property
    def key_hash(self) -> bytes:
        """First four bytes of SHA-256(name || 0x0A || 0x01 || public key)."""
        return key_hash(self.name, self.public_key)

    def vkey(self) -> str:
        """Return the verifier key string ``<name>+<hex hash>+<base64(0x01||key)>``."""
        encoded = base64.b64encode(bytes([ED25519_ALGORITHM]) + self.public_key).decode()
        return f"{self.name}+{self.key_hash.hex()}+{encoded}"

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` is this key's Ed25519 signature of ``message``."""
        return verify(self.public_key, message, signature)


def key_hash(name: str, public_key: bytes) -> bytes:
    """Return the C2SP signed-note key hash of an Ed25519 key."""
    material = name.encode() + b"\n" + bytes([ED25519_ALGORITHM]) + public_key
    return hashlib.sha256(material).digest()[:KEY_HASH_SIZE]


def vkey_string(name: str, public_key: bytes) -> str:
    """Return the note verifier key string for an Ed25519 public key."""
    return NoteVerifier(name, public_key).vkey()


def parse_vkey(vkey: str) -> NoteVerifier:
    """Parse a note verifier key string, checking its algorithm and key hash."""
    # The base64 key may itself contain "+", so only the first two separate fields.
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise VerifierKeyError("a verifier key is <name>+<hash>+<key>")
    name, hash_hex, encoded = parts
    _check_key_name(name, VerifierKeyError)
    if not re.fullmatch(r"[0-9a-f]{8}", hash_hex):
        raise VerifierKeyError("a verifier key hash is 8 lowercase hex digits")
    raw = _b64decode(encoded, VerifierKeyError)
    if len(raw) != 1 + PUBLIC_KEY_SIZE or raw[0] != ED25519_ALGORITHM:
        raise VerifierKeyError("only Ed25519 verifier keys are supported")
    verifier = NoteVerifier(name, raw[1:])
    if verifier.key_hash.hex() != hash_hex:
        raise VerifierKeyError("the verifier key hash does not match the key")
    return verifier


def format_checkpoint(origin: str, size: int, root: bytes) -> str:
    """Return the checkpoint body ``<origin>\\n<size>\\n<base64 root>\\n``."""
    checkpoint = Checkpoint(origin, size, root)
    encoded = base64.b64encode(checkpoint.root).decode()
    return f"{checkpoint.origin}\n{checkpoint.size}\n{encoded}\n"


def sign_note(text: str, signer: Signer, key_name: str) -> str:
    """Return ``text`` as a signed note with one Ed25519 signature by ``signer``."""
    _check_key_name(key_name, CheckpointError)
    _check_note_text(text)
    signature = signer.sign(text.encode())
    if len(signature) != SIGNATURE_SIZE:
        raise CheckpointError("the signer did not produce an Ed25519 signature")
    blob = key_hash(key_name, signer.public_key_bytes()) + signature
    return f"{text}\n{SIGNATURE_PREFIX}{key_name} {base64.b64encode(blob).decode()}\n"


def open_note(note_text: str, verifier_key: NoteVerifier | str) -> str:
    """Return the text of a signed note if ``verifier_key`` signed it."""
    verifier = parse_vkey(verifier_key) if isinstance(verifier_key, str) else verifier_key
    body, signatures = _split_note(note_text)
    verified = False
    for name, blob in signatures:
        if name != verifier.name or blob[:KEY_HASH_SIZE] != verifier.key_hash:
            # Signatures by other keys (witnesses, rotated keys) are allowed and ignored.
            continue
        if len(blob) != KEY_HASH_SIZE + SIGNATURE_SIZE or not verifier.verify(
            body.encode(), blob[KEY_HASH_SIZE:]
        ):
            raise UnverifiedNoteError("a signature by the expected key is invalid")
        verified = True
    if not verified:
        raise UnverifiedNoteError("the note carries no signature by the expected key")
    return body


def sign_checkpoint(origin: str, size: int, root: bytes, signer: Signer, key_name: str) -> str:
    """Return the signed note text of a checkpoint, signed by ``signer`` as ``key_name``."""
    return sign_note(format_checkpoint(origin, size, root), signer, key_name)


def parse_and_verify(note_text: str, verifier_key: NoteVerifier | str) -> Checkpoint:
    """Parse a signed checkpoint note and return it if ``verifier_key`` signed it."""
    return _parse_body(open_note(note_text, verifier_key))


def _check_note_text(text: str) -> None:
    if not text.endswith("\n") or "\n\n" in text or text.startswith("\n"):
        raise NoteFormatError("a note text is non-empty lines, each ending in a newline")
    if _CONTROL_RE.search(text):
        raise NoteFormatError("a note text holds no control characters but newline")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise NoteFormatError("a note is valid UTF-8") from None


def _split_note(text: str) -> tuple[str, list[tuple[str, bytes]]]:
    if not text.endswith("\n"):
        raise NoteFormatError("a note ends with a newline")
    split = text.rfind("\n\n")
    if split < 0:
        raise NoteFormatError("a note has a blank line before its signatures")
    body, block = text[: split + 1], text[split + 2 :]
    _check_note_text(body)
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteFormatError(f"a note carries at most {MAX_SIGNATURES} signatures")
    signatures: list[tuple[str, bytes]] = []
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteFormatError("a signature line starts with an em dash and a space")
        fields = line[len(SIGNATURE_PREFIX) :].split(" ")
        if len(fields) != 2:
            raise NoteFormatError("a signature line is '\u2014 <name> <signature>'")
        name, encoded = fields
        _check_key_name(name, NoteFormatError)
        blob = _b64decode(encoded, NoteFormatError)
        if len(blob) <= KEY_HASH_SIZE:
            raise NoteFormatError("a signature holds a key hash and signature bytes")
        signatures.append((name, blob))
    return body, signatures


def _parse_body(body: str) -> Checkpoint:
    lines = body[:-1].split("\n")
    if len(lines) != 3:
        # Extension lines are optional in C2SP; this log never writes them, so none are taken.
        raise CheckpointFormatError("a checkpoint body is exactly origin, size and root lines")
    origin, size_text, root_text = lines
    if not _SIZE_RE.fullmatch(size_text):
        raise CheckpointFormatError("a tree size is a decimal without leading zeros")
    size = int(size_text)
    if size > _MAX_TREE_SIZE:
        raise CheckpointFormatError("a tree size fits in 64 bits")
    root = _b64decode(root_text, CheckpointFormatError)
    return Checkpoint(origin, size, root)


def _check_origin(origin: str, error: type[CheckpointError]) -> None:
    # C2SP recommends a schema-less URL; any Unicode space would make the line ambiguous.
    if not origin or any(c.isspace() or not c.isprintable() for c in origin):
        raise error("an origin is non-empty and has no spaces or control characters")


def _check_key_name(name: str, error: type[CheckpointError]) -> None:
    # C2SP: non-empty, no Unicode spaces and no plus sign (it delimits verifier keys).
    if not name or "+" in name or any(c.isspace() or not c.isprintable() for c in name):
        raise error("a key name is non-empty, without spaces or '+'")


def _b64decode(text: str, error: type[CheckpointError]) -> bytes:
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise error("not standard padded base64") from None
    if base64.b64encode(raw).decode() != text:
        raise error("not canonical base64")
    return raw
