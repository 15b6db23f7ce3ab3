# Prompts that ask a model to reveal or send out secrets are denied.
#
# Each text of a request is lower-cased and matched against
# data.config.llm.exfiltration_patterns; a match gives the pattern's decision (deny by
# default); as for secrets, texts are screened first (`screen` holds every hint), and a
# pattern runs only when one of its lower-case `hints` occurs.
# The patterns are heuristics; the ONNX classifiers complement them.
package cabincrew.llm.exfiltration

import rego.v1

import data.cabincrew.lib.decision as decision_lib
import data.cabincrew.lib.paths
import data.cabincrew.lib.secrets

request_findings := {f |
	input.phase == "request"
	some i
	text := input.texts[i]
	lowered := lower(text)
	secrets.contains_any(lowered, data.config.llm.screen)
	some rule in data.config.llm.exfiltration_patterns
	paths.hinted(lowered, rule)
	regex.match(rule.pattern, lowered)
	f := {
		"decision": object.get(rule, "decision", "deny"),
		"rule": "exfiltration",
		"label": rule.label,
		"text_index": i,
		"reason": decision_lib.message(["the request asks for ", rule.label]),
	}
}

config_findings := {f |
	not is_array(data.config.llm.exfiltration_patterns)
	f := {
		"decision": "deny",
		"rule": "configuration",
		"reason": "data.config.llm.exfiltration_patterns is missing",
	}
}

findings := request_findings | config_findings

decision := decision_lib.most_restrictive(findings)

reasons := decision_lib.reasons(findings)

evidence := {"findings": findings}
