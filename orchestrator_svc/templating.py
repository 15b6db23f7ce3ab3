"""Templates in step config and ``when`` conditions: a tiny, safe expression language.

Nothing here evaluates host code: expressions are tokenised and parsed by hand into a handful
of node types, and evaluated over plain JSON values. Names may only be ``inputs.<name>...``,
``steps.<id>.outputs.<key>...`` and ``steps.<id>.decision``. Comparison is strict: ``true``
never equals ``1``, and ``and``/``or``/``not`` accept only booleans.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cabincrew.canonical import canonical_json
from orchestrator_svc.errors import ExpressionError, ExpressionSyntaxError

MAX_EXPRESSION_LENGTH = 4096
MAX_DEPTH = 32

NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_TOKEN = re.compile(
    rf"""
    (?P<ws>\s+)
  | (?P<number>-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<op>==|!=|\(|\)|\[|\]|,)
  | (?P<path>{NAME}(?:\.{NAME})*)
    """,
    re.VERBOSE,
)
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
_KEYWORDS = {"and", "or", "not", "in"}
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}


@dataclass(frozen=True)
class Reference:
    """A name in an expression: an input, a step's output, or a step's decision."""

    root: Literal["inputs", "steps"]
    name: str  # the input name or the step id
    field: Literal["value", "outputs", "decision"]
    keys: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.root == "inputs":
            return ".".join(("inputs", self.name, *self.keys))
        return ".".join(("steps", self.name, self.field, *self.keys))

    @classmethod
    def parse(cls, dotted: str) -> Reference:
        """Parse a dotted name; anything but the allowed roots raises ``ExpressionSyntaxError``."""
        parts = dotted.split(".")
        if any(part.startswith("__") for part in parts):
            # Lookups are dictionary-only, but dunder names have no business in a workflow.
            raise ExpressionSyntaxError(f"name {dotted!r} uses a reserved '__' segment")
        if parts[0] == "inputs" and len(parts) >= 2:
            return cls("inputs", parts[1], "value", tuple(parts[2:]))
        if parts[0] == "steps" and len(parts) >= 4 and parts[2] == "outputs":
            return cls("steps", parts[1], "outputs", tuple(parts[3:]))
        if parts[0] == "steps" and len(parts) == 3 and parts[2] == "decision":
            return cls("steps", parts[1], "decision")
        raise ExpressionSyntaxError(
            f"unknown name {dotted!r}: use inputs.<name>, steps.<id>.outputs.<key> "
            "or steps.<id>.decision"
        )


@dataclass(frozen=True)
class StepValues:
    """What later steps may see of a step that succeeded: its outputs and its decision."""

    outputs: Mapping[str, Any] = field(default_factory=dict)
    decision: str | None = None


@dataclass(frozen=True)
class Scope:
    """The values an expression is evaluated against."""

    inputs: Mapping[str, Any]
    steps: Mapping[str, StepValues]

    def resolve(self, ref: Reference) -> Any:
        """Return the value a reference names; a missing value raises ``ExpressionError``."""
        if ref.root == "inputs":
            if ref.name not in self.inputs:
                raise ExpressionError(f"{ref}: input {ref.name!r} has no value")
            return _descend(self.inputs[ref.name], ref.keys, ref)
        step = self.steps.get(ref.name)
        if step is None:
            raise ExpressionError(f"{ref}: step {ref.name!r} has not succeeded (yet)")
        if ref.field == "decision":
            if step.decision is None:
                raise ExpressionError(f"{ref}: step {ref.name!r} has no governance decision")
            return step.decision
        key, rest = ref.keys[0], ref.keys[1:]
        if key not in step.outputs:
            known = ", ".join(sorted(step.outputs)) or "none"
            raise ExpressionError(
                f"{ref}: step {ref.name!r} has no output {key!r} (it has: {known})"
            )
        return _descend(step.outputs[key], rest, ref)


def _descend(value: Any, keys: Sequence[str], ref: Reference) -> Any:
    for key in keys:
        if not isinstance(value, Mapping):
            raise ExpressionError(f"{ref}: cannot take {key!r} of a non-object value")
        if key not in value:
            raise ExpressionError(f"{ref}: no key {key!r}")
        value = value[key]
    return value


# --- expression nodes ---------------------------------------------------------------------


@dataclass(frozen=True)
class Const:
    """A literal value."""

    value: Any


@dataclass(frozen=True)
class Ref:
    """A reference to a value in the scope."""

    ref: Reference


@dataclass(frozen=True)
class ListOf:
    """A list literal whose items are expressions."""

    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    """Boolean negation."""

    operand: Node


@dataclass(frozen=True)
class BoolOp:
    """``and`` / ``or`` over two or more operands, short-circuiting."""

    op: Literal["and", "or"]
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Compare:
    """``==``, ``!=``, ``in`` or ``not in``."""

    op: Literal["==", "!=", "in", "not in"]
    left: Node
    right: Node


Node = Const | Ref | ListOf | Not | BoolOp | Compare


@dataclass(frozen=True)
class Condition:
    """A parsed ``when`` condition."""

    source: str
    node: Node

    @classmethod
    def parse(cls, source: str) -> Condition:
        """Parse a condition; anything outside the language raises ``ExpressionSyntaxError``."""
        if len(source) > MAX_EXPRESSION_LENGTH:
            raise ExpressionSyntaxError(
                f"expression longer than {MAX_EXPRESSION_LENGTH} characters"
            )
        parser = _Parser(_tokenise(source), source)
        node = parser.expression(0)
        parser.expect_end()
        return cls(source, node)

    def references(self) -> tuple[Reference, ...]:
        """Return every reference in the condition, in order of appearance."""
        return tuple(_node_refs(self.node))

    def evaluate(self, scope: Scope) -> bool:
        """Evaluate to a boolean; a non-boolean or a type error raises ``ExpressionError``."""
        result = _evaluate(self.node, scope)
        if not isinstance(result, bool):
            raise ExpressionError(f"condition {self.source!r} gave {_kind(result)}, not a boolean")
        return result


def _node_refs(node: Node) -> Iterator[Reference]:
    if isinstance(node, Ref):
        yield node.ref
    elif isinstance(node, ListOf):
        for item in node.items:
            yield from _node_refs(item)
    elif isinstance(node, Not):
        yield from _node_refs(node.operand)
    elif isinstance(node, BoolOp):
        for operand in node.operands:
            yield from _node_refs(operand)
    elif isinstance(node, Compare):
        yield from _node_refs(node.left)
        yield from _node_refs(node.right)


@dataclass(frozen=True)
class _Token:
    kind: Literal["number", "string", "op", "path", "keyword", "literal"]
    text: str
    value: Any
    position: int


def _tokenise(source: str) -> list[_Token]:
    tokens: list[_Token] = []
    position = 0
    while position < len(source):
        match = _TOKEN.match(source, position)
        if match is None:
            raise ExpressionSyntaxError(
                f"unexpected character {source[position]!r} at column {position + 1}"
            )
        kind = match.lastgroup
        text = match.group()
        if kind == "number":
            value: Any = float(text) if any(c in text for c in ".eE") else int(text)
            tokens.append(_Token("number", text, value, position))
        elif kind == "string":
            tokens.append(_Token("string", text, _unquote(text, position), position))
        elif kind == "op":
            tokens.append(_Token("op", text, None, position))
        elif kind == "path":
            if text in _KEYWORDS:
                tokens.append(_Token("keyword", text, None, position))
            elif text in _LITERALS:
                tokens.append(_Token("literal", text, _LITERALS[text], position))
            else:
                tokens.append(_Token("path", text, None, position))
        position = match.end()
    return tokens


def _unquote(text: str, position: int) -> str:
    body = text[1:-1]
    out: list[str] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            escaped = body[index + 1]
            if escaped not in _ESCAPES:
                raise ExpressionSyntaxError(
                    f"unknown escape \\{escaped} in string at column {position + 1}"
                )
            out.append(_ESCAPES[escaped])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


class _Parser:
    """Recursive descent: or > and > not > comparison > atom."""

    def __init__(self, tokens: list[_Token], source: str) -> None:
        self.tokens = tokens
        self.index = 0
        self.source = source

    def peek(self) -> _Token | None:
        return self.tokens[self.index] if self.index < len(self.tokens) else None

    def is_next(self, kind: str, text: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == kind and token.text == text

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise ExpressionSyntaxError(f"expression {self.source!r} ends too early")
        self.index += 1
        return token

    def fail(self, token: _Token | None) -> ExpressionSyntaxError:
        if token is None:
            return ExpressionSyntaxError(f"expression {self.source!r} ends too early")
        return ExpressionSyntaxError(f"unexpected {token.text!r} at column {token.position + 1}")

    def expect_end(self) -> None:
        if self.peek() is not None:
            raise self.fail(self.peek())

    def expression(self, depth: int) -> Node:
        if depth > MAX_DEPTH:
            raise ExpressionSyntaxError(f"expression nests deeper than {MAX_DEPTH} levels")
        operands = [self.conjunction(depth)]
        while self.is_next("keyword", "or"):
            self.take()
            operands.append(self.conjunction(depth))
        return operands[0] if len(operands) == 1 else BoolOp("or", tuple(operands))

    def conjunction(self, depth: int) -> Node:
        operands = [self.negation(depth)]
        while self.is_next("keyword", "and"):
            self.take()
            operands.append(self.negation(depth))
        return operands[0] if len(operands) == 1 else BoolOp("and", tuple(operands))

    def negation(self, depth: int) -> Node:
        if self.is_next("keyword", "not"):
            self.take()
            if depth + 1 > MAX_DEPTH:
                raise ExpressionSyntaxError(f"expression nests deeper than {MAX_DEPTH} levels")
            return Not(self.negation(depth + 1))
        return self.comparison(depth)

    def comparison(self, depth: int) -> Node:
        left = self.atom(depth)
        op: Literal["==", "!=", "in", "not in"]
        if self.is_next("op", "==") or self.is_next("op", "!="):
            op = "==" if self.take().text == "==" else "!="
        elif self.is_next("keyword", "in"):
            self.take()
            op = "in"
        elif self.is_next("keyword", "not"):
            self.take()
            if not self.is_next("keyword", "in"):
                raise self.fail(self.peek())
            self.take()
            op = "not in"
        else:
            return left
        right = self.atom(depth)
        if self.is_next("op", "==") or self.is_next("op", "!=") or self.is_next("keyword", "in"):
            # Chained comparisons read ambiguously; ask for parentheses instead.
            raise ExpressionSyntaxError("chained comparisons need parentheses")
        return Compare(op, left, right)

    def atom(self, depth: int) -> Node:
        token = self.take()
        if token.kind in ("number", "string", "literal"):
            return Const(token.value)
        if token.kind == "path":
            return Ref(Reference.parse(token.text))
        if token.kind == "op" and token.text == "(":
            node = self.expression(depth + 1)
            if not self.is_next("op", ")"):
                raise self.fail(self.peek())
            self.take()
            return node
        if token.kind == "op" and token.text == "[":
            items: list[Node] = []
            if self.is_next("op", "]"):
                self.take()
                return ListOf(())
            while True:
                items.append(self.atom(depth + 1))
                closing = self.take()
                if closing.kind == "op" and closing.text == "]":
                    return ListOf(tuple(items))
                if not (closing.kind == "op" and closing.text == ","):
                    raise self.fail(closing)
        raise self.fail(token)


def _evaluate(node: Node, scope: Scope) -> Any:
    if isinstance(node, Const):
        return node.value
    if isinstance(node, Ref):
        return scope.resolve(node.ref)
    if isinstance(node, ListOf):
        return [_evaluate(item, scope) for item in node.items]
    if isinstance(node, Not):
        return not _boolean(_evaluate(node.operand, scope), "not")
    if isinstance(node, BoolOp):
        for operand in node.operands:
            value = _boolean(_evaluate(operand, scope), node.op)
            if value == (node.op == "or"):
                return value
        return node.op == "and"
    left = _evaluate(node.left, scope)
    right = _evaluate(node.right, scope)
    if node.op == "==":
        return json_equal(left, right)
    if node.op == "!=":
        return not json_equal(left, right)
    found = _contains(right, left)
    return found if node.op == "in" else not found


def _boolean(value: Any, op: str) -> bool:
    if not isinstance(value, bool):
        raise ExpressionError(f"'{op}' needs booleans, got {_kind(value)}")
    return value


def _contains(container: Any, item: Any) -> bool:
    if isinstance(container, list):
        return any(json_equal(item, element) for element in container)
    if isinstance(container, str):
        if not isinstance(item, str):
            raise ExpressionError(f"'in' a string needs a string on the left, got {_kind(item)}")
        return item in container
    raise ExpressionError(f"'in' needs a list or a string on the right, got {_kind(container)}")


def json_equal(left: Any, right: Any) -> bool:
    """Compare JSON values strictly: booleans never equal numbers, 1 equals 1.0."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(json_equal, left, right))
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(json_equal(left[k], right[k]) for k in left)
    return type(left) is type(right) and bool(left == right)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


# --- templates ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A config string with ``{{ ... }}`` placeholders, each a reference or a string literal."""

    source: str
    parts: tuple[str | Reference, ...]

    @classmethod
    def parse(cls, source: str) -> Template:
        """Split a string into literal text and references; malformed ``{{`` raises."""
        parts: list[str | Reference] = []
        position = 0
        while True:
            start = source.find("{{", position)
            if start < 0:
                if position < len(source):
                    parts.append(source[position:])
                break
            end = source.find("}}", start + 2)
            if end < 0:
                raise ExpressionSyntaxError(f"'{{{{' at column {start + 1} is never closed")
            if start > position:
                parts.append(source[position:start])
            parts.append(_placeholder(source[start + 2 : end]))
            position = end + 2
        merged: list[str | Reference] = []
        for part in parts:
            if isinstance(part, str) and merged and isinstance(merged[-1], str):
                merged[-1] += part
            else:
                merged.append(part)
        return cls(source, tuple(merged))

    @property
    def is_static(self) -> bool:
        """Whether the string holds no reference."""
        return all(isinstance(part, str) for part in self.parts)

    def references(self) -> tuple[Reference, ...]:
        """Return the references in order of appearance."""
        return tuple(part for part in self.parts if isinstance(part, Reference))

    def render(self, scope: Scope) -> Any:
        """A lone placeholder keeps its JSON type; otherwise values are spliced in as text."""
        if len(self.parts) == 1 and isinstance(self.parts[0], Reference):
            return copy.deepcopy(scope.resolve(self.parts[0]))
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            else:
                value = scope.resolve(part)
                out.append(value if isinstance(value, str) else _as_text(value, part))
        return "".join(out)


def _as_text(value: Any, ref: Reference) -> str:
    try:
        return canonical_json(value).decode("utf-8")
    except Exception as exc:  # rfc8785 raises its own types for out-of-domain numbers
        raise ExpressionError(f"{ref}: value cannot be written as JSON text") from exc


def _placeholder(inner: str) -> str | Reference:
    tokens = _tokenise(inner)
    if len(tokens) != 1 or tokens[0].kind not in ("path", "string"):
        raise ExpressionSyntaxError(
            f"placeholder {{{{{inner}}}}} must hold exactly one reference or one string literal"
        )
    token = tokens[0]
    if token.kind == "string":
        text: str = token.value
        return text
    return Reference.parse(token.text)


def string_leaves(
    value: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Yield ``(path, string)`` for every string inside a JSON value (keys excluded)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from string_leaves(item, (*path, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from string_leaves(item, (*path, index))


def render_config(config: Mapping[str, Any], scope: Scope) -> dict[str, Any]:
    """Return a deep copy of ``config`` with every string template rendered against ``scope``."""
    rendered = _render(config, scope)
    assert isinstance(rendered, dict)
    return rendered


def _render(value: Any, scope: Scope) -> Any:
    if isinstance(value, str):
        template = Template.parse(value)
        return value if template.is_static else template.render(scope)
    if isinstance(value, Mapping):
        return {key: _render(item, scope) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_render(item, scope) for item in value]
    return value


def step_outputs(
    metrics: Sequence[Mapping[str, Any]], outputs_document: Mapping[str, Any] | None
) -> dict[str, Any]:
    """Merge a receipt's metrics (name -> value) with an ``outputs`` document (which wins)."""
    merged: dict[str, Any] = {}
    for metric in metrics:
        merged[str(metric["name"])] = metric["value"]
    if outputs_document is not None:
        merged.update(copy.deepcopy(dict(outputs_document)))
    return merged


__all__ = [
    "Condition",
    "Reference",
    "Scope",
    "StepValues",
    "Template",
    "json_equal",
    "render_config",
    "step_outputs",
    "string_leaves",
]
