"""Lexical scan of Rego source: package path, test rules and refused constructs.

The scan runs before anything is handed to the Rego engine, so that a refused builtin is
reported with its file, line and column, and so that constructs known to crash the
embedded engine never reach it. It tokenizes (comments and strings are skipped, so a
builtin's name inside a string or a comment is not a call) rather than parsing: the engine
remains the judge of syntax.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from preflight_svc.errors import BuiltinViolation, PolicySyntaxError

# Builtins that read the clock, draw random numbers, reach the network or the host, and
# so would make a decision depend on something other than (policy, data, input).
FORBIDDEN_BUILTINS: frozenset[str] = frozenset(
    {
        "http.send",
        "time.now_ns",
        "uuid.rfc4122",
        "opa.runtime",
        # These verify against the current time when the caller gives none.
        "io.jwt.decode_verify",
        "crypto.x509.parse_and_verify_certificates",
        "crypto.x509.parse_and_verify_certificates_with_options",
    }
)
FORBIDDEN_PREFIXES: tuple[str, ...] = ("rand.", "net.")


def is_forbidden_builtin(name: str) -> bool:
    """Whether policies may not call the builtin ``name``."""
    return name in FORBIDDEN_BUILTINS or name.startswith(FORBIDDEN_PREFIXES)


class TokenKind(enum.Enum):
    """Kinds of Rego tokens that the scan distinguishes."""

    IDENT = "ident"
    STRING = "string"
    NUMBER = "number"
    PUNCT = "punct"


@dataclass(frozen=True)
class Token:
    """One token with the position (1-based) where it starts and the line where it ends."""

    kind: TokenKind
    text: str
    line: int
    column: int
    end_line: int


@dataclass(frozen=True)
class BuiltinCall:
    """A call of a dotted name, such as ``time.now_ns(``, at a position in a file."""

    name: str
    line: int
    column: int


@dataclass(frozen=True)
class FunctionHead:
    """The head of a function definition: its name, number of arguments and position."""

    name: str
    arity: int
    line: int
    column: int


@dataclass(frozen=True)
class ModuleScan:
    """What the scan learned about one Rego module."""

    path: str
    package: str
    test_rules: tuple[str, ...]
    calls: tuple[BuiltinCall, ...]
    whole_input_withs: tuple[BuiltinCall, ...]
    functions: tuple[FunctionHead, ...] = ()

    def forbidden_calls(self) -> tuple[BuiltinViolation, ...]:
        """Calls of forbidden builtins, with their positions."""
        return tuple(
            BuiltinViolation(self.path, c.line, c.column, c.name)
            for c in self.calls
            if is_forbidden_builtin(c.name)
        )


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_SPACE = re.compile(r"[ \t\r\f\v]+")
_TWO_CHAR = frozenset({":=", "==", "!=", "<=", ">="})


def tokenize(path: str, source: str) -> list[Token]:
    """Split Rego source into tokens, dropping whitespace and comments."""
    tokens: list[Token] = []
    i = 0
    line = 1
    line_start = 0
    n = len(source)
    while i < n:
        ch = source[i]
        if ch == "\n":
            line += 1
            line_start = i + 1
            i += 1
            continue
        space = _SPACE.match(source, i)
        if space:
            i = space.end()
            continue
        column = i - line_start + 1
        if ch == "#":
            end = source.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch == '"':
            j = i + 1
            while j < n and source[j] != '"':
                if source[j] == "\n":
                    raise PolicySyntaxError(path, line, column, "unterminated string")
                j += 2 if source[j] == "\\" else 1
            if j >= n:
                raise PolicySyntaxError(path, line, column, "unterminated string")
            tokens.append(Token(TokenKind.STRING, source[i : j + 1], line, column, line))
            i = j + 1
            continue
        if ch == "`":
            j = source.find("`", i + 1)
            if j < 0:
                raise PolicySyntaxError(path, line, column, "unterminated raw string")
            text = source[i : j + 1]
            start_line = line
            newlines = text.count("\n")
            if newlines:
                line += newlines
                line_start = i + text.rfind("\n") + 1
            tokens.append(Token(TokenKind.STRING, text, start_line, column, line))
            i = j + 1
            continue
        ident = _IDENT.match(source, i)
        if ident:
            tokens.append(Token(TokenKind.IDENT, ident.group(), line, column, line))
            i = ident.end()
            continue
        number = _NUMBER.match(source, i)
        if number:
            tokens.append(Token(TokenKind.NUMBER, number.group(), line, column, line))
            i = number.end()
            continue
        two = source[i : i + 2]
        if two in _TWO_CHAR:
            tokens.append(Token(TokenKind.PUNCT, two, line, column, line))
            i += 2
            continue
        tokens.append(Token(TokenKind.PUNCT, ch, line, column, line))
        i += 1
    return tokens


def scan_module(path: str, source: str) -> ModuleScan:
    """Scan one Rego module: its package, its ``test_*`` rules and its dotted calls."""
    tokens = tokenize(path, source)
    package = _package(path, tokens)
    return ModuleScan(
        path=path,
        package=package,
        test_rules=_test_rules(tokens),
        calls=_dotted_calls(tokens),
        whole_input_withs=_whole_input_withs(tokens),
        functions=_function_heads(tokens),
    )


def _package(path: str, tokens: list[Token]) -> str:
    if not tokens or tokens[0].text != "package":
        line = tokens[0].line if tokens else 1
        raise PolicySyntaxError(path, line, 1, "a Rego module must start with `package`")
    segments: list[str] = []
    i = 1
    if i < len(tokens) and tokens[i].kind is TokenKind.IDENT:
        segments.append(tokens[i].text)
        i += 1
    while i + 1 < len(tokens):
        tok, nxt = tokens[i], tokens[i + 1]
        if tok.text == "." and nxt.kind is TokenKind.IDENT and nxt.line == tok.line:
            segments.append(nxt.text)
            i += 2
        elif (
            tok.text == "["
            and nxt.kind is TokenKind.STRING
            and i + 2 < len(tokens)
            and tokens[i + 2].text == "]"
        ):
            segments.append(nxt.text[1:-1])
            i += 3
        else:
            break
    if not segments or not all(_IDENT.fullmatch(s) for s in segments):
        raise PolicySyntaxError(
            path,
            tokens[0].line,
            1,
            "package paths must be dotted identifiers (for example cabincrew.preflight.paths)",
        )
    if segments[0] == "data" or ".".join(segments).startswith("cabincrew_internal"):
        raise PolicySyntaxError(
            path, tokens[0].line, 1, "package path must not start with data or cabincrew_internal"
        )
    return ".".join(segments)


def _test_rules(tokens: list[Token]) -> tuple[str, ...]:
    # A test rule is a rule whose head starts a line at the top level of the module.
    names: list[str] = []
    depth = 0
    previous_end_line = 0
    for tok in tokens:
        starts_line = tok.line > previous_end_line
        previous_end_line = tok.end_line
        if tok.kind is TokenKind.PUNCT:
            if tok.text in "{[(":
                depth += 1
            elif tok.text in "}])":
                depth = max(0, depth - 1)
            continue
        if (
            depth == 0
            and starts_line
            and tok.kind is TokenKind.IDENT
            and tok.text.startswith("test_")
            and tok.text not in names
        ):
            names.append(tok.text)
    return tuple(names)


def _dotted_calls(tokens: list[Token]) -> tuple[BuiltinCall, ...]:
    calls: list[BuiltinCall] = []
    i = 0
    n = len(tokens)
    while i < n:
        tok = tokens[i]
        continues_ref = i > 0 and tokens[i - 1].text == "."
        if tok.kind is not TokenKind.IDENT or continues_ref:
            i += 1
            continue
        # Whitespace between the parts of a ref is tolerated by the engine, so it is
        # tolerated here too: `http . send(` is still http.send.
        parts = [tok.text]
        j = i + 1
        while j + 1 < n and tokens[j].text == "." and tokens[j + 1].kind is TokenKind.IDENT:
            parts.append(tokens[j + 1].text)
            j += 2
        if j < n and tokens[j].text == "(":
            calls.append(BuiltinCall(".".join(parts), tok.line, tok.column))
        i = j
    return tuple(calls)


def _whole_input_withs(tokens: list[Token]) -> tuple[BuiltinCall, ...]:
    found: list[BuiltinCall] = []
    for i in range(len(tokens) - 2):
        a, b, c = tokens[i], tokens[i + 1], tokens[i + 2]
        if a.text == "with" and b.text == "input" and c.text == "as":
            found.append(BuiltinCall("with input as", a.line, a.column))
    return tuple(found)


def _function_heads(tokens: list[Token]) -> tuple[FunctionHead, ...]:
    # A function head is `name(` starting a line at the top level; its arity is the number
    # of top-level commas in the parentheses, plus one.
    heads: list[FunctionHead] = []
    depth = 0
    previous_end_line = 0
    for i, tok in enumerate(tokens):
        starts_line = tok.line > previous_end_line
        previous_end_line = tok.end_line
        if tok.kind is TokenKind.PUNCT:
            if tok.text in "{[(":
                depth += 1
            elif tok.text in "}])":
                depth = max(0, depth - 1)
            continue
        if not (
            depth == 0
            and starts_line
            and tok.kind is TokenKind.IDENT
            and i + 1 < len(tokens)
            and tokens[i + 1].text == "("
        ):
            continue
        arity, inner = 1, 0
        for follower in tokens[i + 2 :]:
            if follower.text in "{[(":
                inner += 1
            elif follower.text in "}])":
                if inner == 0:
                    break
                inner -= 1
            elif follower.text == "," and inner == 0:
                arity += 1
        heads.append(FunctionHead(tok.text, arity, tok.line, tok.column))
    return tuple(heads)
