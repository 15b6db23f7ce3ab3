# Dangerous tools need a person's approval; denied tools are never called.
#
# data.config.mcp.denied_tools (exact names) deny; data.config.mcp.dangerous_tools (exact
# names) and dangerous_tool_patterns (regular expressions) require approval. Names are
# compared in lower case.
package cabincrew.mcp.tools

import rego.v1

import data.cabincrew.lib.decision as decision_lib

cfg := data.config.mcp

# The tool's name as given (for messages) and in lower case (for matching).
name := input.tool if is_string(input.tool)

name := input.payload.params.name if {
	not is_string(input.tool)
	input.payload.method == "tools/call"
	is_string(input.payload.params.name)
}

tool := lower(name)

denied if {
	some listed in cfg.denied_tools
	lower(listed) == tool
}

dangerous if {
	some listed in cfg.dangerous_tools
	lower(listed) == tool
}

dangerous if {
	some pattern in cfg.dangerous_tool_patterns
	regex.match(pattern, tool)
}

denied_findings := {f |
	input.phase == "request"
	denied
	f := {"decision": "deny", "rule": "denied_tool", "tool": name, "reason": decision_lib.message(["tool ", name, " is denied"])}
}

dangerous_findings := {f |
	input.phase == "request"
	not denied
	dangerous
	f := {
		"decision": "require_approval",
		"rule": "dangerous_tool",
		"tool": name,
		"reason": decision_lib.message(["tool ", name, " is dangerous and needs approval"]),
	}
}

config_findings := {f |
	not is_array(cfg.denied_tools)
	f := {"decision": "deny", "rule": "configuration", "reason": "data.config.mcp.denied_tools is missing"}
} | {f |
	not is_array(cfg.dangerous_tools)
	f := {"decision": "deny", "rule": "configuration", "reason": "data.config.mcp.dangerous_tools is missing"}
}

findings := (denied_findings | dangerous_findings) | config_findings

decision := decision_lib.most_restrictive(findings)

reasons := decision_lib.reasons(findings)

evidence := {"findings": findings}
