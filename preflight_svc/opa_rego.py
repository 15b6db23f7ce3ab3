"""A small typed layer over regopy (rego-cpp), the embedded Rego engine.

regopy has no type stubs and its ``Output`` class parses results with ``json.loads`` even
when the engine returned an error node (which raises, or worse); everything untyped or
unsafe about it stays in this module. Findings about regopy 1.5.2 that shape it:

- ``Interpreter.build`` compiles modules and data once into a ``Bundle``; querying an
  entrypoint of that bundle with a new input costs tens of microseconds, while
  ``Interpreter.query`` recompiles every time (about a millisecond).
- An interpreter carries the input as state (set, then query), so one interpreter must not
  serve two threads at once. ``CompiledRego`` is therefore single-user; callers pool them.
- Errors come back as error nodes (``ErrorSeq``/``Error``) with a message and a code, not as
  exceptions; compile problems such as unknown functions also only surface at query time.
- Setting the input costs about 0.5 microseconds per JSON node in the engine, plus the
  ctypes calls; parsing the input from JSON text inside the engine is slower still, so the
  input is built node by node here, without regopy's per-node ABC checks and buffers.
- Strings cross the C API NUL-terminated: an embedded NUL would silently cut the rest of
  the string off, which could hide content from a policy. NULs become U+FFFD instead.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import regopy
from regopy import rego_shared as _rs

from preflight_svc.errors import PolicyLoadError, PolicySyntaxError

_LIB: Any = _rs.rego

# Node kinds of the C API (rego_shared.NodeKind) that the output parsing needs.
_KIND_TERM: Final = 1002
_KIND_SCALAR: Final = 1003
_KIND_ARRAY: Final = 1004
_KIND_SET: Final = 1005
_KIND_OBJECT: Final = 1006
_KIND_INT: Final = 1008
_KIND_FLOAT: Final = 1009
_KIND_STRING: Final = 1010
_KIND_TRUE: Final = 1011
_KIND_FALSE: Final = 1012
_KIND_NULL: Final = 1013
_KIND_UNDEFINED: Final = 1014
_KIND_TERMS: Final = 1015
_KIND_RESULTS: Final = 1017
_KIND_ERROR: Final = 1800
_KIND_ERROR_MESSAGE: Final = 1801
_KIND_ERROR_CODE: Final = 1803
_KIND_ERROR_SEQ: Final = 1804

_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


@dataclass(frozen=True)
class RegoModule:
    """A Rego module: the name errors will show (a bundle-relative path) and its source."""

    name: str
    source: str


@dataclass(frozen=True)
class RegoFailure:
    """An error the engine reported for a query."""

    code: str
    message: str

    @property
    def is_runtime(self) -> bool:
        """Whether the error depends on the input (eval_*), rather than on the policy."""
        return self.code.startswith("eval_")

    def __str__(self) -> str:
        return f"{self.message} ({self.code})"


class _Undefined:
    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED: Final = _Undefined()


@dataclass(frozen=True)
class QueryOutcome:
    """The value of a query (or ``UNDEFINED``), or the errors that stopped it."""

    value: Any
    failures: tuple[RegoFailure, ...] = ()

    @property
    def ok(self) -> bool:
        """Whether the query ran to completion."""
        return not self.failures


class CompiledRego:
    """One interpreter and the bundle compiled in it; serves one caller at a time."""

    def __init__(
        self,
        modules: Sequence[RegoModule],
        data: Mapping[str, Any],
        entrypoints: Sequence[str],
    ) -> None:
        interpreter = regopy.Interpreter()
        # The engine otherwise prints compile errors on stdout; they are returned instead.
        interpreter.log_level = regopy.LogLevel.NONE
        # Without this a builtin that fails (a type error, a bad regex) is merely undefined,
        # which can turn a deny rule off: fail closed and make it an error.
        interpreter.strict_built_in_errors = True
        by_name = {m.name: m for m in modules}
        for module in modules:
            try:
                interpreter.add_module(module.name, module.source)
            except regopy.RegoError as exc:
                raise _syntax_error(str(exc), by_name, module) from None
        try:
            interpreter.add_data_json(json.dumps(data, allow_nan=False))
            bundle = interpreter.build(None, list(entrypoints))
        except regopy.RegoError as exc:
            raise _syntax_error(str(exc), by_name, None) from None
        if not bundle.ok():
            detail = _rs.rego_get_error(interpreter._impl).strip()
            raise PolicyLoadError(f"the Rego engine could not build the policy bundle: {detail}")
        self._interpreter = interpreter
        self._bundle = bundle
        self._module_names = tuple(m.name for m in modules)

    def set_input(self, document: Any) -> None:
        """Make ``document`` (JSON values only) the input of the next queries."""
        handle = _LIB.regoNewInput()
        try:
            _add_input(handle, document)
            _rs.rego_set_input(self._interpreter._impl, handle)
        finally:
            _LIB.regoFreeInput(handle)

    def query(self, entrypoint: str) -> QueryOutcome:
        """Evaluate one entrypoint (``a/b/rule``) of the bundle against the current input."""
        try:
            output = _rs.rego_bundle_query_entrypoint(
                self._interpreter._impl, self._bundle._impl, entrypoint
            )
        except regopy.RegoError as exc:
            return QueryOutcome(UNDEFINED, (RegoFailure("rego_error", str(exc).strip()),))
        if not output:
            return QueryOutcome(UNDEFINED, (RegoFailure("rego_error", "no output"),))
        try:
            return _read_output(output)
        finally:
            _rs.rego_free_output(output)

    def builtins(self) -> frozenset[str]:
        """Names of the builtins that the compiled plans call, from the bundle's AST.

        The layout is that of rego-cpp 1.5.2 bundles; if it ever differs, this refuses
        rather than reporting an empty (and therefore permissive) answer.
        """
        root = _rs.rego_bundle_node(self._bundle._impl)
        try:
            plans = _children(root)[1]
            tables = _children(plans)[0]
            _strings, files, builtins = _children(tables)[:3]
        except (IndexError, ValueError):
            raise PolicyLoadError("unexpected compiled bundle layout from regopy") from None
        if sorted(_value(f) for f in _children(files)) != sorted(self._module_names):
            raise PolicyLoadError("unexpected compiled bundle layout from regopy")
        names = set()
        for decl in _children(builtins):
            parts = _children(decl)
            if not parts:
                raise PolicyLoadError("unexpected compiled bundle layout from regopy")
            names.add(_value(parts[0]))
        return frozenset(names)


def _children(node: Any) -> list[Any]:
    return [_rs.rego_node_get(node, i) for i in range(_rs.rego_node_size(node))]


def _value(node: Any) -> str:
    return str(_rs.rego_node_value(node))


def _read_output(output: Any) -> QueryOutcome:
    # The engine's JSON rendering of results does not escape quotes, backslashes or
    # newlines inside strings, so a crafted input string could forge structure (even a
    # second "decision" key) in it; results are therefore read from the node tree.
    node = _rs.rego_output_node(output)
    if not node:
        return QueryOutcome(UNDEFINED, (RegoFailure("rego_error", "no output node"),))
    kind = _LIB.regoNodeType(node)
    if kind in (_KIND_ERROR, _KIND_ERROR_SEQ):
        return QueryOutcome(UNDEFINED, tuple(_failures(node)))
    if kind == _KIND_UNDEFINED:
        return QueryOutcome(UNDEFINED)
    if kind != _KIND_RESULTS:
        return QueryOutcome(UNDEFINED, (RegoFailure("rego_error", "unexpected output"),))
    results = _children(node)
    if not results:
        return QueryOutcome(UNDEFINED)
    if len(results) != 1:
        return QueryOutcome(UNDEFINED, (RegoFailure("rego_error", "more than one result"),))
    for part in _children(results[0]):
        if _LIB.regoNodeType(part) == _KIND_TERMS:
            expressions = _children(part)
            if len(expressions) == 1:
                return QueryOutcome(_to_python(expressions[0]))
    return QueryOutcome(UNDEFINED)


def _to_python(node: Any) -> Any:
    kind = _LIB.regoNodeType(node)
    if kind == _KIND_STRING:
        return _text(node)
    if kind == _KIND_OBJECT:
        out: dict[str, Any] = {}
        for item in _children(node):
            key_node, value_node = _children(item)
            key = _to_python(key_node)
            if not isinstance(key, str):
                key = json.dumps(key, sort_keys=True)
            out[key] = _to_python(value_node)
        return out
    if kind in (_KIND_ARRAY, _KIND_SET):
        return [_to_python(child) for child in _children(node)]
    if kind == _KIND_INT:
        return int(_text(node))
    if kind == _KIND_FLOAT:
        return float(_text(node))
    if kind == _KIND_TRUE:
        return True
    if kind == _KIND_FALSE:
        return False
    if kind == _KIND_NULL:
        return None
    if kind in (_KIND_TERM, _KIND_SCALAR):
        return _to_python(_children(node)[0])
    raise ValueError(f"unexpected node kind {kind} in a result")


def _text(node: Any) -> str:
    size = _LIB.regoNodeValueSize(node)
    buffer = ctypes.create_string_buffer(size)
    if _LIB.regoNodeValue(node, buffer, size) != 0:
        raise ValueError("cannot read a result value")
    return buffer.raw[: max(size - 1, 0)].decode("utf-8", errors="replace")


def _failures(node: Any) -> Iterable[RegoFailure]:
    kind = _LIB.regoNodeType(node)
    if kind == _KIND_ERROR_SEQ:
        for child in _children(node):
            yield from _failures(child)
        return
    if kind != _KIND_ERROR:
        return
    message, code = "unknown error", "rego_error"
    for child in _children(node):
        child_kind = _LIB.regoNodeType(child)
        if child_kind == _KIND_ERROR_MESSAGE:
            message = _value(child)
        elif child_kind == _KIND_ERROR_CODE:
            code = _value(child) or code
    yield RegoFailure(code, message)


def _encode(text: str) -> bytes:
    return text.replace("\x00", "\ufffd").encode("utf-8", errors="replace")


def _add_input(handle: Any, value: Any) -> None:
    kind = type(value)
    if kind is str:
        _LIB.regoInputString(handle, _encode(value))
    elif kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"input object keys must be strings, not {type(key).__name__}")
            _LIB.regoInputString(handle, _encode(key))
            _add_input(handle, item)
            _LIB.regoInputObjectItem(handle)
        _LIB.regoInputObject(handle, len(value))
    elif kind is list or kind is tuple:
        for item in value:
            _add_input(handle, item)
        _LIB.regoInputArray(handle, len(value))
    elif kind is bool:
        _LIB.regoInputBoolean(handle, value)
    elif kind is int:
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise TypeError("input integers must fit in 64 bits")
        _LIB.regoInputInt(handle, value)
    elif kind is float:
        if not math.isfinite(value):
            raise TypeError("input numbers must be finite")
        _LIB.regoInputFloat(handle, value)
    elif value is None:
        _LIB.regoInputNull(handle)
    elif isinstance(value, Mapping):
        _add_input(handle, dict(value))
    elif isinstance(value, (list, tuple)):
        _add_input(handle, list(value))
    else:
        raise TypeError(f"input values must be JSON values, not {type(value).__name__}")


# rego-cpp reports positions as `<len>:<file>|<byte offset>|<length>` and messages as
# `(errormsg <len>:<text>)`; the lengths make the fields unambiguous.
_ERROR_POSITION = re.compile(r"\(error (\d+):")
_ERROR_MESSAGE = re.compile(r"\(errormsg (\d+):")


def _syntax_error(
    text: str, modules: Mapping[str, RegoModule], fallback: RegoModule | None
) -> PolicySyntaxError:
    position = _ERROR_POSITION.search(text)
    name = fallback.name if fallback else "<bundle>"
    line = column = 1
    if position:
        start = position.end()
        length = int(position.group(1))
        name = text[start : start + length]
        rest = text[start + length :].split("|")
        if len(rest) >= 2 and rest[1].isdigit() and name in modules:
            line, column = _line_column(modules[name].source, int(rest[1]))
    message = "does not compile"
    found = _ERROR_MESSAGE.search(text)
    if found:
        start = found.end()
        message = text[start : start + int(found.group(1))]
    return PolicySyntaxError(name, line, column, message)


def _line_column(source: str, byte_offset: int) -> tuple[int, int]:
    prefix = source.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore")
    line = prefix.count("\n") + 1
    column = len(prefix) - (prefix.rfind("\n") + 1) + 1
    return line, column
