package cabincrew.llm.secrets_test

import rego.v1

import data.cabincrew.llm.secrets

test_a_response_without_secrets_is_allowed if {
	secrets.decision == "allow" with input.texts as ["The answer is 42."] with input.phase as "response"
}

test_a_response_with_a_token_is_denied if {
	text := "Use this token: ghp_abcdefghijklmnopqrstuvwxyz0123456789"
	secrets.decision == "deny" with input.texts as [text] with input.phase as "response"
	secrets.reasons == {"the response contains a GitHub token"} with input.texts as [text]
		with input.phase as "response"
}

test_a_request_carrying_a_secret_is_denied if {
	secrets.decision == "deny" with input.texts as ["my key is AKIAIOSFODNN7EXAMPLE"] with input.phase as "request"
}
