# Tool calls may only name paths inside the workspace and away from protected files.
#
# Paths come from the service (input.paths, normalised against context.workspace_root) and,
# so that hand-built inputs are covered too, from the string arguments of the call whose key
# is listed in data.config.mcp.path_argument_keys, and from a file:// resource URI.
# deny: outside the workspace, or a file that data.config.paths marks deny.
# require_approval: a file that data.config.paths marks require_approval.
package cabincrew.mcp.paths

import rego.v1

import data.cabincrew.lib.decision as decision_lib
import data.cabincrew.lib.paths

root := object.get(input, ["context", "workspace_root"], "")

path_keys := {lower(k) | some k in data.config.mcp.path_argument_keys}

service_candidates := {c |
	some p in object.get(input, "paths", [])
	c := {"raw": p.raw, "normalized": p.normalized, "in_workspace": p.in_workspace}
}

argument_candidates := {c |
	walk(object.get(input.payload, ["params", "arguments"], {}), [where, value])
	is_string(value)
	lower(argument_key(where)) in path_keys
	c := {"raw": value, "normalized": value, "in_workspace": true}
}

uri_candidates := {c |
	uri := input.payload.params.uri
	is_string(uri)
	startswith(lower(uri), "file://")
	raw := substring(uri, 7, -1)
	c := {"raw": raw, "normalized": raw, "in_workspace": true}
}

# Only requests name paths to act on; a response is checked by the content policies.
candidates := found if {
	input.phase == "request"
	found := (service_candidates | argument_candidates) | uri_candidates
} else := set()

# The key a walked value sits under; for list items, the key of the list.
argument_key(where) := where[count(where) - 1] if {
	is_string(where[count(where) - 1])
} else := where[count(where) - 2] if {
	count(where) > 1
	is_string(where[count(where) - 2])
} else := ""

leaves_workspace(c) if c.in_workspace == false

leaves_workspace(c) if paths.outside(c.raw, root)

outside_findings := {f |
	some c in candidates
	leaves_workspace(c)
	f := {
		"decision": "deny",
		"rule": "outside_workspace",
		"path": c.raw,
		"reason": decision_lib.message(["the call names ", c.raw, ", which is outside the workspace"]),
	}
}

protected_findings := {f |
	some c in candidates
	some checked in {c.raw, c.normalized}
	some m in paths.protected_matches(checked)
	f := {
		"decision": m.decision,
		"rule": "protected_path",
		"path": c.raw,
		"reason": decision_lib.message(["the call names ", c.raw, ", ", m.label]),
	}
}

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
