package cabincrew.preflight.change_size_test

import rego.v1

import data.cabincrew.preflight.change_size

stats(deleted, changed, added, removed) := {
	"files_deleted": deleted,
	"files_changed": changed,
	"lines_added": added,
	"lines_removed": removed,
	"secrets_found": [],
}

test_a_small_change_is_allowed if {
	change_size.decision == "allow" with input.stats as stats(0, 3, 40, 10)
}

test_a_few_deletions_warn if {
	change_size.decision == "warn" with input.stats as stats(5, 5, 0, 0)
}

test_many_deletions_require_approval if {
	change_size.decision == "require_approval" with input.stats as stats(50, 50, 0, 0)
}

test_a_large_diff_warns if {
	change_size.decision == "warn" with input.stats as stats(0, 10, 400, 100)
}

test_a_huge_diff_requires_approval if {
	change_size.decision == "require_approval" with input.stats as stats(0, 10, 1500, 600)
}

test_thresholds_come_from_data if {
	limits := {
		"files_deleted": {"warn": 1, "require_approval": 2},
		"files_changed": {"warn": 100, "require_approval": 100},
		"lines_changed": {"warn": 100, "require_approval": 100},
	}
	change_size.decision == "require_approval" with input.stats as stats(2, 2, 0, 0)
		with data.config.preflight.change_size as limits
}

test_missing_stats_deny if {
	change_size.decision == "deny" with input.stats as {}
}
