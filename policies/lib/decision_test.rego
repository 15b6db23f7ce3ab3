package cabincrew.lib.decision_test

import rego.v1

import data.cabincrew.lib.decision

test_no_findings_means_allow if {
	decision.most_restrictive(set()) == "allow"
}

test_the_most_severe_finding_wins if {
	findings := {
		{"decision": "warn", "reason": "a"},
		{"decision": "deny", "reason": "b"},
		{"decision": "require_approval", "reason": "c"},
	}
	decision.most_restrictive(findings) == "deny"
	decision.reasons(findings) == {"a", "b", "c"}
}

test_a_finding_with_an_unknown_decision_denies if {
	decision.most_restrictive({{"decision": "block", "reason": "typo"}}) == "deny"
}

test_allow_findings_allow if {
	decision.most_restrictive({{"decision": "allow", "reason": "fine"}}) == "allow"
}
