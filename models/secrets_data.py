"""Synthetic credentials in the formats of common providers, and look-alikes that are not.

``generate_example(rule_id, rng)`` has the signature of ``cabincrew.redaction``'s generator so
the builder can switch to the shared rules once that module lands; until then these rules
are the source of positives. Every value is random: none is a real credential.

Hard negatives are strings that look like secrets but are not: placeholders, environment
look-ups, hashes, UUIDs, public keys and certificates.
"""

# One template per line reads as a table; wrapping them would hide the data.
# ruff: noqa: E501

from __future__ import annotations

import base64
import random
import string
from collections.abc import Callable

ALNUM = string.ascii_letters + string.digits
UPPER_ALNUM = string.ascii_uppercase + string.digits
LOWER_ALNUM = string.ascii_lowercase + string.digits
HEX = "0123456789abcdef"
B64 = ALNUM + "+/"
B64URL = ALNUM + "-_"


def _r(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _b64(rng: random.Random, nbytes: int) -> str:
    return base64.b64encode(rng.randbytes(nbytes)).decode()


def _b64url(rng: random.Random, nbytes: int) -> str:
    return base64.urlsafe_b64encode(rng.randbytes(nbytes)).decode().rstrip("=")


def _pem(rng: random.Random, label: str, nbytes: int) -> str:
    body = _b64(rng, nbytes)
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {label}-----", *lines, f"-----END {label}-----"])


def _password(rng: random.Random) -> str:
    alphabet = ALNUM + "!@#$%^&*-_=+?"
    return _r(rng, alphabet, rng.randint(10, 28))


def _jwt(rng: random.Random) -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
    claims = f'{{"sub":"{rng.randint(1, 10**9)}","name":"{_r(rng, string.ascii_letters, 8)}",'
    claims += f'"iat":{rng.randint(1_500_000_000, 1_800_000_000)}}}'
    payload = base64.urlsafe_b64encode(claims.encode()).decode().rstrip("=")
    return f"{header}.{payload}.{_b64url(rng, 32)}"


def _host(rng: random.Random) -> str:
    return rng.choice(
        ["db", "prod-db", "10.0.3.17", "mysql.internal", "cluster0.x1y2z.mongodb.net"]
    )


_GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "aws_access_key_id": lambda r: (
        r.choice(["AKIA", "ASIA"]) + _r(r, "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16)
    ),
    "aws_secret_access_key": lambda r: _r(r, B64, 40),
    "github_token": lambda r: r.choice(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]) + _r(r, ALNUM, 36),
    "github_fine_grained_pat": lambda r: "github_pat_" + _r(r, ALNUM, 22) + "_" + _r(r, ALNUM, 59),
    "gitlab_pat": lambda r: "glpat-" + _r(r, B64URL, 20),
    "slack_token": lambda r: (
        f"xox{r.choice('bpa')}-{r.randint(10**9, 10**12)}-"
        f"{r.randint(10**9, 10**12)}-{_r(r, ALNUM, 24)}"
    ),
    "slack_webhook": lambda r: (
        "https://hooks.slack.com/services/T"
        + _r(r, UPPER_ALNUM, 8)
        + "/B"
        + _r(r, UPPER_ALNUM, 8)
        + "/"
        + _r(r, ALNUM, 24)
    ),
    "stripe_secret_key": lambda r: (
        r.choice(["sk_live_", "rk_live_", "sk_test_"]) + _r(r, ALNUM, r.randint(24, 99))
    ),
    "google_api_key": lambda r: "AIza" + _r(r, B64URL, 35),
    "openai_api_key": lambda r: r.choice(["sk-", "sk-proj-"]) + _r(r, B64URL, r.randint(48, 120)),
    "anthropic_api_key": lambda r: "sk-ant-api03-" + _r(r, B64URL, 93) + "AA",
    "huggingface_token": lambda r: "hf_" + _r(r, ALNUM, 34),
    "npm_token": lambda r: "npm_" + _r(r, ALNUM, 36),
    "pypi_token": lambda r: "pypi-AgEIcHlwaS5vcmc" + _r(r, B64URL, r.randint(50, 150)),
    "sendgrid_api_key": lambda r: "SG." + _r(r, B64URL, 22) + "." + _r(r, B64URL, 43),
    "twilio_api_key": lambda r: "SK" + _r(r, HEX, 32),
    "digitalocean_token": lambda r: "dop_v1_" + _r(r, HEX, 64),
    "shopify_token": lambda r: r.choice(["shpat_", "shpss_", "shpca_"]) + _r(r, HEX, 32),
    "telegram_bot_token": lambda r: f"{r.randint(10**8, 10**10)}:AA{_r(r, B64URL, 33)}",
    "azure_storage_key": lambda r: (
        "DefaultEndpointsProtocol=https;AccountName="
        + _r(r, LOWER_ALNUM, 12)
        + ";AccountKey="
        + _b64(r, 64)
        + ";EndpointSuffix=core.windows.net"
    ),
    "jwt": _jwt,
    "private_key": lambda r: _pem(
        r,
        r.choice(
            [
                "RSA PRIVATE KEY",
                "PRIVATE KEY",
                "EC PRIVATE KEY",
                "OPENSSH PRIVATE KEY",
                "ENCRYPTED PRIVATE KEY",
            ]
        ),
        r.choice([121, 240, 600, 1190]),
    ),
    "connection_string": lambda r: (
        f"{r.choice(['postgres', 'postgresql', 'mysql', 'mongodb+srv', 'redis', 'amqp'])}://"
        f"{r.choice(['admin', 'app', 'root', 'svc_user', 'deploy'])}:{_password(r)}@{_host(r)}"
        f":{r.choice([5432, 3306, 27017, 6379, 5672])}/{r.choice(['app', 'prod', 'main', '0'])}"
    ),
    "basic_auth_url": lambda r: (
        f"https://{r.choice(['ci', 'bot', 'admin'])}:{_password(r)}@"
        f"{r.choice(['git.example.com', 'registry.internal', 'nexus.corp.local'])}/{_r(r, LOWER_ALNUM, 6)}"
    ),
    "password_assignment": _password,
    "generic_api_key": lambda r: r.choice([_r(r, HEX, 32), _r(r, ALNUM, 40), _r(r, B64URL, 43)]),
}

RULE_IDS: tuple[str, ...] = tuple(sorted(_GENERATORS))

# Rules whose value is recognisable alone; the others need a telling name around them.
_NAMES: dict[str, tuple[str, ...]] = {
    "aws_access_key_id": ("AWS_ACCESS_KEY_ID", "aws_access_key_id", "accessKeyId"),
    "aws_secret_access_key": ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", "secretAccessKey"),
    "password_assignment": (
        "password",
        "DB_PASSWORD",
        "passwd",
        "admin_password",
        "pwd",
        "PGPASSWORD",
    ),
    "generic_api_key": (
        "api_key",
        "API_KEY",
        "apiKey",
        "secret_key",
        "auth_token",
        "client_secret",
        "access_token",
    ),
    "twilio_api_key": ("TWILIO_API_KEY", "twilio_key"),
}
_DEFAULT_NAMES = ("token", "TOKEN", "secret", "key", "credentials", "auth")

_CONTEXTS = (
    '{name} = "{value}"',
    "{name} = '{value}'",
    "export {name}={value}",
    "{name}={value}",
    "{name}: {value}",
    '"{name}": "{value}",',
    "const {name} = '{value}';",
    '{name} := "{value}"',
    "ENV {name}={value}",
    'os.environ["{name}"] = "{value}"',
    'headers = {{"Authorization": "Bearer {value}"}}',
    'curl -H "Authorization: token {value}" https://api.example.com/v1/items',
    "# temporary, remove before commit: {value}",
    'client = Client(api_key="{value}")',
    'DATABASE_URL="{value}"',
    "{value}",
)


def generate_value(rule_id: str, rng: random.Random) -> str:
    """A fresh random credential in the format of ``rule_id``."""
    return _GENERATORS[rule_id](rng)


def generate_example(rule_id: str, rng: random.Random) -> str:
    """A line of code or config that embeds a fresh credential of ``rule_id``."""
    value = generate_value(rule_id, rng)
    name = rng.choice(_NAMES.get(rule_id, _DEFAULT_NAMES))
    if "\n" in value:  # PEM blocks: as a file, an env heredoc or a JSON string
        return rng.choice(
            [
                value,
                f'{name} = """{value}"""',
                '"private_key": "' + value.replace("\n", "\\n") + '\\n",',
            ]
        )
    contexts = _CONTEXTS if rule_id not in _NAMES else _CONTEXTS[:-1]  # bare hex needs a name
    return rng.choice(contexts).format(name=name, value=value)


def _placeholder(rng: random.Random) -> str:
    return rng.choice(
        [
            "YOUR_API_KEY",
            "<your-token-here>",
            "changeme",
            "xxxxxxxxxxxxxxxxxxxxxxxx",
            "********",
            "REDACTED",
            "${GITHUB_TOKEN}",
            "$(cat /run/secrets/db_password)",
            "{{ secrets.NPM_TOKEN }}",
            "<password>",
            "TODO",
            "",
        ]
    )


def _public_material(rng: random.Random) -> str:
    return rng.choice(
        [
            _pem(rng, "PUBLIC KEY", rng.choice([91, 294])),
            _pem(rng, "CERTIFICATE", rng.choice([600, 900])),
            f"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI{_r(rng, B64, 43)} {rng.choice(['deploy', 'alice'])}@host",
            f"ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ{_r(rng, B64, 300)} ci@builder",
        ]
    )


def _uuid(rng: random.Random) -> str:
    h = _r(rng, HEX, 32)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-a{h[17:20]}-{h[20:]}"


_LOOKALIKES: tuple[Callable[[random.Random], str], ...] = (
    lambda r: f'{r.choice(_DEFAULT_NAMES + _NAMES["generic_api_key"])} = "{_placeholder(r)}"',
    lambda r: (
        f'{r.choice(_NAMES["password_assignment"])} = os.environ["{r.choice(["DB_PASSWORD", "PGPASSWORD"])}"]'
    ),
    lambda r: f'api_key = os.getenv("{r.choice(["OPENAI_API_KEY", "API_KEY", "STRIPE_KEY"])}")',
    lambda r: f"token = read_secret({r.choice(['path', 'name', 'TOKEN_FILE'])})",
    lambda r: (
        f'export {r.choice(["AWS_SECRET_ACCESS_KEY", "GITHUB_TOKEN"])}="$({r.choice(["vault kv get -field=value secret/ci", "cat ~/.token"])})"'
    ),
    lambda r: f'sha256 = "{_r(r, HEX, 64)}"',
    lambda r: f"commit {_r(r, HEX, 40)}",
    lambda r: f"md5sum: {_r(r, HEX, 32)}  {r.choice(['setup.py', 'data.bin', 'README'])}",
    lambda r: f'request_id = "{_uuid(r)}"',
    lambda r: f'"integrity": "sha512-{_b64(r, 64)}"',
    lambda r: f"image: registry.example.com/app@sha256:{_r(r, HEX, 64)}",
    lambda r: f'version = "{r.randint(0, 9)}.{r.randint(0, 40)}.{r.randint(0, 99)}"',
    lambda r: f'icon = "data:image/png;base64,{_b64(r, r.choice([24, 60, 120]))}"',
    _public_material,
    lambda r: (
        f"password_field = forms.CharField(widget=forms.PasswordInput, max_length={r.randint(8, 128)})"
    ),
    lambda r: (
        f'if not {r.choice(["token", "api_key", "password"])}: raise ValueError("missing credentials")'
    ),
    lambda r: (
        f'parser.add_argument("--{r.choice(["token", "password", "api-key"])}", help="read from the environment")'
    ),
)


def generate_lookalike(rng: random.Random) -> str:
    """A line that resembles a credential but holds none."""
    return rng.choice(_LOOKALIKES)(rng)
