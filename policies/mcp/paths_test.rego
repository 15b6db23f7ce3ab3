package cabincrew.mcp.paths_test

import rego.v1

import data.cabincrew.mcp.paths

call(arguments) := {"method": "tools/call", "params": {"name": "write_file", "arguments": arguments}}

decision_for(arguments) := d if {
	d := paths.decision with input.payload as call(arguments)
		with input.phase as "request"
		with input.context as {"workspace_root": "/w"}
}

test_a_path_inside_the_workspace_is_allowed if {
	decision_for({"path": "src/a.py", "content": "x = 1"}) == "allow"
	decision_for({"path": "/w/src/a.py"}) == "allow"
}

test_a_path_outside_the_workspace_is_denied if {
	decision_for({"path": "/etc/passwd"}) == "deny"
	decision_for({"path": "../../outside"}) == "deny"
	decision_for({"options": {"destination": "~/.ssh/authorized_keys"}}) == "deny"
	decision_for({"paths": ["ok.txt", "../nope"]}) == "deny"
}

test_a_protected_file_is_denied if {
	decision_for({"file_path": ".env"}) == "deny"
	decision_for({"path": "keys/deploy.pem"}) == "deny"
}

test_ci_configuration_requires_approval if {
	decision_for({"path": ".github/workflows/release.yml"}) == "require_approval"
}

test_a_file_resource_outside_the_workspace_is_denied if {
	request := {"method": "resources/read", "params": {"uri": "file:///etc/shadow"}}
	paths.decision == "deny" with input.payload as request with input.phase as "request"
		with input.context as {"workspace_root": "/w"}
}

test_paths_normalised_by_the_service_are_honoured if {
	derived := [{"raw": "x", "normalized": "x", "in_workspace": false}]
	paths.decision == "deny" with input.payload as call({}) with input.phase as "request"
		with input.paths as derived with input.context as {"workspace_root": "/w"}
}

test_responses_are_not_path_checked if {
	paths.decision == "allow" with input.payload as call({"path": "/etc/passwd"})
		with input.phase as "response" with input.context as {"workspace_root": "/w"}
}
