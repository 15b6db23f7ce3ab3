# Large changes get a warning or go to a human.
#
# Thresholds are in data.config.preflight.change_size: for each measure (files_deleted,
# files_changed, lines_changed = lines_added + lines_removed) a `warn` and a
# `require_approval` threshold; a measure at or above a threshold gives that decision.
package cabincrew.preflight.change_size

import rego.v1

import data.cabincrew.lib.decision as decision_lib

limits := data.config.preflight.change_size

measures := {
	"files_deleted": input.stats.files_deleted,
	"files_changed": input.stats.files_changed,
	"lines_changed": input.stats.lines_added + input.stats.lines_removed,
}

level_for(value, limit) := "require_approval" if {
	value >= limit.require_approval
} else := "warn" if {
	value >= limit.warn
}

size_findings := {f |
	some name
	value := measures[name]
	limit := limits[name]
	level := level_for(value, limit)
	f := {
		"decision": level,
		"rule": name,
		"value": value,
		"threshold": limit[level],
		"reason": decision_lib.message([name, " is ", sprintf("%d", [value]), ", at or above the ", level, " threshold of ", sprintf("%d", [limit[level]])]),
	}
}

config_findings := {f |
	not is_object(limits)
	f := {
		"decision": "deny",
		"rule": "configuration",
		"reason": "data.config.preflight.change_size is missing, so change size cannot be checked",
	}
}

input_findings := {f |
	not is_object(measures)
	f := {
		"decision": "deny",
		"rule": "input",
		"reason": "input.stats is missing or incomplete, so change size cannot be checked",
	}
}

findings := (size_findings | config_findings) | input_findings

decision := decision_lib.most_restrictive(findings)

reasons := decision_lib.reasons(findings)

evidence := {"findings": findings}
