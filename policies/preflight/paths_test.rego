package cabincrew.preflight.paths_test

import rego.v1

import data.cabincrew.preflight.paths

artifact(name, target) := {
	"name": name,
	"artifact": {"artifact_type": "file", "action": "update", "target": target, "mime": "text/plain"},
}

decision_for(target) := d if {
	d := paths.decision with input.artifacts as [artifact("a", target)]
		with input.context as {"workspace_root": "/w"}
}

test_a_target_inside_the_workspace_is_allowed if {
	decision_for("src/main.py") == "allow"
	decision_for("/w/src/main.py") == "allow"
	decision_for(".gitignore") == "allow"
	decision_for(".github/dependabot.yml") == "allow"
}

test_a_target_outside_the_workspace_is_denied if {
	decision_for("../secrets.txt") == "deny"
	decision_for("src/../../x") == "deny"
	decision_for("/etc/passwd") == "deny"
	decision_for("~/.bashrc") == "deny"
	decision_for("C:\\Windows\\win.ini") == "deny"
}

test_the_service_verdict_on_the_workspace_is_honoured if {
	a := object.union(artifact("a", "looks/fine.txt"), {"target_in_workspace": false})
	paths.decision == "deny" with input.artifacts as [a] with input.context as {"workspace_root": "/w"}
}

test_secret_files_are_denied if {
	decision_for(".env") == "deny"
	decision_for("config/.env.production") == "deny"
	decision_for("deploy/.ENV") == "deny"
	decision_for("certs/server.pem") == "deny"
	decision_for("home/id_rsa") == "deny"
	decision_for(".git/config") == "deny"
	decision_for("src/../.env") == "deny"
}

test_an_example_env_file_is_allowed if {
	decision_for(".env.example") == "allow"
}

test_ci_configuration_requires_approval if {
	decision_for(".github/workflows/ci.yml") == "require_approval"
	decision_for(".gitlab-ci.yml") == "require_approval"
	decision_for("Jenkinsfile") == "require_approval"
}

test_reasons_name_the_artifact_and_the_path if {
	reasons := paths.reasons with input.artifacts as [artifact("cfg", ".env")]
		with input.context as {"workspace_root": "/w"}
	reasons == {"artifact cfg targets .env, an environment file"}
}

test_artifacts_without_a_target_are_allowed if {
	a := {"name": "log", "artifact": {"artifact_type": "log", "action": "record", "mime": "text/plain"}}
	paths.decision == "allow" with input.artifacts as [a] with input.context as {}
}

test_missing_configuration_denies if {
	paths.decision == "deny" with input.artifacts as [] with data.config.paths as {}
}
