"""Signed decision records: signing, and verification that needs nothing but the public key.

A record's signature is Ed25519 over the RFC 8785 canonical JSON of ``{approval_id,
approved, reason, approver, approver_roles, decided_at, subject_hash}`` (roles sorted,
``decided_at`` as RFC 3339 UTC with six fractional digits). The orchestrator, the gateways
and ``cabincrew approvals verify`` call ``verify_record`` / ``verify_approval`` offline.

Only the records are signed, not the approval around them: a verifier must compare the
approval's ``subject_hash``, ``quorum`` and ``required_role`` with what it asked for;
``verify_approval`` then checks that the signed records justify the claimed state.
"""

from __future__ import annotations

import dataclasses

from approval_svc.model import Approval, DecisionRecord, State
from cabincrew.canonical import canonical_json
from cabincrew.signing import Signer, key_id_for, verify


def record_bytes(record: DecisionRecord) -> bytes:
    """The exact bytes a record's signature covers."""
    return canonical_json(record.signed_payload())


def sign_record(record: DecisionRecord, signer: Signer) -> DecisionRecord:
    """``record`` with its signature and the signing key's id."""
    return dataclasses.replace(
        record, signature=signer.sign(record_bytes(record)), key_id=signer.key_id
    )


def verify_record(record: DecisionRecord, public_key: bytes) -> bool:
    """Whether ``record`` was signed, unchanged, by the key ``public_key`` (raw Ed25519)."""
    if record.key_id != key_id_for(public_key):
        return False
    return verify(public_key, record_bytes(record), record.signature)


def verify_approval(approval: Approval, public_key: bytes) -> list[str]:
    """Problems with ``approval``'s records (an empty list means they all hold).

    Checks every signature, that each record is about this approval and its subject, that
    approvers are distinct, are not the requester and held the required role, and that the
    valid records justify the approval's state (``quorum`` approvals for approved or
    consumed, a rejection for rejected).
    """
    problems: list[str] = []
    seen: set[str] = set()
    approvers: set[str] = set()
    rejected = False
    for index, record in enumerate(approval.decisions):
        where = f"decision {index + 1} ({record.approver or 'unknown approver'})"
        if not verify_record(record, public_key):
            problems.append(f"{where}: signature does not verify against key {_kid(public_key)}")
            continue
        if record.approval_id != approval.approval_id:
            problems.append(f"{where}: signed for another approval ({record.approval_id})")
            continue
        if record.subject_hash != approval.subject_hash:
            problems.append(f"{where}: signed for another subject hash")
            continue
        if record.approver in seen:
            problems.append(f"{where}: the approver answered twice")
            continue
        seen.add(record.approver)
        if record.approver in (approval.requester, approval.created_by):
            problems.append(f"{where}: the requester answered their own request")
            continue
        roles = set(record.approver_roles)
        if approval.required_role not in roles and "admin" not in roles:
            problems.append(f"{where}: approver lacked the role {approval.required_role!r}")
            continue
        if record.approved:
            approvers.add(record.approver)
        else:
            rejected = True
    if approval.state in (State.APPROVED, State.CONSUMED):
        if rejected:
            problems.append(f"state is {approval.state.value} but a valid record rejects")
        if len(approvers) < approval.quorum:
            problems.append(
                f"state is {approval.state.value} but only {len(approvers)} of "
                f"{approval.quorum} required approvals verify"
            )
    if approval.state is State.REJECTED and not rejected:
        problems.append("state is rejected but no valid record rejects")
    return problems


def _kid(public_key: bytes) -> str:
    return key_id_for(public_key) if len(public_key) == 32 else "(malformed key)"
