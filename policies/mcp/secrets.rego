# No secrets through the MCP gateway, in either direction.
#
# deny: a secret reported by the service's scanner (secrets_found), or a text of the
# request or response that matches a secret pattern (data.config.secrets).
package cabincrew.mcp.secrets

import rego.v1

import data.cabincrew.lib.decision as decision_lib
import data.cabincrew.lib.secrets

scanner_findings := {f |
	some s in object.get(input, "secrets_found", [])
	f := {
		"decision": "deny",
		"rule": "secret_scanner",
		"kind": s.kind,
		"reason": decision_lib.message(["the secret scanner found ", s.kind, " in the ", input.phase]),
	}
}

pattern_findings := {f |
	some i
	text := input.texts[i]
	some m in secrets.matches(text)
	f := {
		"decision": m.decision,
		"rule": "secret_pattern",
		"kind": m.label,
		"text_index": i,
		"reason": decision_lib.message(["the ", input.phase, " contains ", m.label]),
	}
}

config_findings := {f |
	not secrets.configured
	f := {"decision": "deny", "rule": "configuration", "reason": "data.config.secrets is missing"}
}

findings := (scanner_findings | pattern_findings) | config_findings

decision := decision_lib.most_restrictive(findings)

reasons := decision_lib.reasons(findings)

evidence := {"findings": findings}
