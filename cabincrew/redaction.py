"""Secret detection and redaction for everything that is logged, audited or forwarded.

Each rule is a regular expression with lowercase keywords: a rule runs only when one of its
keywords occurs in the text, so the common case (short strings with no keyword) costs one
``str.lower`` and a few substring searches. A rule may name a ``secret`` group, which is
what gets measured for entropy and redacted; otherwise the whole match is.

Findings that overlap are merged into one span, labelled with the most specific rule (the
earliest in ``RULES``), so no character of any secret survives redaction and the redaction
count is the number of disjoint spans replaced.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

REDACTION_FORMAT = "[REDACTED:{rule_id}]"
SENSITIVE_FIELD_RULE = "sensitive-field"

_REDACTED_RE = re.compile(r"\[REDACTED:[a-z0-9-]+\]")
# No rule can match fewer characters than this, so shorter strings skip every rule.
_MIN_SECRET_TEXT = 8


@dataclass(frozen=True)
class Finding:
    """One secret found in a text: the rule that found it and its span."""

    rule_id: str
    start: int
    end: int


@dataclass(frozen=True)
class Rule:
    """A secret detector: pattern, keyword pre-filter, entropy floor and extra checks."""

    id: str
    description: str
    pattern: re.Pattern[str]
    keywords: tuple[str, ...]
    entropy: float | None = None
    validate: Callable[[re.Match[str]], bool] | None = None

    def __post_init__(self) -> None:
        if not self.keywords or any(k != k.lower() or not k for k in self.keywords):
            raise ValueError(f"rule {self.id}: keywords must be non-empty lowercase strings")

    def findings(self, text: str) -> list[Finding]:
        """Return every match of this rule in ``text`` that passes its checks."""
        found: list[Finding] = []
        group = "secret" if "secret" in self.pattern.groupindex else 0
        for match in self.pattern.finditer(text):
            secret = match.group(group)
            if not secret or _REDACTED_RE.search(secret):
                continue
            if self.entropy is not None and shannon_entropy(secret) < self.entropy:
                continue
            if self.validate is not None and not self.validate(match):
                continue
            found.append(Finding(self.id, match.start(group), match.end(group)))
        return found


@dataclass(frozen=True)
class Example:
    """A generated credential in context: ``text[start:end]`` is the secret."""

    rule_id: str
    text: str
    start: int
    end: int

    @property
    def secret(self) -> str:
        """The secret part of the text."""
        return self.text[self.start : self.end]


def shannon_entropy(value: str) -> float:
    """Return the Shannon entropy of ``value`` in bits per character."""
    if not value:
        return 0.0
    size = len(value)
    return -sum(n / size * math.log2(n / size) for n in Counter(value).values())


# Values that stand for a secret rather than being one: templates, format strings, masks.
_PLACEHOLDER_RE = re.compile(
    r"""(?x)
    \$\{[^}]*\} | \$[A-Z_][A-Z0-9_]* | \$[a-z_][a-z0-9_]*   # ${VAR}, $VAR, $var
    | \{\{.*\}\} | \{[A-Za-z_][A-Za-z0-9_.]*\}   # {{ template }}, {python_format}
    | <[^>]*> | %s | %\([A-Za-z_]+\)s | %[A-Za-z_]+%
    | \*+ | [xX]+ | \.\.\.+ | [#_-]+
    | (?i:(?:your|my|the|some|dummy|fake|example|sample|test)[_-]?[a-z_-]*)
    | (?i:pass(?:word|wd)?|pwd|secret|changeme|redacted|none|null|undefined|token|key
    |api_?key|user(?:name)?|pw)
    """
)
_NAME_TAIL_RE = re.compile(
    r"(?i)(?:id|ids|hash|digest|checksum|fingerprint|sha\d*|name|names|type|types|path|file"
    r"|filename|url|uri|len|length|size|count|prefix|suffix|format|header|field|method|mode"
    r"|policy|algorithm|alg|version|env|var|class|cls|func|store|provider|kind|scheme|label"
    r"|hdr|email|mail|user|username|login|host|endpoint|dir|message|msg|text|description|title"
    r"|template|pattern|regex|style|color|colour|example|doc|docs)$"
)
_PATH_RE = re.compile(r"(?:\.{0,2}|~)/[\w.\-]+(?:/[\w.\-]+)+/?")


def _is_placeholder(value: str) -> bool:
    return _PLACEHOLDER_RE.fullmatch(value) is not None


def _char_classes(value: str) -> int:
    lower = upper = digit = other = False
    for char in value:
        if char.islower():
            lower = True
        elif char.isupper():
            upper = True
        elif char.isdigit():
            digit = True
        elif char not in "._-":
            other = True
    return lower + upper + digit + other


def _url_password_ok(match: re.Match[str]) -> bool:
    return not _is_placeholder(match.group("secret"))


def _generic_ok(match: re.Match[str]) -> bool:
    secret = match.group("secret")
    if _is_placeholder(secret) or "://" in secret or _PATH_RE.fullmatch(secret):
        return False
    if _NAME_TAIL_RE.search(match.group("tail")):
        return False
    return _char_classes(secret) >= 2


def _env_ok(match: re.Match[str]) -> bool:
    secret = match.group("secret")
    if _is_placeholder(secret) or _PATH_RE.fullmatch(secret):
        return False
    if _NAME_TAIL_RE.search(match.group("name")):
        return False
    return _char_classes(secret) >= 2


def _bearer_ok(match: re.Match[str]) -> bool:
    return _char_classes(match.group("secret")) >= 2


# An assignment operator between a name and a value, in code, YAML, JSON, TOML or shell.
_ASSIGN = r"""['"]?\s{0,4}(?:=|:=|:|=>|\?=|<-)\s{0,4}"""
_B64 = "A-Za-z0-9+/"
_GENERIC_VALUE = r"""(?P<q>['"`])(?P<secret>[^'"`\s\\]{%d,256})(?P=q)"""
_PEM_BODY = r"(?:[A-Za-z0-9+/=:,.\s-]|\\[nr])"
_PEM_LABEL = r"-----{kind}[ A-Z0-9]{{0,32}}PRIVATE KEY(?: BLOCK)?-----"

RULES: tuple[Rule, ...] = (
    Rule(
        "gcp-service-account-key",
        "Private key of a Google Cloud service-account JSON key file",
        re.compile(
            r'"private_key"\s*:\s*"(?P<secret>-----BEGIN (?:RSA )?PRIVATE KEY-----'
            r"(?:\\[nr]|[A-Za-z0-9+/=\s])+?-----END (?:RSA )?PRIVATE KEY-----(?:\\n)?)\""
        ),
        ("private_key",),
    ),
    Rule(
        "private-key",
        "PEM private key block (RSA, EC, DSA, OpenSSH, PKCS#8, PGP), also JSON-escaped",
        # Up to the END line whatever lies between (armor headers may hold any character);
        # without one, as far as base64 goes, so a truncated key is still covered.
        re.compile(
            _PEM_LABEL.format(kind="BEGIN")
            + r"(?:[\s\S]{32,16384}?"
            + _PEM_LABEL.format(kind="END")
            + "|"
            + _PEM_BODY
            + r"{32,}?(?!"
            + _PEM_BODY
            + r"))"
        ),
        ("private key",),
    ),
    Rule(
        "aws-access-key-id",
        "AWS access key id (long-term AKIA, temporary ASIA, and other IAM prefixes)",
        re.compile(
            r"\b(?:A3T[A-Z0-9]|AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)"
            r"[A-Z2-7]{16}\b"
        ),
        ("akia", "asia", "abia", "acca", "a3t", "agpa", "aida", "aroa", "anpa", "anva", "aipa"),
    ),
    Rule(
        "aws-secret-access-key",
        "AWS secret access key assigned to an AWS-named setting",
        re.compile(
            r"(?i)(?:aws[\w.\-]{0,32}?(?:secret|key)|secret_?access_?key)[\w.\-]{0,20}"
            + _ASSIGN
            + r"""['"]?(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"""
        ),
        ("aws", "secret_access_key", "secretaccesskey"),
        entropy=3.5,
    ),
    Rule(
        "gcp-api-key",
        "Google Cloud / Firebase API key",
        re.compile(r"\bAIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])"),
        ("aiza",),
    ),
    Rule(
        "azure-connection-string",
        "Key in an Azure Storage, Service Bus, Event Hubs or IoT Hub connection string",
        re.compile(
            r"(?i)\b(?:AccountKey|SharedAccessKey)\s*=\s*"
            rf"(?P<secret>[{_B64}]{{40,86}}={{0,2}})(?![{_B64}=])"
        ),
        ("accountkey", "sharedaccesskey"),
        entropy=3.5,
    ),
    Rule(
        "azure-storage-account-key",
        "Azure storage account key (88 base64 characters) assigned to a setting",
        re.compile(
            r"(?i)(?:azure|storage|account)[\w.\-]{0,30}?key[\w.\-]{0,10}"
            + _ASSIGN
            + rf"""['"]?(?P<secret>[{_B64}]{{86}}==)(?![{_B64}=])"""
        ),
        ("azure", "storage", "account"),
        entropy=4.0,
    ),
    Rule(
        "azure-client-secret",
        "Microsoft Entra ID (Azure AD) application client secret",
        re.compile(
            r"(?<![A-Za-z0-9_~.\-])[A-Za-z0-9_~.]{3}\dQ~[A-Za-z0-9_~.\-]{31,34}"
            r"(?![A-Za-z0-9_~.\-])"
        ),
        ("q~",),
        entropy=3.0,
    ),
    Rule(
        "github-pat",
        "GitHub classic personal access token",
        re.compile(r"\bghp_[A-Za-z0-9]{36,251}\b"),
        ("ghp_",),
    ),
    Rule(
        "github-oauth",
        "GitHub OAuth access token",
        re.compile(r"\bgho_[A-Za-z0-9]{36,251}\b"),
        ("gho_",),
    ),
    Rule(
        "github-app-token",
        "GitHub App user-to-server or server-to-server token",
        re.compile(r"\bgh[us]_[A-Za-z0-9]{36,251}\b"),
        ("ghu_", "ghs_"),
    ),
    Rule(
        "github-refresh-token",
        "GitHub refresh token",
        re.compile(r"\bghr_[A-Za-z0-9]{36,251}\b"),
        ("ghr_",),
    ),
    Rule(
        "github-fine-grained-pat",
        "GitHub fine-grained personal access token",
        re.compile(r"\bgithub_pat_[A-Za-z0-9_]{50,244}\b"),
        ("github_pat_",),
    ),
    Rule(
        "gitlab-token",
        "GitLab personal, project, deploy, runner, trigger or OAuth token",
        re.compile(
            r"\b(?:glpat|gldt|glrt|glptt|glcbt|glimt|glagent|gloas|glsoat|glft)-"
            r"[A-Za-z0-9_\-]{20}[A-Za-z0-9_\-.]{0,230}"
        ),
        (
            "glpat-",
            "gldt-",
            "glrt-",
            "glptt-",
            "glcbt-",
            "glimt-",
            "glagent-",
            "gloas-",
            "glsoat-",
            "glft-",
        ),
    ),
    Rule(
        "slack-token",
        "Slack bot, user, app, refresh or configuration token",
        re.compile(
            r"\bxox[abeoprs]-[0-9A-Za-z][0-9A-Za-z\-]{18,250}[0-9A-Za-z]"
            r"|\bxapp-\d-[A-Za-z0-9\-]{20,250}"
        ),
        ("xoxa-", "xoxb-", "xoxe-", "xoxo-", "xoxp-", "xoxr-", "xoxs-", "xapp-"),
    ),
    Rule(
        "slack-webhook-url",
        "Slack incoming webhook or workflow trigger URL",
        re.compile(
            r"https://hooks\.slack(?:-gov)?\.com/(?:services|workflows|triggers)/"
            r"[A-Za-z0-9_/\-]{20,200}"
        ),
        ("hooks.slack",),
    ),
    Rule(
        "stripe-secret-key",
        "Stripe secret or restricted API key",
        re.compile(r"\b(?:sk|rk)_(?:live|test|prod)_[0-9A-Za-z]{16,247}\b"),
        ("sk_live_", "rk_live_", "sk_test_", "rk_test_", "sk_prod_", "rk_prod_"),
    ),
    Rule(
        "anthropic-api-key",
        "Anthropic API or admin key",
        re.compile(r"\bsk-ant-[A-Za-z0-9_\-]{32,250}(?![A-Za-z0-9_\-])"),
        ("sk-ant-",),
    ),
    Rule(
        "openai-api-key",
        "OpenAI-style API key (sk-..., sk-proj-..., and compatible providers)",
        re.compile(
            r"\bsk-(?!ant-)(?=[A-Za-z0-9_\-]*[0-9])(?=[A-Za-z0-9_\-]*[A-Za-z])"
            r"[A-Za-z0-9_\-]{20,250}(?![A-Za-z0-9_\-])"
        ),
        ("sk-",),
        entropy=3.5,
    ),
    Rule(
        "jwt",
        "JSON Web Token (JWS compact serialisation)",
        re.compile(r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"),
        ("eyj",),
    ),
    Rule(
        "url-password",
        "Password in the user-info part of a URL (scheme://user:password@host)",
        re.compile(
            r"\b[A-Za-z][A-Za-z0-9+.\-]{1,30}://[^\s:/?#@'\"<>\[\]]{0,128}"
            r":(?P<secret>[^\s/?#@'\"<>]{1,256})@(?=[A-Za-z0-9.\-\[\]_%]+)"
        ),
        ("://",),
        validate=_url_password_ok,
    ),
    Rule(
        "bearer-token",
        "Bearer token in an Authorization header or similar",
        re.compile(r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9\-._~+/]{16,}=*)"),
        ("bearer",),
        entropy=3.0,
        validate=_bearer_ok,
    ),
    Rule(
        "basic-auth",
        "HTTP Basic credentials in an Authorization header",
        re.compile(
            r"""(?i)\bauthorization['"]?\s*[:=]\s*['"]?basic\s+(?P<secret>[A-Za-z0-9+/]{8,}={0,2})"""
        ),
        ("authorization",),
    ),
    Rule(
        "generic-password",
        "Quoted value assigned to a password-, passphrase- or secret-named setting",
        re.compile(
            r"(?i)(?:passw(?:or)?d|passphrase|pwd|secret)(?P<tail>[\w.\-]{0,40})"
            + _ASSIGN
            + _GENERIC_VALUE % 6
        ),
        ("passw", "passphrase", "pwd", "secret"),
        entropy=2.5,
        validate=_generic_ok,
    ),
    Rule(
        "generic-api-key",
        "High-entropy quoted value assigned to a key-, token- or credential-named setting",
        re.compile(
            r"(?i)(?:key|token|auth(?!or)|credentials?)(?P<tail>[\w.\-]{0,40})"
            + _ASSIGN
            + _GENERIC_VALUE % 10
        ),
        ("key", "token", "auth", "credential"),
        entropy=3.5,
        validate=_generic_ok,
    ),
    Rule(
        "generic-env-secret",
        "Unquoted high-entropy value of an upper-case secret-named variable (dotenv, shell, CLI)",
        re.compile(
            r"(?<![\w$.\-])(?P<name>[A-Z_][A-Z0-9_]*"
            r"(?:KEY|SECRET|TOKEN|PASSWORD|PASSWD|PWD|CREDENTIALS?|AUTH)[A-Z0-9_]*)="
            r"(?P<secret>[^\s'\"`#;,(){}\[\]<>]{8,256})(?=[\s;&|]|$)"
        ),
        ("key", "secret", "token", "passw", "pwd", "credential", "auth"),
        entropy=3.0,
        validate=_env_ok,
    ),
)

RULE_IDS: tuple[str, ...] = tuple(rule.id for rule in RULES)
_PRIORITY = {rule.id: index for index, rule in enumerate(RULES)}
_PRIORITY[SENSITIVE_FIELD_RULE] = len(RULES)


def _index_keywords(rules: tuple[Rule, ...]) -> dict[str, tuple[Rule, ...]]:
    index: dict[str, tuple[Rule, ...]] = {}
    for rule in rules:
        for keyword in rule.keywords:
            index[keyword] = (*index.get(keyword, ()), rule)
    return index


_KEYWORD_RULES = _index_keywords(RULES)


def _keyword_pattern(keywords: set[str]) -> re.Pattern[str]:
    """A regular expression that finds any of ``keywords``, as a trie.

    A plain alternation makes ``re`` try every keyword at every position (~3 us for a
    sentence); with common prefixes factored out it tries one branch per character.
    """
    trie: dict[str, Any] = {}
    for keyword in keywords:
        node = trie
        for char in keyword:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        if "" in node:
            # A keyword ends here; finding it is enough, longer ones need not be matched.
            return ""
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items())]
        return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"

    return re.compile(build(trie))


# Finds whether any rule's keyword occurs in a lower-cased text: one pass over the text
# instead of one substring search per keyword (~70), and most texts hold none.
_KEYWORDS = _keyword_pattern(set(_KEYWORD_RULES))

# Dict keys whose string values are secrets whatever they look like. Exact names only: a
# suffix match would catch protocol fields such as ``plan_token`` that hold public hashes.
SENSITIVE_KEYS = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "secret",
        "client_secret",
        "secret_key",
        "api_key",
        "apikey",
        "x_api_key",
        "access_key",
        "secret_access_key",
        "private_key",
        "access_token",
        "refresh_token",
        "id_token",
        "auth_token",
        "session_token",
        "bearer_token",
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
        "db_password",
        "database_password",
        "client_key",
        "private_token",
    }
)


def _candidate_rules(text: str) -> list[Rule]:
    lowered = text.lower()
    if _KEYWORDS.search(lowered) is None:
        return []
    seen: set[str] = set()
    rules: list[Rule] = []
    for keyword, keyword_rules in _KEYWORD_RULES.items():
        if keyword in lowered:
            for rule in keyword_rules:
                if rule.id not in seen:
                    seen.add(rule.id)
                    rules.append(rule)
    return rules


def find_secrets(text: str) -> list[Finding]:
    """Return the disjoint secret spans in ``text``, in order of position."""
    if len(text) < _MIN_SECRET_TEXT:
        return []
    raw: list[Finding] = []
    for rule in _candidate_rules(text):
        raw.extend(rule.findings(text))
    if not raw:
        return []
    raw.sort(key=lambda f: (f.start, -f.end, _PRIORITY[f.rule_id]))
    merged: list[Finding] = []
    for finding in raw:
        if merged and finding.start < merged[-1].end:
            last = merged[-1]
            best = min(last.rule_id, finding.rule_id, key=_PRIORITY.__getitem__)
            merged[-1] = Finding(best, last.start, max(last.end, finding.end))
        else:
            merged.append(finding)
    return merged


def redact_text(text: str) -> tuple[str, int]:
    """Replace every secret in ``text`` by ``[REDACTED:<rule_id>]``; return text and count."""
    findings = find_secrets(text)
    if not findings:
        return text, 0
    parts: list[str] = []
    position = 0
    for finding in findings:
        parts.append(text[position : finding.start])
        parts.append(REDACTION_FORMAT.format(rule_id=finding.rule_id))
        position = finding.end
    parts.append(text[position:])
    return "".join(parts), len(findings)


def redact_json(value: Any) -> tuple[Any, int]:
    """Return a copy of a JSON value with every string redacted, and the redaction count.

    Keys are kept as they are; the string value of a key in ``SENSITIVE_KEYS`` is replaced
    whole, since a password like ``hunter2`` matches no pattern on its own.
    """
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        result: dict[Any, Any] = {}
        total = 0
        for key, item in value.items():
            if isinstance(item, str) and _is_sensitive_key(key) and _needs_field_redaction(item):
                result[key] = REDACTION_FORMAT.format(rule_id=SENSITIVE_FIELD_RULE)
                total += 1
                continue
            result[key], count = redact_json(item)
            total += count
        return result, total
    if isinstance(value, list | tuple):
        items: list[Any] = []
        total = 0
        for item in value:
            redacted, count = redact_json(item)
            items.append(redacted)
            total += count
        return (tuple(items) if isinstance(value, tuple) else items), total
    return value, 0


# Upper-case environment-style names (``GITHUB_TOKEN``) map secrets into engines and tools.
_SENSITIVE_ENV_NAME_RE = re.compile(
    r"[A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|ACCESS_KEY|PRIVATE_KEY"
    r"|CREDENTIALS?)"
)


def _is_sensitive_key(key: object) -> bool:
    if not isinstance(key, str):
        return False
    return (
        key.lower().replace("-", "_") in SENSITIVE_KEYS
        or _SENSITIVE_ENV_NAME_RE.fullmatch(key) is not None
    )


def _needs_field_redaction(value: str) -> bool:
    return bool(value) and _REDACTED_RE.fullmatch(value) is None


# Example generation: random credentials in each rule's format, for tests and for training.

_ALNUM = string.ascii_letters + string.digits
_URLSAFE = _ALNUM + "_-"
_BASE32 = string.ascii_uppercase + "234567"
_PASSWORD_CHARS = _ALNUM + "!$%^&*()-_=+~.,"


def _pick(rng: random.Random, alphabet: str, size: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(size))


def _strong(rng: random.Random, alphabet: str, size: int) -> str:
    """Random string with at least one upper, one lower and one digit, as real keys have."""
    chars = [rng.choice(alphabet) for _ in range(size - 3)]
    chars += [rng.choice(string.ascii_uppercase), rng.choice(string.ascii_lowercase)]
    chars.append(rng.choice(string.digits))
    rng.shuffle(chars)
    return "".join(chars)


def _b64(rng: random.Random, size: int, alphabet: str = "std") -> str:
    raw = rng.randbytes(size)
    if alphabet == "url":
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return base64.b64encode(raw).decode()


def _in_context(rng: random.Random, rule_id: str, secret: str, templates: list[str]) -> Example:
    template = rng.choice(templates)
    prefix, suffix = template.split("{s}")
    text = prefix + secret + suffix
    return Example(rule_id, text, len(prefix), len(prefix) + len(secret))


_TOKEN_TEMPLATES = [
    "{s}",
    "{s}",
    "value: {s}",
    '"{s}"',
    "'{s}'",
    "using {s} to call the api",
    "({s})",
]


def _pem_body(rng: random.Random, size: int, width: int, newline: str) -> str:
    encoded = base64.b64encode(rng.randbytes(size)).decode()
    return newline.join(encoded[i : i + width] for i in range(0, len(encoded), width))


def _gen_gcp_service_account(rng: random.Random) -> Example:
    project = f"{_pick(rng, string.ascii_lowercase, 8)}-{rng.randint(100000, 999999)}"
    der = bytes.fromhex("308204bd020100300d06092a864886f70d0101010500048204a7")
    body = base64.b64encode(der + rng.randbytes(1191)).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    key = f"-----BEGIN PRIVATE KEY-----\n{lines}\n-----END PRIVATE KEY-----\n"
    document = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": rng.randbytes(20).hex(),
        "private_key": key,
        "client_email": f"deployer@{project}.iam.gserviceaccount.com",
        "client_id": str(rng.randint(10**20, 10**21 - 1)),
    }
    text = json.dumps(document, indent=rng.choice([None, 2]))
    encoded = json.dumps(key)[1:-1]
    start = text.index(encoded)
    return Example("gcp-service-account-key", text, start, start + len(encoded))


def _gen_private_key(rng: random.Random) -> Example:
    kind, size, width = rng.choice(
        [
            ("RSA PRIVATE KEY", 1192, 64),
            ("PRIVATE KEY", 1218, 64),
            ("EC PRIVATE KEY", 121, 64),
            ("OPENSSH PRIVATE KEY", 399, 70),
            ("ENCRYPTED PRIVATE KEY", 1298, 64),
            ("DSA PRIVATE KEY", 444, 64),
        ]
    )
    newline = rng.choice(["\n", "\n", "\r\n", "\\n"])
    block = (
        f"-----BEGIN {kind}-----{newline}{_pem_body(rng, size, width, newline)}"
        f"{newline}-----END {kind}-----"
    )
    return _in_context(rng, "private-key", block, ["{s}", "{s}\n", "key:\n{s}\nend"])


def _gen_aws_access_key_id(rng: random.Random) -> Example:
    prefix = rng.choice(["AKIA", "AKIA", "ASIA", "ABIA", "ACCA"])
    secret = prefix + _pick(rng, _BASE32, 16)
    templates = [*_TOKEN_TEMPLATES, "aws_access_key_id = {s}", '"AccessKeyId": "{s}"']
    return _in_context(rng, "aws-access-key-id", secret, templates)


def _gen_aws_secret(rng: random.Random) -> Example:
    name = rng.choice(
        ["aws_secret_access_key", "AWS_SECRET_ACCESS_KEY", "SecretAccessKey", "awsSecretKey"]
    )
    secret = _strong(rng, _ALNUM + "/+", 40)
    template = rng.choice(['{n} = "{s}"', "{n}={s}", '"{n}": "{s}"', "{n}: {s}", "{n} = {s}"])
    return _in_context(rng, "aws-secret-access-key", secret, [template.replace("{n}", name)])


def _gen_gcp_api_key(rng: random.Random) -> Example:
    secret = "AIza" + _pick(rng, _URLSAFE, 35)
    templates = [*_TOKEN_TEMPLATES, "https://maps.googleapis.com/maps/api/geocode/json?key={s}"]
    return _in_context(rng, "gcp-api-key", secret, templates)


def _gen_azure_connection_string(rng: random.Random) -> Example:
    name = _pick(rng, string.ascii_lowercase + string.digits, rng.randint(3, 24))
    if rng.random() < 0.5:
        secret = _b64(rng, 64)
        template = (
            f"DefaultEndpointsProtocol=https;AccountName={name};AccountKey={{s}};"
            "EndpointSuffix=core.windows.net"
        )
    else:
        secret = _b64(rng, 32)
        template = (
            f"Endpoint=sb://{name}.servicebus.windows.net/;"
            "SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={s}"
        )
    return _in_context(rng, "azure-connection-string", secret, [template])


def _gen_azure_storage_key(rng: random.Random) -> Example:
    name = rng.choice(["AZURE_STORAGE_KEY", "storage_account_key", "azureStorageAccountKey"])
    template = rng.choice(['{n} = "{s}"', "{n}={s}", '"{n}": "{s}"', "{n}: {s}"])
    secret = _b64(rng, 64)
    return _in_context(rng, "azure-storage-account-key", secret, [template.replace("{n}", name)])


def _gen_azure_client_secret(rng: random.Random) -> Example:
    alphabet = _ALNUM + "_~."
    secret = _pick(rng, alphabet, 3) + rng.choice(string.digits) + "Q~"
    secret += _strong(rng, alphabet + "-", 34)
    templates = [*_TOKEN_TEMPLATES, 'AZURE_CLIENT_SECRET="{s}"', "client_secret: {s}"]
    return _in_context(rng, "azure-client-secret", secret, templates)


def _gen_prefixed(
    rule_id: str, prefixes: list[str], alphabet: str, size: int
) -> Callable[[random.Random], Example]:
    def generate(rng: random.Random) -> Example:
        secret = rng.choice(prefixes) + _strong(rng, alphabet, size)
        templates = [*_TOKEN_TEMPLATES, "export TOKEN={s}", "Authorization: token {s}"]
        return _in_context(rng, rule_id, secret, templates)

    return generate


def _gen_github_fine_grained(rng: random.Random) -> Example:
    secret = f"github_pat_{_strong(rng, _ALNUM, 22)}_{_strong(rng, _ALNUM, 59)}"
    return _in_context(rng, "github-fine-grained-pat", secret, _TOKEN_TEMPLATES)


def _gen_slack_token(rng: random.Random) -> Example:
    kind = rng.choice(["xoxb", "xoxp", "xoxa", "xoxr", "xoxs"])
    first = _pick(rng, string.digits, rng.randint(10, 13))
    second = _pick(rng, string.digits, rng.randint(10, 13))
    if kind == "xoxp":
        third = _pick(rng, string.digits, 12)
        secret = f"{kind}-{first}-{second}-{third}-{rng.randbytes(16).hex()}"
    else:
        secret = f"{kind}-{first}-{second}-{_strong(rng, _ALNUM, 24)}"
    return _in_context(rng, "slack-token", secret, _TOKEN_TEMPLATES)


def _gen_slack_webhook(rng: random.Random) -> Example:
    upper = string.ascii_uppercase + string.digits
    secret = (
        f"https://hooks.slack.com/services/T{_pick(rng, upper, rng.randint(8, 10))}"
        f"/B{_pick(rng, upper, rng.randint(8, 10))}/{_strong(rng, _ALNUM, 24)}"
    )
    return _in_context(rng, "slack-webhook-url", secret, [*_TOKEN_TEMPLATES, "webhook_url: {s}"])


def _gen_stripe(rng: random.Random) -> Example:
    prefix = f"{rng.choice(['sk', 'rk'])}_{rng.choice(['live', 'live', 'test'])}_"
    secret = prefix + _strong(rng, _ALNUM, rng.choice([24, 99]))
    return _in_context(
        rng, "stripe-secret-key", secret, [*_TOKEN_TEMPLATES, "Stripe.api_key = '{s}'"]
    )


def _gen_anthropic(rng: random.Random) -> Example:
    secret = f"sk-ant-{rng.choice(['api03', 'admin01'])}-{_strong(rng, _URLSAFE, 93)}AA"
    templates = [*_TOKEN_TEMPLATES, "x-api-key: {s}", "ANTHROPIC_API_KEY={s}"]
    return _in_context(rng, "anthropic-api-key", secret, templates)


def _gen_openai(rng: random.Random) -> Example:
    if rng.random() < 0.5:
        secret = "sk-" + _strong(rng, _ALNUM, 48)
    else:
        kind = rng.choice(["proj", "svcacct", "admin"])
        secret = f"sk-{kind}-{_strong(rng, _URLSAFE, 74)}T3BlbkFJ{_strong(rng, _URLSAFE, 74)}"
    templates = [*_TOKEN_TEMPLATES, "OPENAI_API_KEY={s}", "Authorization: Bearer {s}"]
    return _in_context(rng, "openai-api-key", secret, templates)


def _gen_jwt(rng: random.Random) -> Example:
    alg, signature_size = rng.choice([("HS256", 32), ("RS256", 256), ("ES256", 64)])
    header = {"alg": alg, "typ": "JWT"}
    issued = rng.randint(1_500_000_000, 1_900_000_000)
    claims = {
        "sub": _pick(rng, _ALNUM, 12),
        "iat": issued,
        "exp": issued + 3600,
        "scope": rng.choice(["read", "read write", "admin"]),
    }

    def part(value: object) -> str:
        encoded = json.dumps(value, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(encoded).decode().rstrip("=")

    secret = f"{part(header)}.{part(claims)}.{_b64(rng, signature_size, 'url')}"
    templates = [*_TOKEN_TEMPLATES, "Authorization: Bearer {s}", "Cookie: session={s}"]
    return _in_context(rng, "jwt", secret, templates)


def _gen_url_password(rng: random.Random) -> Example:
    scheme = rng.choice(
        ["postgresql", "postgres", "mysql", "redis", "amqp", "https", "mongodb+srv"]
    )
    user = _pick(rng, string.ascii_lowercase, rng.randint(3, 10))
    password = _strong(rng, _PASSWORD_CHARS, rng.randint(8, 24))
    host = rng.choice(["db.internal.example.com", "10.0.3.17", "cache", "mq.example.org"])
    tail = rng.choice(["", ":5432/app", "/0", ":5672/vhost", "/path?ssl=true"])
    template = f"{scheme}://{user}:{{s}}@{host}{tail}"
    outer = rng.choice(["{u}", "DATABASE_URL={u}", 'url = "{u}"', "connecting to {u} now"])
    return _in_context(rng, "url-password", password, [outer.replace("{u}", template)])


def _gen_bearer(rng: random.Random) -> Example:
    secret = _strong(rng, _ALNUM + "-._~", rng.randint(24, 64))
    templates = ["Authorization: Bearer {s}", "-H 'Authorization: Bearer {s}'", "bearer {s}"]
    return _in_context(rng, "bearer-token", secret, templates)


def _gen_basic_auth(rng: random.Random) -> Example:
    user = _pick(rng, string.ascii_lowercase, rng.randint(3, 10))
    credentials = f"{user}:{_strong(rng, _PASSWORD_CHARS, rng.randint(8, 20))}"
    secret = base64.b64encode(credentials.encode()).decode()
    templates = ["Authorization: Basic {s}", '"Authorization": "Basic {s}"']
    return _in_context(rng, "basic-auth", secret, templates)


def _gen_assignment(
    rule_id: str, names: list[str], sizes: tuple[int, int]
) -> Callable[[random.Random], Example]:
    def generate(rng: random.Random) -> Example:
        name = rng.choice(names)
        secret = _strong(rng, _PASSWORD_CHARS.replace(".", ""), rng.randint(*sizes))
        quote = rng.choice(['"', "'"])
        template = rng.choice(
            [
                "{n} = {q}{s}{q}",
                "{n}: {q}{s}{q}",
                '"{n}": "{s}"',
                "{n} := {q}{s}{q}",
                "{n} => {q}{s}{q}",
                "self.{n} = {q}{s}{q}",
            ]
        )
        template = template.replace("{n}", name).replace("{q}", quote)
        return _in_context(rng, rule_id, secret, [template])

    return generate


def _gen_env_secret(rng: random.Random) -> Example:
    name = rng.choice(
        [
            "SERVICE_API_KEY",
            "SECRET_KEY",
            "DEPLOY_TOKEN",
            "DB_PASSWORD",
            "SMTP_PASSWD",
            "WEBHOOK_SECRET",
            "REGISTRY_AUTH",
            "PRIVATE_CREDENTIALS",
        ]
    )
    secret = _strong(rng, _ALNUM + "_-.!%", rng.randint(16, 40))
    prefix = rng.choice(["", "export ", "  "])
    return _in_context(rng, "generic-env-secret", secret, [f"{prefix}{name}={{s}}"])


_GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "gcp-service-account-key": _gen_gcp_service_account,
    "private-key": _gen_private_key,
    "aws-access-key-id": _gen_aws_access_key_id,
    "aws-secret-access-key": _gen_aws_secret,
    "gcp-api-key": _gen_gcp_api_key,
    "azure-connection-string": _gen_azure_connection_string,
    "azure-storage-account-key": _gen_azure_storage_key,
    "azure-client-secret": _gen_azure_client_secret,
    "github-pat": _gen_prefixed("github-pat", ["ghp_"], _ALNUM, 36),
    "github-oauth": _gen_prefixed("github-oauth", ["gho_"], _ALNUM, 36),
    "github-app-token": _gen_prefixed("github-app-token", ["ghu_", "ghs_"], _ALNUM, 36),
    "github-refresh-token": _gen_prefixed("github-refresh-token", ["ghr_"], _ALNUM, 76),
    "github-fine-grained-pat": _gen_github_fine_grained,
    "gitlab-token": _gen_prefixed(
        "gitlab-token", ["glpat-", "glpat-", "gldt-", "glrt-"], _URLSAFE, 20
    ),
    "slack-token": _gen_slack_token,
    "slack-webhook-url": _gen_slack_webhook,
    "stripe-secret-key": _gen_stripe,
    "anthropic-api-key": _gen_anthropic,
    "openai-api-key": _gen_openai,
    "jwt": _gen_jwt,
    "url-password": _gen_url_password,
    "bearer-token": _gen_bearer,
    "basic-auth": _gen_basic_auth,
    "generic-password": _gen_assignment(
        "generic-password",
        [
            "password",
            "db_password",
            "DB_PASSWORD",
            "passwd",
            "admin_pwd",
            "smtp_password",
            "passphrase",
            "userPassword",
            "client_secret",
            "secret",
        ],
        (10, 24),
    ),
    "generic-api-key": _gen_assignment(
        "generic-api-key",
        [
            "api_key",
            "apiKey",
            "API_KEY",
            "access_token",
            "auth_token",
            "x-api-key",
            "private_token",
            "credentials",
            "SERVICE_TOKEN",
            "signing_key",
        ],
        (24, 48),
    ),
    "generic-env-secret": _gen_env_secret,
}
assert set(_GENERATORS) == set(RULE_IDS), "every rule needs an example generator"


def generate_labeled_example(rule_id: str, rng: random.Random) -> Example:
    """Return a random realistic credential of a rule's format, in context, with its span."""
    try:
        generator = _GENERATORS[rule_id]
    except KeyError:
        raise ValueError(f"unknown rule {rule_id!r}") from None
    return generator(rng)


def generate_example(rule_id: str, rng: random.Random) -> str:
    """Return a random realistic credential of a rule's format, in a typical context."""
    return generate_labeled_example(rule_id, rng).text
