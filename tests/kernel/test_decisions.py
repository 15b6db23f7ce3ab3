import pytest
from hypothesis import given
from hypothesis import strategies as st

from cabincrew.decisions import AggregationMethod, Decision, EmptyDecisionSet, aggregate

D = Decision
decisions = st.lists(st.sampled_from(list(Decision)), min_size=1, max_size=12)


def test_severities_follow_the_protocol() -> None:
    assert [d.severity for d in (D.ALLOW, D.WARN, D.REQUIRE_APPROVAL, D.DENY)] == [0, 1, 2, 3]


@pytest.mark.parametrize("method", list(AggregationMethod))
def test_an_empty_set_is_never_allow(method: AggregationMethod) -> None:
    with pytest.raises(EmptyDecisionSet):
        aggregate(method, [])


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        (AggregationMethod.MOST_RESTRICTIVE, D.REQUIRE_APPROVAL),
        (AggregationMethod.UNANIMOUS, D.REQUIRE_APPROVAL),
        (AggregationMethod.MAJORITY, D.ALLOW),
        (AggregationMethod.ANY_DENY, D.WARN),
        (AggregationMethod.ALL_ALLOW, D.DENY),
    ],
)
def test_each_method_on_a_mixed_set(method: AggregationMethod, expected: Decision) -> None:
    assert aggregate(method, [D.ALLOW, D.ALLOW, D.WARN, D.REQUIRE_APPROVAL, D.ALLOW]) is expected


@given(decisions)
def test_a_deny_anywhere_denies_under_most_restrictive_any_deny_and_all_allow(
    ds: list[Decision],
) -> None:
    with_deny = [*ds, D.DENY]
    for method in (
        AggregationMethod.MOST_RESTRICTIVE,
        AggregationMethod.ANY_DENY,
        AggregationMethod.ALL_ALLOW,
    ):
        assert aggregate(method, with_deny) is D.DENY


@given(decisions)
def test_adding_an_allow_never_makes_most_restrictive_stricter(ds: list[Decision]) -> None:
    before = aggregate(AggregationMethod.MOST_RESTRICTIVE, ds)
    after = aggregate(AggregationMethod.MOST_RESTRICTIVE, [*ds, D.ALLOW])
    assert after.severity <= before.severity


@given(decisions)
def test_unanimous_is_never_more_lenient_than_most_restrictive(ds: list[Decision]) -> None:
    assert (
        aggregate(AggregationMethod.UNANIMOUS, ds).severity
        >= aggregate(AggregationMethod.MOST_RESTRICTIVE, ds).severity
    )


@given(decisions)
def test_all_allow_allows_only_when_everything_allows(ds: list[Decision]) -> None:
    result = aggregate(AggregationMethod.ALL_ALLOW, ds)
    assert (result is D.ALLOW) == all(d is D.ALLOW for d in ds)


@given(st.sampled_from(list(Decision)), st.integers(min_value=1, max_value=8))
def test_every_method_agrees_with_a_unanimous_set_except_any_deny_downgrades(
    d: Decision, n: int
) -> None:
    for method in AggregationMethod:
        result = aggregate(method, [d] * n)
        if method is AggregationMethod.ANY_DENY and d is D.REQUIRE_APPROVAL:
            assert result is D.WARN
        elif method is AggregationMethod.ALL_ALLOW and d is not D.ALLOW:
            assert result is D.DENY
        else:
            assert result is d


@given(decisions)
def test_majority_result_is_one_of_the_inputs(ds: list[Decision]) -> None:
    assert aggregate(AggregationMethod.MAJORITY, ds) in ds


def test_parse_rejects_unknown_strings() -> None:
    with pytest.raises(ValueError):
        Decision.parse("maybe")
    with pytest.raises(ValueError):
        AggregationMethod.parse("custom")
