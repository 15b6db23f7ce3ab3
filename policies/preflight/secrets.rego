# No secrets in what a step is about to write.
#
# deny: a secret reported by the service's scanner (stats.secrets_found), or a body that
# matches a secret pattern of data.config.secrets with decision deny; patterns with another
# decision (hard-coded credentials: require_approval) give that decision.
package cabincrew.preflight.secrets

import rego.v1

import data.cabincrew.lib.decision as decision_lib
import data.cabincrew.lib.secrets

scanner_findings := {f |
	some s in input.stats.secrets_found
	where := object.get(s, "artifact", "a step artifact")
	f := {
		"decision": "deny",
		"rule": "secret_scanner",
		"kind": s.kind,
		"artifact": where,
		"reason": decision_lib.message(["the secret scanner found ", s.kind, " in ", where]),
	}
}

pattern_findings := {f |
	some a in input.artifacts
	some m in secrets.matches(a.body_text)
	f := {
		"decision": m.decision,
		"rule": "secret_pattern",
		"kind": m.label,
		"artifact": a.name,
		"reason": decision_lib.message(["artifact ", a.name, " contains ", m.label]),
	}
}

config_findings := {f |
	not secrets.configured
	f := {
		"decision": "deny",
		"rule": "configuration",
		"reason": "data.config.secrets is missing, so bodies cannot be checked for secrets",
	}
}

# Complete rules with comprehensions: in the embedded engine, partial (`contains`) rules
# cost several times more.
findings := (scanner_findings | pattern_findings) | config_findings

decision := decision_lib.most_restrictive(findings)

reasons := decision_lib.reasons(findings)

evidence := {"findings": findings}
