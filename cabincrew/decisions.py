"""Decisions, their severities and the protocol's aggregation methods, as pure functions.

Aggregation is fail-closed in the spirit of sigstore's policy combinators: aggregating an
empty list of evaluations is an error, never "allow".
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence


class Decision(enum.Enum):
    """A governance decision; values are the protocol's wire strings."""

    ALLOW = "allow"
    WARN = "warn"
    REQUIRE_APPROVAL = "require_approval"
    DENY = "deny"

    @property
    def severity(self) -> int:
        """Protocol severity: 0 allow, 1 warn, 2 require_approval, 3 deny."""
        return _SEVERITY[self]

    @classmethod
    def parse(cls, value: str) -> Decision:
        """Parse a wire string; unknown strings raise ``ValueError``."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown decision {value!r}") from None

    @classmethod
    def from_severity(cls, severity: int) -> Decision:
        """Return the decision with the given severity."""
        for decision, sev in _SEVERITY.items():
            if sev == severity:
                return decision
        raise ValueError(f"unknown severity {severity!r}")


_SEVERITY = {
    Decision.ALLOW: 0,
    Decision.WARN: 1,
    Decision.REQUIRE_APPROVAL: 2,
    Decision.DENY: 3,
}


class AggregationMethod(enum.Enum):
    """How individual decisions combine; values are the protocol's wire strings."""

    MOST_RESTRICTIVE = "most_restrictive"
    UNANIMOUS = "unanimous"
    MAJORITY = "majority"
    ANY_DENY = "any_deny"
    ALL_ALLOW = "all_allow"

    @classmethod
    def parse(cls, value: str) -> AggregationMethod:
        """Parse a wire string; ``custom`` and unknown strings raise ``ValueError``."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown or unsupported aggregation method {value!r}") from None


class EmptyDecisionSet(ValueError):
    """Raised when asked to aggregate nothing: an empty set must never mean allow."""


def most_restrictive(decisions: Sequence[Decision]) -> Decision:
    """The most severe decision wins."""
    _require(decisions)
    return max(decisions, key=lambda d: d.severity)


def unanimous(decisions: Sequence[Decision]) -> Decision:
    """Evaluators that all agree decide; any disagreement goes to a human at least."""
    _require(decisions)
    first = decisions[0]
    if all(d is first for d in decisions):
        return first
    return max(most_restrictive(decisions), Decision.REQUIRE_APPROVAL, key=lambda d: d.severity)


def majority(decisions: Sequence[Decision]) -> Decision:
    """The most frequent decision wins; ties go to the more restrictive decision."""
    _require(decisions)
    counts: dict[Decision, int] = {}
    for decision in decisions:
        counts[decision] = counts.get(decision, 0) + 1
    return max(counts, key=lambda d: (counts[d], d.severity))


def any_deny(decisions: Sequence[Decision]) -> Decision:
    """Only a deny blocks: deny if any denies, warn if any is not allow, else allow.

    This is the advisory mode: require_approval votes are downgraded to warnings.
    """
    _require(decisions)
    if any(d is Decision.DENY for d in decisions):
        return Decision.DENY
    if any(d is not Decision.ALLOW for d in decisions):
        return Decision.WARN
    return Decision.ALLOW


def all_allow(decisions: Sequence[Decision]) -> Decision:
    """Allow only when all allow; anything else denies."""
    _require(decisions)
    if all(d is Decision.ALLOW for d in decisions):
        return Decision.ALLOW
    return Decision.DENY


_METHODS = {
    AggregationMethod.MOST_RESTRICTIVE: most_restrictive,
    AggregationMethod.UNANIMOUS: unanimous,
    AggregationMethod.MAJORITY: majority,
    AggregationMethod.ANY_DENY: any_deny,
    AggregationMethod.ALL_ALLOW: all_allow,
}


def aggregate(method: AggregationMethod, decisions: Iterable[Decision]) -> Decision:
    """Combine decisions with ``method``; raises ``EmptyDecisionSet`` for none."""
    return _METHODS[method](list(decisions))


def _require(decisions: Sequence[Decision]) -> None:
    if not decisions:
        raise EmptyDecisionSet("no decisions to aggregate: an empty policy set is never allow")
