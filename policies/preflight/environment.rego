# Some environments need a person with a given role to approve every change.
#
# data.config.preflight.environments maps an environment name (lower case) to the decision
# it calls for and the role of the approver; by default production needs approval by a
# release-manager.
package cabincrew.preflight.environment

import rego.v1

import data.cabincrew.lib.decision as decision_lib

# Messages quote the name as given, matching uses lower case.
given := object.get(input, ["context", "environment"], "")

environment := lower(given)

rule := data.config.preflight.environments[environment]

env_findings := {f |
	f := {
		"decision": rule.decision,
		"rule": "environment",
		"environment": given,
		"required_role": object.get(rule, "required_role", ""),
		"reason": explain(given, rule),
	}
}

explain(env, r) := decision_lib.message(["changes to the ", env, " environment need approval by a ", r.required_role]) if {
	r.decision == "require_approval"
	r.required_role
} else := decision_lib.message(["changes to the ", env, " environment get decision ", r.decision])

config_findings := {f |
	not is_object(data.config.preflight.environments)
	f := {
		"decision": "deny",
		"rule": "configuration",
		"reason": "data.config.preflight.environments is missing, so the environment cannot be checked",
	}
}

findings := env_findings | config_findings

decision := decision_lib.most_restrictive(findings)

reasons := decision_lib.reasons(findings)

required_role := rule.required_role if decision == "require_approval"

evidence := {"findings": findings}
