"""Checkpoints and signed notes: round trips, tampering, wrong keys and strict parsing."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from audit_svc.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointFormatError,
    NoteFormatError,
    NoteVerifier,
    UnverifiedNoteError,
    VerifierKeyError,
    format_checkpoint,
    key_hash,
    open_note,
    parse_and_verify,
    parse_vkey,
    sign_checkpoint,
    sign_note,
    vkey_string,
)
from cabincrew.signing import Ed25519Signer

ORIGIN = "audit.cabincrew.example/log"
KEY_NAME = "audit.cabincrew.example"
ROOT = bytes(range(32))
B64_ROOT = base64.b64encode(ROOT).decode()
URLSAFE_ROOT = base64.urlsafe_b64encode(bytes([0xFF]) * 32).decode()

# The example key and note of golang.org/x/mod/sumdb/note, used by every implementation.
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_SKEY_SEED = "AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_TEXT = (
    "If you think cryptography is the answer to your problem,\n"
    "then you don't know what your problem is.\n"
)
GO_NOTE = (
    GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZS"
    "NXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
)


@pytest.fixture(scope="module")
def signer() -> Ed25519Signer:
    return Ed25519Signer.generate()


@pytest.fixture(scope="module")
def vkey(signer: Ed25519Signer) -> str:
    return vkey_string(KEY_NAME, signer.public_key_bytes())


def test_checkpoint_body_is_origin_size_and_base64_root() -> None:
    body = format_checkpoint(ORIGIN, 42, ROOT)
    assert body == f"{ORIGIN}\n42\n{B64_ROOT}\n"


def test_a_signed_checkpoint_round_trips(signer: Ed25519Signer, vkey: str) -> None:
    note = sign_checkpoint(ORIGIN, 42, ROOT, signer, KEY_NAME)
    assert note.startswith(format_checkpoint(ORIGIN, 42, ROOT) + "\n\u2014 " + KEY_NAME + " ")
    assert parse_and_verify(note, vkey) == Checkpoint(ORIGIN, 42, ROOT)
    assert parse_and_verify(note, parse_vkey(vkey)) == Checkpoint(ORIGIN, 42, ROOT)


@settings(max_examples=30, deadline=None)
@given(
    st.text(alphabet=st.characters(categories=("L", "N", "P", "S")), min_size=1, max_size=40),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.binary(min_size=32, max_size=32),
)
def test_any_valid_checkpoint_round_trips(origin: str, size: int, root: bytes) -> None:
    signer = Ed25519Signer.generate()
    note = sign_checkpoint(origin, size, root, signer, KEY_NAME)
    verifier = NoteVerifier(KEY_NAME, signer.public_key_bytes())
    assert parse_and_verify(note, verifier) == Checkpoint(origin, size, root)


def test_the_go_reference_note_verifies_and_signing_reproduces_it() -> None:
    verifier = parse_vkey(GO_VKEY)
    assert verifier.name == "PeterNeumann"
    assert verifier.key_hash.hex() == "c74f20a3"
    assert verifier.vkey() == GO_VKEY
    assert open_note(GO_NOTE, GO_VKEY) == GO_TEXT
    seed = base64.b64decode(GO_SKEY_SEED)[1:]
    go_signer = Ed25519Signer(Ed25519PrivateKey.from_private_bytes(seed))
    assert go_signer.public_key_bytes() == verifier.public_key
    assert sign_note(GO_TEXT, go_signer, "PeterNeumann") == GO_NOTE


def test_a_tampered_body_is_rejected(signer: Ed25519Signer, vkey: str) -> None:
    note = sign_checkpoint(ORIGIN, 42, ROOT, signer, KEY_NAME)
    with pytest.raises(UnverifiedNoteError):
        parse_and_verify(note.replace("\n42\n", "\n43\n", 1), vkey)
    with pytest.raises(UnverifiedNoteError):
        parse_and_verify(note.replace(ORIGIN, ORIGIN + "x", 1), vkey)


def test_a_tampered_signature_is_rejected(signer: Ed25519Signer, vkey: str) -> None:
    note = sign_checkpoint(ORIGIN, 42, ROOT, signer, KEY_NAME)
    body, line = note.split("\n\n")
    blob = bytearray(base64.b64decode(line.split(" ")[2]))
    blob[-1] ^= 0x01
    forged = f"{body}\n\n\u2014 {KEY_NAME} {base64.b64encode(bytes(blob)).decode()}\n"
    with pytest.raises(UnverifiedNoteError):
        parse_and_verify(forged, vkey)


def test_a_note_signed_by_another_key_is_rejected(vkey: str) -> None:
    other = Ed25519Signer.generate()
    note = sign_checkpoint(ORIGIN, 42, ROOT, other, KEY_NAME)
    with pytest.raises(UnverifiedNoteError):
        parse_and_verify(note, vkey)
    with pytest.raises(UnverifiedNoteError):
        parse_and_verify(note, GO_VKEY)


def test_signatures_by_unknown_keys_are_ignored(signer: Ed25519Signer, vkey: str) -> None:
    note = sign_checkpoint(ORIGIN, 7, ROOT, signer, KEY_NAME)
    witness = Ed25519Signer.generate()
    cosigned = sign_checkpoint(ORIGIN, 7, ROOT, witness, "witness.example")
    extra_line = cosigned.split("\n\n")[1]
    assert parse_and_verify(note + extra_line, vkey).size == 7
    only_witness = format_checkpoint(ORIGIN, 7, ROOT) + "\n" + extra_line
    with pytest.raises(UnverifiedNoteError):
        parse_and_verify(only_witness, vkey)


def test_a_signature_with_the_right_key_hash_under_another_name_does_not_count(
    signer: Ed25519Signer, vkey: str
) -> None:
    note = sign_checkpoint(ORIGIN, 7, ROOT, signer, KEY_NAME)
    renamed = note.replace(f"\u2014 {KEY_NAME} ", "\u2014 someone-else ")
    with pytest.raises(UnverifiedNoteError):
        parse_and_verify(renamed, vkey)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda n: n[:-1], id="no-final-newline"),
        pytest.param(lambda n: n.replace("\n\n", "\n"), id="no-blank-line"),
        pytest.param(lambda n: n.replace("\u2014 ", "- "), id="hyphen-not-em-dash"),
        pytest.param(lambda n: n.replace("\u2014 ", "\u2014  "), id="double-space"),
        pytest.param(lambda n: n + "trailing\n", id="trailing-garbage-line"),
        pytest.param(lambda n: n + "\n", id="trailing-blank-line"),
        pytest.param(lambda n: n.replace("=\n", "\n"), id="unpadded-signature"),
        pytest.param(lambda n: n.replace("\n\n", "\n\x07\n"), id="control-character"),
        pytest.param(lambda n: "\n" + n, id="leading-blank-line"),
        pytest.param(lambda n: n.split("\n\n")[0] + "\n\n", id="no-signatures"),
        pytest.param(lambda n: "", id="empty"),
    ],
)
def test_malformed_notes_are_rejected_with_a_format_error(
    signer: Ed25519Signer, vkey: str, mangle: object
) -> None:
    note = sign_checkpoint(ORIGIN, 42, ROOT, signer, KEY_NAME)
    assert callable(mangle)
    with pytest.raises(NoteFormatError):
        parse_and_verify(mangle(note), vkey)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(f"{ORIGIN}\n042\n{B64_ROOT}\n", id="leading-zero"),
        pytest.param(f"{ORIGIN}\n-1\n{B64_ROOT}\n", id="negative"),
        pytest.param(f"{ORIGIN}\n+1\n{B64_ROOT}\n", id="plus-sign"),
        pytest.param(f"{ORIGIN}\n{2**64}\n{B64_ROOT}\n", id="over-64-bit"),
        pytest.param(f"{ORIGIN}\n1\n{B64_ROOT[:-4]}\n", id="short-root"),
        pytest.param(f"{ORIGIN}\n1\n{URLSAFE_ROOT}\n", id="url-b64"),
        pytest.param(f"{ORIGIN}\n1\n", id="missing-root"),
        pytest.param(f"{ORIGIN}\n1\n{B64_ROOT}\nextension\n", id="extension"),
        pytest.param(f" {ORIGIN}\n1\n{B64_ROOT}\n", id="padded-origin"),
    ],
)
def test_malformed_checkpoint_bodies_are_rejected_even_when_signed(
    signer: Ed25519Signer, vkey: str, body: str
) -> None:
    note = sign_note(body, signer, KEY_NAME)
    with pytest.raises(CheckpointFormatError):
        parse_and_verify(note, vkey)


def test_invalid_checkpoints_cannot_be_formatted_or_signed(signer: Ed25519Signer) -> None:
    with pytest.raises(CheckpointFormatError):
        format_checkpoint("", 1, ROOT)
    with pytest.raises(CheckpointFormatError):
        format_checkpoint("two\nlines", 1, ROOT)
    with pytest.raises(CheckpointFormatError):
        format_checkpoint("with space", 1, ROOT)
    with pytest.raises(CheckpointFormatError):
        format_checkpoint(ORIGIN, -1, ROOT)
    with pytest.raises(CheckpointFormatError):
        format_checkpoint(ORIGIN, 1, ROOT[:16])
    with pytest.raises(CheckpointError):
        sign_checkpoint(ORIGIN, 1, ROOT, signer, "has space")
    with pytest.raises(CheckpointError):
        sign_checkpoint(ORIGIN, 1, ROOT, signer, "has+plus")


def test_verifier_key_hash_is_sha256_of_name_newline_algorithm_and_key() -> None:
    verifier = parse_vkey(GO_VKEY)
    assert key_hash("PeterNeumann", verifier.public_key) == bytes.fromhex("c74f20a3")
    assert vkey_string("PeterNeumann", verifier.public_key) == GO_VKEY


@pytest.mark.parametrize(
    "vkey",
    [
        pytest.param(
            "PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", id="hash"
        ),
        pytest.param(
            "PeterNeumanm+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", id="name"
        ),
        pytest.param("PeterNeumann+c74f20a3+AhpcQcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", id="alg"),
        pytest.param("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10", id="b64"),
        pytest.param(
            "PeterNeumann+C74F20A3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", id="upper"
        ),
        pytest.param("PeterNeumann+c74f20a3", id="two-parts"),
        pytest.param("+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", id="no-name"),
        pytest.param(
            "Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", id="sp"
        ),
    ],
)
def test_malformed_verifier_keys_are_rejected(vkey: str) -> None:
    with pytest.raises(VerifierKeyError):
        parse_vkey(vkey)


def test_every_truncation_of_a_verifier_key_is_rejected() -> None:
    for end in range(len(GO_VKEY)):
        with pytest.raises(VerifierKeyError):
            parse_vkey(GO_VKEY[:end])


def test_a_verifier_key_whose_base64_holds_a_plus_sign_parses() -> None:
    seed = 0
    while True:
        key = Ed25519PrivateKey.from_private_bytes(seed.to_bytes(32, "big"))
        signer = Ed25519Signer(key)
        vkey = vkey_string(KEY_NAME, signer.public_key_bytes())
        if "+" in vkey.split("+", 2)[2]:
            break
        seed += 1
    assert parse_vkey(vkey).public_key == signer.public_key_bytes()
    note = sign_checkpoint(ORIGIN, 1, ROOT, signer, KEY_NAME)
    assert parse_and_verify(note, vkey).size == 1
