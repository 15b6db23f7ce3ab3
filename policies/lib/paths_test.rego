package cabincrew.lib.paths_test

import rego.v1

import data.cabincrew.lib.paths

test_relative_paths_that_stay_below_their_start_do_not_climb if {
	not paths.climbs("src/main.py")
	not paths.climbs("src/../main.py")
	not paths.climbs("./a/./b")
}

test_relative_paths_that_go_above_their_start_climb if {
	paths.climbs("..")
	paths.climbs("../x")
	paths.climbs("a/../../x")
	paths.climbs("a\\..\\..\\x")
}

test_absolute_paths_are_outside_without_a_workspace_root if {
	paths.outside("/etc/passwd", "")
}

test_absolute_paths_below_the_workspace_root_are_inside if {
	not paths.outside("/w/src/a.py", "/w")
	not paths.outside("/w/src/a.py", "/w/")
	not paths.outside("/w", "/w")
}

test_absolute_paths_that_climb_out_of_the_workspace_root_are_outside if {
	paths.outside("/w/../etc/passwd", "/w")
	paths.outside("/workspace2/a", "/w")
}

test_home_and_drive_paths_are_outside if {
	paths.outside("~/.ssh/id_rsa", "/w")
	paths.outside("C:\\Windows\\system.ini", "/w")
}

test_protected_matches_ignore_case_and_backslashes if {
	paths.protected_matches("CONFIG\\.ENV") == {{"decision": "deny", "label": "an environment file"}}
}

test_protected_matches_cover_each_kind_of_rule if {
	paths.protected_matches("home/id_ed25519") == {{"decision": "deny", "label": "an SSH private key"}}
	paths.protected_matches(".env.local") == {{"decision": "deny", "label": "an environment file"}}
	paths.protected_matches("tls/Server.PEM") == {{"decision": "deny", "label": "a private key or keystore"}}
	paths.protected_matches("repo/.git/hooks/pre-commit") == {{"decision": "deny", "label": "git internals"}}
	paths.protected_matches(".github/workflows/ci.yml") == {{"decision": "require_approval", "label": "CI configuration"}}
	paths.protected_matches("src/main.py") == set()
}

test_protected_patterns_are_regular_expressions if {
	rules := [{"decision": "warn", "label": "a migration", "pattern": "^db/migrations/"}]
	paths.protected_matches("db/migrations/001.sql") == {{"decision": "warn", "label": "a migration"}}
		with data.config.paths.patterns as rules
}

test_protected_exceptions_win if {
	paths.protected_matches(".env.example") == set()
}

test_the_path_prefilter_matches_every_protected_key if {
	keys := {k |
		some kind in ["names", "name_prefixes", "extensions", "dirs", "subpaths"]
		some k
		data.config.paths[kind][k]
	}
	every k in keys {
		regex.match(data.config.paths.prefilter, k)
	}
}
