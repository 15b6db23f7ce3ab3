# Secret patterns shared by the preflight, MCP and LLM policies (data.config.secrets).
#
# These are a second line of defence: the service's secret scanner fills
# `secrets_found`, and the policies deny on those findings too. Matches report the
# pattern's label, never the matched text.
#
# Regular expressions are slow in the embedded engine, above all on long texts, so text is
# first screened: `screen` holds every pattern's hints in lower case (as keys, with ""
# values), and text that contains none of them is not scanned further; otherwise a
# pattern's regular expression runs only when one of its own `hints` occurs.
# lib/secrets_test.rego checks that `screen` covers every hint.
package cabincrew.lib.secrets

import rego.v1

import data.cabincrew.lib.paths

# The secret rules of data.config.secrets that text matches, as {decision, label} objects.
# The screen is checked in the function body, before the comprehension: inside a
# comprehension the engine does not stop at a failed first statement.
matches(text) := found if {
	lowered := lower(text)
	contains_any(lowered, data.config.secrets.screen)
	found := {m |
		some rule in data.config.secrets.patterns
		scanned := subject(text, lowered, rule)
		paths.hinted(scanned, rule)
		regex.match(rule.pattern, scanned)
		m := {"decision": object.get(rule, "decision", "deny"), "label": rule.label}
	}
} else := set()

# Whether lowered contains any key of screen (an object whose values are all ""):
# strings.replace_n deletes every key in one call, so a change in length means a hit.
contains_any(lowered, screen) if count(strings.replace_n(screen, lowered)) != count(lowered)

subject(text, lowered, rule) := lowered if {
	object.get(rule, "ignore_case", false) == true
} else := text

configured if {
	is_object(data.config.secrets.screen)
	is_array(data.config.secrets.patterns)
}
