package cabincrew.mcp.tools_test

import rego.v1

import data.cabincrew.mcp.tools

call(name) := {"method": "tools/call", "params": {"name": name, "arguments": {}}}

decision_for(name) := d if {
	d := tools.decision with input.payload as call(name) with input.phase as "request"
}

test_an_ordinary_tool_is_allowed if {
	decision_for("read_file") == "allow"
	decision_for("search") == "allow"
}

test_a_dangerous_tool_requires_approval if {
	decision_for("run_command") == "require_approval"
	decision_for("Shell") == "require_approval"
	decision_for("github.execute_workflow") == "require_approval"
}

test_a_denied_tool_is_denied if {
	tools.decision == "deny" with input.payload as call("drop_database") with input.phase as "request"
		with data.config.mcp.denied_tools as ["drop_database"]
}

test_the_tool_field_of_the_service_is_used_first if {
	tools.decision == "require_approval" with input.payload as {"method": "tools/call", "params": {}}
		with input.tool as "bash" with input.phase as "request"
}
