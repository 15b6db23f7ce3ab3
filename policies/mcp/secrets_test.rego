package cabincrew.mcp.secrets_test

import rego.v1

import data.cabincrew.mcp.secrets

test_a_response_without_secrets_is_allowed if {
	secrets.decision == "allow" with input.texts as ["file contents: hello"] with input.phase as "response"
}

test_a_response_with_a_private_key_is_denied if {
	text := "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"
	secrets.decision == "deny" with input.texts as [text] with input.phase as "response"
}

test_a_scanner_finding_is_denied if {
	secrets.decision == "deny" with input.texts as [] with input.phase as "request"
		with input.secrets_found as [{"kind": "github_token", "text_index": 0}]
}
