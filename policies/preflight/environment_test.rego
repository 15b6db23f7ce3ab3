package cabincrew.preflight.environment_test

import rego.v1

import data.cabincrew.preflight.environment

test_production_requires_a_release_manager if {
	environment.decision == "require_approval" with input.context as {"environment": "production"}
	environment.required_role == "release-manager" with input.context as {"environment": "Production"}
}

test_other_environments_are_allowed_without_a_role if {
	environment.decision == "allow" with input.context as {"environment": "staging"}
	not environment.required_role with input.context as {"environment": "staging"}
	environment.decision == "allow" with input.context as {}
}

test_environments_come_from_data if {
	envs := {"staging": {"decision": "warn"}}
	environment.decision == "warn" with input.context as {"environment": "staging"}
		with data.config.preflight.environments as envs
}
