"""Secret redaction: every rule finds its own examples, nothing leaks, few false positives."""

from __future__ import annotations

import copy
import itertools
import json
import random
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cabincrew.redaction import (
    RULE_IDS,
    RULES,
    SENSITIVE_FIELD_RULE,
    Example,
    Finding,
    find_secrets,
    generate_example,
    generate_labeled_example,
    redact_json,
    redact_text,
    shannon_entropy,
)

SEEDS = st.integers(min_value=0, max_value=2**32 - 1)
STDLIB_FILES = (
    "urllib/request.py",
    "urllib/parse.py",
    "http/client.py",
    "http/cookies.py",
    "smtplib.py",
    "ftplib.py",
    "imaplib.py",
    "poplib.py",
    "netrc.py",
    "getpass.py",
    "hmac.py",
    "secrets.py",
    "ssl.py",
    "configparser.py",
    "tokenize.py",
    "base64.py",
    "email/utils.py",
    "logging/handlers.py",
)


def _leaks(secret: str, output: str) -> bool:
    """Whether any 12-character window of the secret (or all of a shorter one) survived."""
    width = min(12, len(secret))
    return any(secret[i : i + width] in output for i in range(len(secret) - width + 1))


def _covers(findings: list[Finding], example: Example, offset: int = 0) -> bool:
    return any(
        f.rule_id == example.rule_id
        and f.start <= example.start + offset
        and f.end >= example.end + offset
        for f in findings
    )


def test_rule_ids_are_unique_and_enumerable() -> None:
    assert len(set(RULE_IDS)) == len(RULES) == len(RULE_IDS)
    assert SENSITIVE_FIELD_RULE not in RULE_IDS
    for rule in RULES:
        assert rule.keywords
        assert rule.description


@settings(max_examples=40, deadline=None)
@given(SEEDS)
def test_every_rule_detects_its_generated_examples(seed: int) -> None:
    rng = random.Random(seed)
    for rule_id in RULE_IDS:
        example = generate_labeled_example(rule_id, rng)
        assert example.rule_id == rule_id
        assert _covers(find_secrets(example.text), example), example.text


@settings(max_examples=20, deadline=None)
@given(SEEDS)
def test_every_rule_detects_its_examples_inside_surrounding_text(seed: int) -> None:
    rng = random.Random(seed)
    prefix = "# settings for the deploy step\nregion: eu-west-1\n"
    for rule_id in RULE_IDS:
        example = generate_labeled_example(rule_id, rng)
        text = f"{prefix}{example.text}\nretries: 3\n"
        assert _covers(find_secrets(text), example, len(prefix)), text


@settings(max_examples=30, deadline=None)
@given(SEEDS)
def test_no_part_of_a_generated_secret_survives_redaction(seed: int) -> None:
    rng = random.Random(seed)
    for rule_id in RULE_IDS:
        example = generate_labeled_example(rule_id, rng)
        redacted, count = redact_text(example.text)
        assert count >= 1
        assert f"[REDACTED:{rule_id}]" in redacted
        assert not _leaks(example.secret, redacted), redacted


@settings(max_examples=15, deadline=None)
@given(SEEDS)
def test_canary_values_never_survive_redact_json(seed: int) -> None:
    rng = random.Random(seed)
    canaries = [generate_labeled_example(rule_id, rng) for rule_id in RULE_IDS]
    document: dict[str, Any] = {
        "event_type": "mcp_gateway.request_denied",
        "values": {f"field_{i}": c.text for i, c in enumerate(canaries)},
        "list": [[c.text, 1, None, True] for c in canaries],
        "prose": [f"the tool printed {c.text} and exited" for c in canaries],
        "headers": {"Authorization": "hunter2", "x-api-key": "k1", "GITHUB_TOKEN": "plain"},
        "env": {"password": "correct horse", "DB_PASSWORD": "s3cret!"},
    }
    before = copy.deepcopy(document)
    redacted, count = redact_json(document)
    assert document == before
    output = json.dumps(redacted)
    for canary in canaries:
        assert not _leaks(canary.secret, output), canary.rule_id
    for plain in ("hunter2", "correct horse", "s3cret!", "plain"):
        assert plain not in output
    assert count >= 3 * len(canaries) + 5


@settings(max_examples=30, deadline=None)
@given(SEEDS, st.data())
def test_redaction_count_is_exact(seed: int, data: st.DataObject) -> None:
    rng = random.Random(seed)
    chosen = data.draw(st.lists(st.sampled_from(RULE_IDS), max_size=8))
    examples = [generate_labeled_example(rule_id, rng) for rule_id in chosen]
    text = "\n-- next --\n".join(["start", *(e.text for e in examples), "end"])
    redacted, count = redact_text(text)
    assert count == len(examples)
    assert redacted.count("[REDACTED:") == len(examples)
    assert [f.rule_id for f in find_secrets(text)] == chosen
    nested, nested_count = redact_json({"a": [text, {"b": text}], "c": 5})
    assert nested_count == 2 * len(examples)
    assert nested == {"a": [redacted, {"b": redacted}], "c": 5}


@settings(max_examples=20, deadline=None)
@given(SEEDS)
def test_redacting_twice_changes_nothing_more(seed: int) -> None:
    rng = random.Random(seed)
    text = "\n".join(generate_example(rule_id, rng) for rule_id in RULE_IDS)
    once, _ = redact_text(text)
    assert redact_text(once) == (once, 0)
    document, _ = redact_json({"password": "x1", "v": [text]})
    assert redact_json(document) == (document, 0)


def test_findings_are_disjoint_and_ordered() -> None:
    rng = random.Random(7)
    text = " ".join(generate_example(rule_id, rng) for rule_id in RULE_IDS)
    findings = find_secrets(text)
    for before, after in itertools.pairwise(findings):
        assert before.end <= after.start


def test_redact_json_keeps_keys_and_non_string_values() -> None:
    token = generate_labeled_example("github-pat", random.Random(1)).secret
    value = {token: [1, 2.5, None, False, {"n": 3}], "t": (token, "ok")}
    redacted, count = redact_json(value)
    assert count == 1
    assert list(redacted) == [token, "t"]
    assert redacted[token] == [1, 2.5, None, False, {"n": 3}]
    assert redacted["t"] == ("[REDACTED:github-pat]", "ok")


def test_sensitive_fields_are_redacted_whole_but_public_hashes_are_kept() -> None:
    digest = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    event = {
        "plan_token": {"token": digest, "version": "1"},
        "plan_token_hash": digest,
        "policy_digest": f"sha256:{digest}",
        "commit": digest[:40],
        "workflow_id": "5f0c8a1e-3b7d-4c62-9d1e-2a8f6b4c0e17",
        "password": "hunter2",
        "Authorization": "Basic Zm9vOmJhcg==",
        "client_secret": "",
    }
    redacted, count = redact_json(event)
    assert count == 2
    assert redacted["password"] == redacted["Authorization"] == f"[REDACTED:{SENSITIVE_FIELD_RULE}]"
    assert redacted["client_secret"] == ""
    for key in ("plan_token", "plan_token_hash", "policy_digest", "commit", "workflow_id"):
        assert redacted[key] == event[key]


@pytest.mark.parametrize(
    "text",
    [
        "postgres://user:${DB_PASSWORD}@db:5432/app",
        "redis://:{password}@cache:6379/0",
        "https://user:password@example.com/",
        'password = "<your-password-here>"',
        "api_key = '%s'",
        'token = "********************"',
        "token_type = 'BearerTokenTypeX9'",
        "secret_name = 'prod/db/Credentials2'",
        "key_file = '/etc/ssl/private/server.key'",
        "AUTH_URL=https://login.example.com/oauth2/token",
        "sk-learn-is-a-library",
        "The bearer of this letter is trusted.",
        "-----BEGIN PRIVATE KEY-----",
    ],
)
def test_placeholders_and_look_alikes_are_not_secrets(text: str) -> None:
    assert find_secrets(text) == []


def test_strings_shorter_than_any_secret_are_left_alone() -> None:
    for text in ("", "allow", "ghp_", "sk-ant-"):
        assert redact_text(text) == (text, 0)


def test_ordinary_python_source_has_at_most_one_percent_false_positives() -> None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in STDLIB_FILES if (stdlib / name).is_file()]
    if len(files) < len(STDLIB_FILES) // 2:
        pytest.skip(f"Python standard library sources not found under {stdlib}")
    lines = findings = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        lines += text.count("\n") + 1
        findings += len(find_secrets(text))
    assert lines > 10_000
    assert findings / lines <= 0.01


def test_generated_examples_are_reproducible_from_the_seed() -> None:
    for rule_id in RULE_IDS:
        first = generate_example(rule_id, random.Random(42))
        assert first == generate_example(rule_id, random.Random(42))
        assert first != generate_example(rule_id, random.Random(43))


def test_an_unknown_rule_has_no_examples() -> None:
    with pytest.raises(ValueError):
        generate_example("no-such-rule", random.Random(0))


def test_entropy_is_zero_for_repetition_and_high_for_random_text() -> None:
    assert shannon_entropy("") == 0.0
    assert shannon_entropy("aaaaaaaa") == 0.0
    assert shannon_entropy("abcdefgh") == pytest.approx(3.0)


_keyword_texts = st.lists(
    st.one_of(
        st.text(max_size=8),
        st.sampled_from(sorted({k for rule in RULES for k in rule.keywords})),
        st.sampled_from(["AKIA", "Token", "PASSWORD=", "\u0130", "ghp_", "-----BEGIN"]),
    ),
    max_size=4,
).map(" ".join)


@settings(max_examples=500, deadline=None)
@given(_keyword_texts)
def test_the_keyword_screen_skips_only_texts_no_rule_would_look_at(text: str) -> None:
    from cabincrew.redaction import _KEYWORD_RULES, _KEYWORDS, _candidate_rules

    lowered = text.lower()
    present = [k for k in _KEYWORD_RULES if k in lowered]
    assert (_KEYWORDS.search(lowered) is not None) == bool(present)
    expected = list(dict.fromkeys(r for k in present for r in _KEYWORD_RULES[k]))
    assert _candidate_rules(text) == expected
