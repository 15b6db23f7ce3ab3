"""The policy input document: builders, derived fields and schema validation."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from cabincrew.canonical import sha256_hex
from preflight_svc.errors import PolicyInputError
from preflight_svc.policy_input import (
    ArtifactInput,
    ChangeStats,
    PolicyContext,
    SecretFinding,
    build_content_input,
    build_preflight_input,
    compute_change_stats,
    extract_texts,
    normalize_workspace_path,
    policy_domain,
    validate_policy_input,
)

RECEIPT = {
    "protocol_version": "1",
    "engine_id": "file-patch",
    "mode": "flight-plan",
    "receipt_id": "r-1",
    "status": "success",
}


def artifact(
    name: str = "a",
    *,
    action: str = "update",
    target: str | None = "src/app.py",
    body: bytes | None = b"print('hi')\n",
    artifact_type: str = "file",
    mime: str = "text/x-python",
) -> ArtifactInput:
    document: dict[str, Any] = {"artifact_type": artifact_type, "action": action, "mime": mime}
    if target is not None:
        document["target"] = target
    size = len(body) if body is not None else 0
    return ArtifactInput(name, "evidence", name, "0" * 64, size, document, body)


def preflight(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "workflow_id": "wf-1",
        "step_id": "step-1",
        "mode": "flight-plan",
        "receipt": RECEIPT,
        "artifacts": [artifact()],
        "context": PolicyContext(environment="dev", workspace_root="/w"),
    }
    arguments.update(overrides)
    return build_preflight_input(**arguments)


def test_a_built_preflight_document_is_valid() -> None:
    document = preflight(
        plan_token={"token": "t", "version": "1"},
        secrets_found=[SecretFinding("aws_access_key", artifact="a", line=3)],
    )
    validate_policy_input(document)
    assert policy_domain(document) == "preflight"
    (entry,) = document["artifacts"]
    assert entry["body_text"] == "print('hi')\n"
    assert entry["body_sha256"] == sha256_hex(b"print('hi')\n")
    assert entry["body_truncated"] is False
    assert (entry["target_normalized"], entry["target_in_workspace"]) == ("src/app.py", True)
    assert document["stats"]["secrets_found"] == [
        {"kind": "aws_access_key", "artifact": "a", "line": 3}
    ]


def test_a_long_text_body_is_cut_at_the_limit_and_marked_truncated() -> None:
    body = ("é" * 100).encode()
    (entry,) = preflight(artifacts=[artifact(body=body)], body_text_limit=51)["artifacts"]
    assert entry["body_truncated"] is True
    assert entry["body_text"] == "é" * 25
    assert entry["body_sha256"] == sha256_hex(body)


def test_a_binary_body_has_no_text_but_keeps_its_hash() -> None:
    (entry,) = preflight(artifacts=[artifact(body=b"\x89PNG\x00\x01")])["artifacts"]
    assert "body_text" not in entry
    assert entry["body_sha256"] == sha256_hex(b"\x89PNG\x00\x01")


def test_an_inline_body_in_artifact_json_is_used_when_there_is_no_body_file() -> None:
    item = ArtifactInput(
        "a",
        "state",
        "a",
        "0" * 64,
        5,
        {"artifact_type": "note", "action": "create", "mime": "text/plain", "body": "hello"},
    )
    (entry,) = preflight(artifacts=[item])["artifacts"]
    assert entry["body_text"] == "hello"
    assert "body" not in entry["artifact"]


def test_a_target_outside_the_workspace_is_flagged_by_the_builder() -> None:
    (entry,) = preflight(artifacts=[artifact(target="src/../../etc/passwd")])["artifacts"]
    assert entry["target_in_workspace"] is False


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("src/a.py", ("src/a.py", True)),
        ("./src/../a.py", ("a.py", True)),
        ("/w/src/a.py", ("src/a.py", True)),
        ("/w", (".", True)),
        ("file:///w/x", ("x", True)),
        ("src\\..\\a.py", ("a.py", True)),
        ("../x", ("../x", False)),
        ("/etc/passwd", ("/etc/passwd", False)),
        ("/w/../etc", ("/etc", False)),
        ("/workspace2/a", ("/workspace2/a", False)),
        ("~/.ssh/id_rsa", ("~/.ssh/id_rsa", False)),
        ("C:\\Windows\\x", ("C:/Windows/x", False)),
        ("a\x00b", ("a\x00b", False)),
        ("", ("", False)),
    ],
)
def test_paths_are_normalised_lexically_against_the_workspace(
    raw: str, expected: tuple[str, bool]
) -> None:
    assert normalize_workspace_path(raw, "/w") == expected


def test_change_stats_count_deletions_and_diff_lines() -> None:
    diff = (
        b"--- a/old.txt\n+++ /dev/null\n@@ -1,2 +0,0 @@\n-one\n-two\n"
        b"--- a/src/x.py\n+++ b/src/x.py\n@@ -1 +1,2 @@\n-a\n+b\n+c\n"
    )
    items = [
        artifact("d1", action="delete", target="gone.py", body=None),
        artifact(
            "p", action="apply", target=None, body=diff, artifact_type="diff", mime="text/x-diff"
        ),
        artifact("n", action="create", target="new.py", body=b"1\n2\n3\n"),
        artifact("log", action="record", target=None, body=b"x", artifact_type="log"),
    ]
    assert compute_change_stats(items) == ChangeStats(
        files_deleted=2, files_changed=4, lines_added=5, lines_removed=3
    )


def test_explicit_stats_replace_the_computed_ones() -> None:
    document = preflight(stats=ChangeStats(files_deleted=50, files_changed=50))
    assert document["stats"]["files_deleted"] == 50


def test_negative_stats_are_refused() -> None:
    with pytest.raises(ValueError):
        ChangeStats(files_deleted=-1)


def test_an_mcp_request_gets_its_tool_and_path_arguments() -> None:
    payload = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {
            "name": "move_file",
            "arguments": {"source": "a.txt", "destination": "../b.txt", "note": "x\ny"},
        },
    }
    document = build_content_input(
        domain="mcp", phase="request", payload=payload, context={"workspace_root": "/w"}
    )
    validate_policy_input(document)
    assert policy_domain(document) == "mcp"
    assert document["tool"] == "move_file"
    assert [(p["raw"], p["in_workspace"]) for p in document["paths"]] == [
        ("a.txt", True),
        ("../b.txt", False),
    ]
    assert "x\ny" in document["texts"]


def test_an_mcp_resource_uri_is_a_path_to_check() -> None:
    payload = {"method": "resources/read", "params": {"uri": "file:///etc/shadow"}}
    document = build_content_input(
        domain="mcp", phase="request", payload=payload, context={"workspace_root": "/w"}
    )
    assert document["paths"][0]["in_workspace"] is False


def test_llm_texts_come_from_messages_and_choices() -> None:
    request = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        ],
    }
    assert extract_texts("llm", "request", request) == ["be brief", "hello"]
    response = {
        "choices": [
            {"message": {"content": "hi", "tool_calls": [{"function": {"arguments": "{}"}}]}}
        ]
    }
    assert extract_texts("llm", "response", response) == ["hi", "{}"]


def test_content_texts_are_cut_and_marked_when_too_long() -> None:
    document = build_content_input(
        domain="llm", phase="response", payload={}, context={}, texts=["abcdef"], text_limit=3
    )
    assert document["texts"] == ["abc"]
    assert document["texts_truncated"] is True


def test_an_unknown_content_domain_is_refused() -> None:
    with pytest.raises(ValueError):
        build_content_input(domain="sql", phase="request", payload={}, context={})  # type: ignore[arg-type]


def _broken(document: dict[str, Any], path: list[str | int], value: Any) -> dict[str, Any]:
    broken = copy.deepcopy(document)
    target: Any = broken
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return broken


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["kind"], "other"),
        (["mode"], "landing"),
        (["workflow_id"], KeyError),
        (["stats"], KeyError),
        (["stats", "files_deleted"], -1),
        (["stats", "secrets_found"], [{"value": "AKIA..."}]),
        (["artifacts", 0, "role"], "secret"),
        (["artifacts", 0, "size"], "big"),
        (["artifacts", 0, "artifact", "action"], KeyError),
        (["artifacts", 0, "body_sha256"], "not-a-hash"),
        (["context", "labels"], {"team": 1}),
        (["receipt"], "ok"),
        (["unexpected"], 1),
    ],
)
def test_the_schema_rejects_bad_preflight_documents(path: list[str | int], value: Any) -> None:
    with pytest.raises(PolicyInputError) as caught:
        validate_policy_input(_broken(preflight(), path, value))
    assert caught.value.violations


def test_schema_errors_do_not_echo_the_offending_value() -> None:
    document = _broken(preflight(), ["artifacts", 0, "size"], "sk-live-very-secret")
    with pytest.raises(PolicyInputError) as caught:
        validate_policy_input(document)
    assert "sk-live-very-secret" not in str(caught.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [("domain", "sql"), ("phase", "during"), ("texts", "one"), ("payload", KeyError)],
)
def test_the_schema_rejects_bad_content_documents(key: str, value: Any) -> None:
    document = build_content_input(domain="llm", phase="request", payload={}, context={})
    with pytest.raises(PolicyInputError):
        validate_policy_input(_broken(document, [key], value))


def test_a_document_that_is_not_an_object_is_rejected() -> None:
    with pytest.raises(PolicyInputError):
        validate_policy_input([])
