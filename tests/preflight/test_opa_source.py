"""The lexical scan of Rego source that runs before anything reaches the engine."""

from __future__ import annotations

import pytest

from preflight_svc.errors import PolicySyntaxError
from preflight_svc.opa_source import is_forbidden_builtin, scan_module


def test_the_package_path_is_read_from_the_first_statement() -> None:
    scan = scan_module("a.rego", "# comment\npackage cabincrew.preflight.paths\nimport rego.v1\n")
    assert scan.package == "cabincrew.preflight.paths"


def test_a_module_without_a_package_is_a_syntax_error() -> None:
    with pytest.raises(PolicySyntaxError):
        scan_module("a.rego", "x := 1\n")


def test_package_paths_under_data_or_the_internal_namespace_are_refused() -> None:
    with pytest.raises(PolicySyntaxError):
        scan_module("a.rego", "package cabincrew_internal.eval\n")
    with pytest.raises(PolicySyntaxError):
        scan_module("a.rego", "package data.x\n")


def test_builtin_names_in_comments_and_strings_are_not_calls() -> None:
    source = (
        'package p\n# http.send(x) is refused\na := "time.now_ns()"\nb := `rand.intn("x", 3)`\n'
    )
    assert scan_module("a.rego", source).forbidden_calls() == ()


def test_forbidden_calls_are_reported_with_file_line_and_column() -> None:
    source = "package p\n\nx := y if {\n  y := time.now_ns()\n}\n"
    (violation,) = scan_module("dir/a.rego", source).forbidden_calls()
    assert (violation.path, violation.line, violation.column, violation.builtin) == (
        "dir/a.rego",
        4,
        8,
        "time.now_ns",
    )


def test_a_call_split_by_whitespace_is_still_found() -> None:
    (violation,) = scan_module("a.rego", "package p\nx := http . send({})\n").forbidden_calls()
    assert violation.builtin == "http.send"


def test_user_functions_under_data_are_not_builtins() -> None:
    assert scan_module("a.rego", "package p\nx := data.net.f(1)\n").forbidden_calls() == ()


def test_a_multi_line_raw_string_keeps_line_numbers_right() -> None:
    source = 'package p\nr := `a\nb\nc`\nx := uuid.rfc4122("k")\n'
    (violation,) = scan_module("a.rego", source).forbidden_calls()
    assert violation.line == 5


def test_an_unterminated_string_is_a_syntax_error() -> None:
    with pytest.raises(PolicySyntaxError):
        scan_module("a.rego", 'package p\nx := "abc\n')


@pytest.mark.parametrize(
    "name",
    ["http.send", "time.now_ns", "rand.intn", "uuid.rfc4122", "opa.runtime", "net.lookup_ip_addr"],
)
def test_nondeterministic_and_outward_builtins_are_forbidden(name: str) -> None:
    assert is_forbidden_builtin(name)


def test_deterministic_builtins_are_allowed() -> None:
    assert not is_forbidden_builtin("time.parse_rfc3339_ns")
    assert not is_forbidden_builtin("regex.match")


def test_test_rules_are_top_level_rules_named_test() -> None:
    source = (
        "package p_test\n"
        "test_one if { true }\n"
        "test_two if {\n  test_inner := 1\n}\n"
        "helper := 1\n"
        "test_one if { false }\n"
    )
    assert scan_module("a_test.rego", source).test_rules == ("test_one", "test_two")


def test_whole_input_replacement_is_found() -> None:
    source = (
        "package p\n"
        "test_x if { data.q.r with input as {} }\n"
        "test_y if { data.q.r with input.a as 1 }\n"
    )
    (found,) = scan_module("a.rego", source).whole_input_withs
    assert found.line == 2


def test_function_heads_are_found_with_their_arity() -> None:
    source = 'package p\nf(a, b) := x if { x := g([a, b], {"k": 1}) }\ng(x, y) := 1\nv := f(1, 2)\n'
    heads = scan_module("a.rego", source).functions
    assert [(h.name, h.arity) for h in heads] == [("f", 2), ("g", 2)]
