# Artifacts must stay inside the workspace and away from protected files.
#
# deny: a target outside the workspace (absolute elsewhere, ~, climbing with ..), or a
# file that data.config.paths marks deny (.env, private keys, .git/, credentials).
# require_approval: a file that data.config.paths marks require_approval (CI configuration).
package cabincrew.preflight.paths

import rego.v1

import data.cabincrew.lib.decision as decision_lib
import data.cabincrew.lib.paths

root := object.get(input, ["context", "workspace_root"], "")

# Complete rules with comprehensions over the artifacts, rather than partial rules or an
# intermediate set of objects: in the embedded engine this costs a fraction per artifact.
outside_findings := {f |
	some a in input.artifacts
	raw := a.artifact.target
	escapes_workspace(a, raw)
	f := {
		"decision": "deny",
		"rule": "outside_workspace",
		"artifact": a.name,
		"path": raw,
		"reason": decision_lib.message(["artifact ", a.name, " targets ", raw, ", which is outside the workspace"]),
	}
}

# The service's lexical verdict (policy_input.normalize_workspace_path); inputs built
# without it get the same check in Rego on the raw path.
escapes_workspace(a, raw) if a.target_in_workspace == false

escapes_workspace(a, raw) if {
	not is_boolean(a.target_in_workspace)
	paths.outside(raw, root)
}

protected_findings := {f |
	some a in input.artifacts
	raw := a.artifact.target
	some checked in checked_paths(a, raw)
	some m in paths.protected_matches(checked)
	f := {
		"decision": m.decision,
		"rule": "protected_path",
		"artifact": a.name,
		"path": raw,
		"reason": decision_lib.message(["artifact ", a.name, " targets ", raw, ", ", m.label]),
	}
}

# The raw target and, when the service normalised it, the normalised one.
checked_paths(a, raw) := {raw, a.target_normalized} if is_string(a.target_normalized) else := {raw}

config_findings := {f |
	not paths.configured
	f := {
		"decision": "deny",
		"rule": "configuration",
		"reason": "data.config.paths is missing, so protected paths cannot be checked",
	}
}

findings := (outside_findings | protected_findings) | config_findings

decision := decision_lib.most_restrictive(findings)

reasons := decision_lib.reasons(findings)

evidence := {"findings": findings}
