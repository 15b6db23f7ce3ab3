# Path checks shared by the preflight and MCP policies.
#
# The service also normalises paths lexically before evaluation (target_normalized,
# target_in_workspace, paths[].in_workspace); these functions repeat the check on the raw
# path so that a policy stays safe on inputs built by hand.
#
# Every operation costs microseconds in the embedded engine (rego-cpp), and regex.match
# compiles its pattern on every call; hence one screening expression per path, lookups in
# data rather than scans of rule lists, and literal `hints` that gate regular expressions.
package cabincrew.lib.paths

import rego.v1

slashed(p) := replace(p, "\\", "/")

# Absolute: rooted, home-relative, or with a drive letter (C:/ or C:\).
absolute(p) if startswith(p, "/")

absolute(p) if startswith(p, "\\")

absolute(p) if startswith(p, "~")

absolute(p) if substring(p, 1, 1) == ":"

# A relative path whose ".." segments climb above the folder it starts from.
climbs(p) if {
	s := slashed(p)
	contains(s, "..")
	parts := [part | some part in split(s, "/"); part != ""; part != "."]
	some i in numbers.range(0, count(parts) - 1)
	ups := count([part | some part in array.slice(parts, 0, i + 1); part == ".."])
	2 * ups > i + 1
}

root_prefix(root) := concat("", [trim_suffix(slashed(root), "/"), "/"])

# The part of p below root, when p is root or lies below it.
below_root(p, root) := "" if {
	root != ""
	slashed(p) == trim_suffix(slashed(root), "/")
}

below_root(p, root) := trim_prefix(slashed(p), root_prefix(root)) if {
	root != ""
	startswith(slashed(p), root_prefix(root))
}

# Whether p leaves the workspace rooted at root (root may be "" when unknown).
outside(p, root) if {
	not absolute(p)
	climbs(p)
}

outside(p, root) if {
	absolute(p)
	not below_root(p, root)
}

outside(p, root) if {
	absolute(p)
	climbs(below_root(p, root))
}

# Protected-path rules of data.config.paths that p matches, as {decision, label} objects.
#
# Rules are lookups rather than a list to scan: by file name (`names`), file-name prefix
# (`name_prefixes`), extension (`extensions`), any folder on the path (`dirs`), two
# consecutive path segments (`subpaths`), then regular expressions (`patterns`, empty by
# default). Keys are lower case; paths are compared in lower case. A file name listed in
# `exceptions` matches nothing.
protected_matches(p) := found if {
	subject := lower(slashed(p))
	screened(subject)
	segments := [s | some s in split(subject, "/"); s != ""; s != "."]
	name := segments[count(segments) - 1]
	not data.config.paths.exceptions[name]
	found := (((by_name(name) | by_prefix(name)) | by_extension(name)) | by_dir(segments)) | (by_subpath(segments) | by_pattern(subject))
} else := set()

# One regular expression screens paths before the lookups: `prefilter` must match every
# protected name, prefix, extension, folder and subpath (lib/paths_test.rego checks it).
# Custom `patterns` are not screened.
screened(subject) if regex.match(data.config.paths.prefilter, subject)

screened(subject) if count(data.config.paths.patterns) > 0

# The argument is bound to a local first: rego-cpp 1.5.2 treats a function argument used
# directly as an index inside a comprehension as a fresh variable (and iterates).
by_name(name) := {m |
	key := name
	m := data.config.paths.names[key]
}

by_prefix(name) := {m |
	some prefix
	m := data.config.paths.name_prefixes[prefix]
	startswith(name, prefix)
}

by_extension(name) := {m |
	parts := split(name, ".")
	count(parts) > 1
	m := data.config.paths.extensions[concat("", [".", parts[count(parts) - 1]])]
}

by_dir(segments) := {m |
	some s in segments
	m := data.config.paths.dirs[s]
}

by_subpath(segments) := {m |
	some i in numbers.range(0, count(segments) - 2)
	m := data.config.paths.subpaths[concat("/", [segments[i], segments[i + 1]])]
}

by_pattern(subject) := {m |
	some rule in data.config.paths.patterns
	regex.match(rule.pattern, subject)
	m := {"decision": rule.decision, "label": rule.label}
}

# A rule without hints always runs its pattern; with hints, only when one occurs.
hinted(subject, rule) if not rule.hints

hinted(subject, rule) if {
	some hint in rule.hints
	contains(subject, hint)
}

# Whether the protected-path configuration is present; policies deny without it.
# (patterns and exceptions are optional.)
configured if {
	is_string(data.config.paths.prefilter)
	is_object(data.config.paths.names)
	is_object(data.config.paths.extensions)
	is_object(data.config.paths.dirs)
}
