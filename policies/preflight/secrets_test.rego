package cabincrew.preflight.secrets_test

import rego.v1

import data.cabincrew.preflight.secrets

no_findings := {"files_deleted": 0, "files_changed": 1, "lines_added": 1, "lines_removed": 0, "secrets_found": []}

body(text) := [{"name": "a", "artifact": {"artifact_type": "file", "action": "create", "mime": "text/plain"}, "body_text": text}]

test_a_clean_body_is_allowed if {
	secrets.decision == "allow" with input.artifacts as body("print('hello')\n") with input.stats as no_findings
}

test_a_scanner_finding_is_denied if {
	stats := object.union(no_findings, {"secrets_found": [{"kind": "aws_access_key", "artifact": "a"}]})
	secrets.decision == "deny" with input.artifacts as [] with input.stats as stats
	secrets.reasons == {"the secret scanner found aws_access_key in a"} with input.artifacts as []
		with input.stats as stats
}

test_a_private_key_in_a_body_is_denied if {
	text := "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
	secrets.decision == "deny" with input.artifacts as body(text) with input.stats as no_findings
}

test_an_aws_key_in_a_body_is_denied if {
	secrets.decision == "deny" with input.artifacts as body("aws_key = AKIAIOSFODNN7EXAMPLE\n")
		with input.stats as no_findings
}

test_a_hard_coded_password_requires_approval if {
	secrets.decision == "require_approval" with input.artifacts as body("PASSWORD = 'hunter2hunter2'\n")
		with input.stats as no_findings
}

test_a_password_read_from_the_environment_is_allowed if {
	secrets.decision == "allow" with input.artifacts as body("password = \"${DB_PASSWORD}\"\n")
		with input.stats as no_findings
}

test_missing_configuration_denies if {
	secrets.decision == "deny" with input.artifacts as [] with input.stats as no_findings
		with data.config.secrets as {}
}
