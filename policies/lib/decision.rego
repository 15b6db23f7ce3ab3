# Helpers shared by the default policies: combining findings into the output convention.
#
# A policy collects `findings`, each an object with at least `decision` and `reason`, and
# then defines:
#   decision := decision_lib.most_restrictive(findings)
#   reasons := decision_lib.reasons(findings)
#
# Reasons are built with message(), not sprintf: the embedded engine (rego-cpp 1.5.2)
# keeps the JSON quotes of strings made by concat, lower, upper or replace (and of strings
# passed through a function) when they are printed by sprintf's %s or returned as values.
package cabincrew.lib.decision

import rego.v1

# The most severe decision among the findings; allow when there are none, and deny when a
# finding carries anything but the four decisions (a typo in data must not allow). Written
# as a chain of tests rather than with a severity table: the engine rebuilds constant
# tables on every query.
most_restrictive(findings) := "deny" if {
	some f in findings
	f.decision == "deny"
} else := "require_approval" if {
	some f in findings
	f.decision == "require_approval"
} else := "warn" if {
	some f in findings
	f.decision == "warn"
} else := "deny" if {
	some f in findings
	f.decision != "allow"
} else := "allow"

# The reasons of the findings, as a set of strings.
reasons(findings) := {f.reason | some f in findings}

# A message from its parts. trim_space turns the engine's quoted strings into plain ones.
message(parts) := trim_space(concat("", parts))
