package cabincrew.lib.secrets_test

import rego.v1

import data.cabincrew.lib.secrets

test_the_secret_screen_holds_every_hint if {
	every rule in data.config.secrets.patterns {
		every hint in rule.hints {
			data.config.secrets.screen[lower(hint)] == ""
		}
	}
}

test_the_exfiltration_screen_holds_every_hint if {
	every rule in data.config.llm.exfiltration_patterns {
		every hint in rule.hints {
			data.config.llm.screen[lower(hint)] == ""
		}
	}
}

test_text_without_secrets_matches_nothing if {
	secrets.matches("def add(a, b):\n    return a + b\n") == set()
}

test_matches_report_labels_not_values if {
	secrets.matches("id = AKIAIOSFODNN7EXAMPLE") == {{"decision": "deny", "label": "an AWS access key id"}}
}
