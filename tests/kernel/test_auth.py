import pytest

from cabincrew.auth import TokenVerifier, issue_token, parse_duration
from cabincrew.errors import InvalidArgument, Unauthenticated
from cabincrew.signing import Ed25519Signer


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer.generate()


def test_an_issued_token_verifies_to_its_principal_and_roles(signer: Ed25519Signer) -> None:
    token = issue_token(signer, "alice", ["approver", "release-manager"], now=1000, ttl_seconds=60)
    principal = TokenVerifier({signer.key_id: signer.public_key_bytes()}).verify(token, now=1030)
    assert principal.name == "alice"
    assert principal.roles == {"approver", "release-manager"}
    assert principal.authenticated


def test_expired_tokens_are_refused(signer: Ed25519Signer) -> None:
    token = issue_token(signer, "alice", [], now=1000, ttl_seconds=60)
    with pytest.raises(Unauthenticated):
        TokenVerifier({signer.key_id: signer.public_key_bytes()}).verify(token, now=1061)


def test_a_remembered_token_still_expires(signer: Ed25519Signer) -> None:
    token = issue_token(signer, "alice", ["viewer"], now=1000, ttl_seconds=60)
    verifier = TokenVerifier({signer.key_id: signer.public_key_bytes()})
    assert verifier.verify(token, now=1010).name == "alice"
    assert verifier.verify(token, now=1059).name == "alice"  # from the cache
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(token, now=1060)
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.verify(token, now=1061)  # forgotten, checked in full again: expired


def test_a_forgery_of_a_remembered_token_is_still_refused(signer: Ed25519Signer) -> None:
    token = issue_token(signer, "alice", ["viewer"])
    verifier = TokenVerifier({signer.key_id: signer.public_key_bytes()})
    verifier.verify(token)
    prefix, payload, sig = token.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    with pytest.raises(Unauthenticated):
        verifier.verify(f"{prefix}.{payload}.{flipped}")


def test_tokens_for_another_audience_are_refused(signer: Ed25519Signer) -> None:
    token = issue_token(signer, "alice", [], audience="other")
    with pytest.raises(Unauthenticated):
        TokenVerifier({signer.key_id: signer.public_key_bytes()}).verify(token)


def test_tokens_from_an_untrusted_key_are_refused(signer: Ed25519Signer) -> None:
    other = Ed25519Signer.generate()
    token = issue_token(other, "mallory", ["admin"])
    with pytest.raises(Unauthenticated):
        TokenVerifier({signer.key_id: signer.public_key_bytes()}).verify(token)


def test_a_tampered_payload_is_refused(signer: Ed25519Signer) -> None:
    import base64
    import json

    token = issue_token(signer, "alice", ["viewer"])
    prefix, payload, sig = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(payload + "=="))
    doc["roles"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()
    with pytest.raises(Unauthenticated):
        TokenVerifier({signer.key_id: signer.public_key_bytes()}).verify(f"{prefix}.{forged}.{sig}")


@pytest.mark.parametrize("garbage", ["", "a.b", "cc1.!!.x", "cc1.e30.AAAA", "Bearer x"])
def test_garbage_tokens_are_refused(signer: Ed25519Signer, garbage: str) -> None:
    with pytest.raises(Unauthenticated):
        TokenVerifier({signer.key_id: signer.public_key_bytes()}).verify(garbage)


def test_invalid_principal_names_and_roles_cannot_be_issued(signer: Ed25519Signer) -> None:
    with pytest.raises(InvalidArgument):
        issue_token(signer, "bad name", [])
    with pytest.raises(InvalidArgument):
        issue_token(signer, "alice", ["Bad Role"])


def test_durations_parse_with_units() -> None:
    assert parse_duration("90s") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("8h") == 28800
    assert parse_duration("2d") == 172800
    with pytest.raises(InvalidArgument):
        parse_duration("soon")
